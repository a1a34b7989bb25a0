// A decode layer's launch structure with ideal kernels (a profiling tool, not a test): lite-24g's six
// launches a layer (attention, o, routing, MoE gate+up, MoE down, the next layer's q/k/v), each as
// many CTAs and bytes as the runtime's (R24 plan, 8-warp CTAs, four an SM), chained as programmatic
// dependents in one CUDA graph of 32 layers, but doing only what the structure needs: stream the
// launch's weight bytes through the decode kernel's per-lane cp.async ring (stream_probe.cu's loop,
// no dequantization or math), read the previous launch's output once after the wait (one L2 round
// trip), store a piece of output, and where the runtime has a last-CTA step (attention's chunk merge,
// routing's top k, down's slot sum) a fence, an arrival count and the last CTA's reload of every
// piece. What it measures is the floor of this structure: how fast a layer of these six dependent
// launches can be when each kernel's own work costs nothing, against the layer's bytes at the copy
// rate (the roofline). Other forms of the same layer: no programmatic launch; every launch's first
// blocks requested before its wait; the launch boundaries as arrival counts (R21's handshake); no
// dependency at all (the bytes alone); no bytes (the chain alone); only the routed experts' bytes (as
// if everything else had been prefetched for free); o's and the shared pair's bytes free, or brought
// into L2 by a prefetch rider on the attention launch (R29's form); routing's launch dropped; the MoE
// pair or the attention side alone; each launch alone; and the persistent decode kernel NOTES.md
// describes, in its ideal form (one launch a step, every co-resident CTA walking all items in one order).
//
//   nvcc -std=c++17 -O3 -arch=sm_90 -Inative/cuda bench/layer_probe.cu -o /tmp/layer_probe && /tmp/layer_probe
#include "probe.cuh"

constexpr int WARPS = 8, THREADS = WARPS * 32, DU = 4;  // the decode kernel's CTA and ring (R24)
constexpr int XV = 512;                                 // a launch's output: 4096 bf16 = 512 uint4

struct Stage {
  const char* name;
  int ctas;
  double mb;   // weight bytes the launch streams, MB (the runtime's, scales included)
  bool pre;    // its first ring blocks requested before the wait (the GEMMs and attention do; routing
               // and gate+up cannot: their rows or expert come from the launch before)
  bool merge;  // a last-CTA step: fence, arrival count, the last CTA reloads every CTA's piece
};

// lite-24g at one token: attention reads 0.5 MB of K / V at 256 keys (4 kv heads x 16 chunks); o
// 4096 x 4096 int4 g128 + bf16 scales; routing the text router's 48 rows of 4096 bf16; gate+up 9 pairs
// (8 routed + the shared expert) x 2 x 1536 x 4096 int4 + scales, 96 CTAs a pair; down 9 x 4096 x 1536,
// 64 CTAs a pair; q/k/v 5120 x 4096
const Stage LAYER[] = {
    {"attention", 64, 0.52, true, true}, {"o", 128, 8.65, true, false},     {"routing", 48, 0.39, false, true},
    {"gate+up", 864, 58.4, false, false}, {"down", 576, 29.2, true, true}, {"q/k/v", 160, 10.8, true, false},
};
constexpr int NSTAGE = sizeof(LAYER) / sizeof(LAYER[0]);
__constant__ Stage LAYER_D[NSTAGE];  // the same, for the persistent kernel

// One launch's work for one CTA (or, persistent, one item of a launch: `idx` of `n`): `blocks`
// 512-byte blocks a warp of w (contiguous shares), x_in's XV vectors read after the wait, the piece
// stored at x_out[idx % XV]; with a counter, the last to arrive reloads every piece and stores their
// fold at x_out[0]. The wait: the hardware's (`wait`: griddepcontrol.wait) or, with need_at, a spin
// until that arrival count reaches `need`; arrive_at counts this launch's output as stored.
__device__ void item(uint8_t* smem, const uint4* w, int blocks, bool pre, bool wait, const uint4* x_in, uint4* x_out,
                     int idx, int n, int* counter, const int* need_at, int need, int* arrive_at, unsigned* sink) {
  __shared__ unsigned red[WARPS];
  __shared__ int s_last;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, tid = threadIdx.x;
  const uint4* src = w + ((size_t)(idx * WARPS + warp) * blocks) * 32 + lane;
  const uint32_t ring = m3e::smem_u32(smem) + (warp * DU * 32 + lane) * 16;
  __syncthreads();  // (persistent: the item before is done with red)
  if (pre) ring_first<DU>(ring, src, blocks);
  if (wait) m3e::pdl_wait();
  if (need_at) {  // the handshake form: wait for the launch before by its arrival count
    if (tid == 0)
      while (m3e::ld_acquire(need_at) < need) __nanosleep(32);
    __syncthreads();
  }
  unsigned acc = 0;
  for (int i = tid; i < XV; i += THREADS) {
    const uint4 v = __ldcg(x_in + i);
    acc += v.x ^ v.w;
  }
  if (!pre) ring_first<DU>(ring, src, blocks);
  acc = ring_rest<DU>(ring, src, blocks, acc);
  // the piece: the threads' values folded by shuffles, then the warps' through shared memory
  for (int o = 16; o; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) red[warp] = acc;
  __syncthreads();
  if (tid == 0) {
    unsigned f = 0;
#pragma unroll
    for (int i = 0; i < WARPS; ++i) f += red[i];
    x_out[idx % XV] = make_uint4(f, f + 1, f + 2, f + 3);
    s_last = 0;
    if (counter) {
      __threadfence();
      s_last = atomicAdd(counter, 1) == n - 1;
      if (s_last) *counter = 0;
      __threadfence();
    } else if (arrive_at) {  // every piece is the output: each arrives
      __threadfence();
      atomicAdd(arrive_at, 1);
    }
  }
  __syncthreads();
  if (!s_last) return;
  unsigned f = 0;
  for (int i = tid; i < min(n, XV); i += THREADS) f += __ldcg(x_out + i).y;
  for (int o = 16; o; o >>= 1) f += __shfl_xor_sync(0xffffffffu, f, o);
  if (lane == 0) red[warp] = f;
  __syncthreads();
  if (tid == 0) {
#pragma unroll
    for (int i = 1; i < WARPS; ++i) f += red[i];
    x_out[0].z = f;
    if (f == 0x9e3779b9u) sink[0] = f;  // (never, in practice)
    if (arrive_at) {  // the last one's store is the output: it alone arrives
      __threadfence();
      atomicAdd(arrive_at, 1);
    }
  }
}

// An L2 prefetch rider (NOTES R29's, in this ideal setting): byte ranges brought into L2 by extra CTAs
// of a launch, a 128-byte `prefetch.global.L2` a line, while the launch's own CTAs run.
struct Rider {
  const char* p[3];
  size_t n[3];
};

// One launch of a layer: a CTA an item of the n, then the rider's CTAs, if any.
__global__ void __launch_bounds__(THREADS, 4)
    stage(const uint4* w, int blocks, bool pre, bool wait, const uint4* x_in, uint4* x_out, int n, int* counter,
          const int* need_at, int need, int* arrive_at, unsigned* sink, const Rider r) {
  extern __shared__ __align__(16) uint8_t smem[];
  m3e::pdl_launch_dependents();
  if ((int)blockIdx.x >= n) {
    const size_t step = (size_t)(gridDim.x - n) * THREADS * 128;
    for (int j = 0; j < 3; ++j)
      for (size_t o = ((blockIdx.x - n) * THREADS + threadIdx.x) * (size_t)128; o < r.n[j]; o += step)
        asm volatile("prefetch.global.L2 [%0];\n" ::"l"(r.p[j] + o));
    return;
  }
  item(smem, w, blocks, pre, wait, x_in, x_out, blockIdx.x, n, counter, need_at, need, arrive_at, sink);
}

// The persistent form (NOTES, "The persistent decode kernel"): one launch for all layers, as many CTAs
// as fit at once, each taking the items of every launch of every layer in one global round-robin order
// (so the CTAs left without an item of a launch take the first of the next), waiting for the launch
// before by its arrival count; an item's first blocks are requested before that wait where LAYER says
// so (its weights do not depend on the wait).
struct Persistent {
  const char* w;
  size_t layer_bytes, off[NSTAGE];
  int blocks[NSTAGE], layers;
  bool pre_all;  // every item's first blocks before its wait (as if gate+up knew its experts)
  uint4* xs;
  int *counters, *arrivals;  // [layers][NSTAGE] each, zeroed before the launch
  unsigned* sink;
};
__global__ void __launch_bounds__(THREADS, 4) persistent(const Persistent a) {
  extern __shared__ __align__(16) uint8_t smem[];
  const int G = gridDim.x;
  int base = 0;  // items before this launch in the global order, mod G
  for (int l = 0; l < a.layers; ++l)
    for (int i = 0; i < NSTAGE; ++i) {
      const Stage& st = LAYER_D[i];
      const int prev = (i + NSTAGE - 1) % NSTAGE;
      const int* need_at = l == 0 && i == 0 ? nullptr : a.arrivals + l * NSTAGE + i - 1;  // (l, -1) = (l - 1, 5)
      const int need = LAYER_D[prev].merge ? 1 : LAYER_D[prev].ctas;
      for (int it = ((int)blockIdx.x - base + G) % G; it < st.ctas; it += G)
        item(smem, reinterpret_cast<const uint4*>(a.w + l * a.layer_bytes + a.off[i]), a.blocks[i], st.pre || a.pre_all,
             false, a.xs + (size_t)prev * XV, a.xs + (size_t)i * XV, it, st.ctas,
             st.merge ? a.counters + l * NSTAGE + i : nullptr, need_at, need, a.arrivals + l * NSTAGE + i, a.sink);
      base = (base + st.ctas) % G;
    }
}

int main() {
  constexpr int LAYERS = 32;
  int dev = 0, sms = 0, l2 = 0;
  CK(cudaGetDevice(&dev));
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  CK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));
  const bool pdl = m3e::pdl_capable() == 1;
  cudaStream_t s;
  CK(cudaStreamCreate(&s));
  // every launch's blocks a warp, and the layer's bytes as streamed (whole warps' shares)
  int blocks[NSTAGE];
  size_t layer_bytes = 0, off[NSTAGE + 1] = {0};
  for (int i = 0; i < NSTAGE; ++i) {
    blocks[i] = (int)(LAYER[i].mb * 1e6 / 512 / ((size_t)LAYER[i].ctas * WARPS));
    off[i + 1] = off[i] + (size_t)LAYER[i].ctas * WARPS * blocks[i] * 512;
  }
  layer_bytes = off[NSTAGE];
  // every layer its own weights (32 x ~108 MB: each replay reads fresh DRAM, as the decode step does)
  char* w = nullptr;
  CK(cudaMalloc(&w, layer_bytes * LAYERS));
  fill<<<1024, 256>>>(reinterpret_cast<uint32_t*>(w), layer_bytes * LAYERS / 4);
  uint4* xs = nullptr;  // one output buffer a launch of a layer; the first reads the last's
  int* counters = nullptr;
  unsigned* sink = nullptr;
  CK(cudaMalloc(&xs, (size_t)NSTAGE * XV * 16));
  CK(cudaMemset(xs, 0, (size_t)NSTAGE * XV * 16));
  CK(cudaMalloc(&counters, NSTAGE * 4));
  CK(cudaMemset(counters, 0, NSTAGE * 4));
  CK(cudaMalloc(&sink, 64));
  int* arrivals = nullptr;
  CK(cudaMalloc(&arrivals, LAYERS * NSTAGE * 4));
  const int smem = WARPS * DU * 512;
  CK(cudaFuncSetAttribute(stage, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  CK(cudaDeviceSynchronize());

  // the copy rate, as bench/kernels.py measures it (device to device, read + write)
  const size_t cbytes = layer_bytes;
  const float copy_us = graph_us(
      [&] {
        for (int l = 0; l < 8; ++l)
          CK(cudaMemcpyAsync(w + ((l + 1) % 8) * layer_bytes, w + l * layer_bytes, cbytes, cudaMemcpyDeviceToDevice, s));
      },
      s) / 8;
  const double copy_gbs = 2.0 * cbytes / (copy_us * 1e3);
  const double roof_us = layer_bytes / (copy_gbs * 1e3);
  printf("device: %d SMs, L2 %d MB, programmatic launches %s; copy of %.1f MB: %.1f us = %.0f GB/s\n", sms, l2 >> 20,
         pdl ? "yes" : "no", cbytes / 1e6, copy_us, copy_gbs);
  printf("a layer: %.1f MB, %.1f us at the copy rate (100 %%); 70 %% of that rate is %.1f us\n\n", layer_bytes / 1e6,
         roof_us, roof_us / 0.7);

  // a decode step's 32 layers. mask: the launches kept; bytes: whether they stream; dep: whether
  // they launch as programmatic dependents; pre: every launch's first ring blocks before its wait
  // (else as LAYER says); wait: whether a launch waits for the one before at all
  // handshake: instead of the hardware's wait, each launch's CTAs spin on the launch before's arrival
  // count (its CTAs' fence and atomic after their stores; R21's form), counts zeroed at the step's start
  struct Form {
    unsigned mask = (1u << NSTAGE) - 1;
    bool bytes = true, dep = true, pre = false, wait = true, handshake = false;
    bool routed_only = false;  // only the routed experts' bytes: 8 of the 9 pairs, none elsewhere (as if
                               // every other byte had been brought in at no cost while DRAM idled)
    bool free_o_shared = false;  // the same for o's bytes and the shared pair's (the MoE's 1 / 9) only
    int rider = 0;  // CTAs of an L2 prefetch rider on the attention launch: the layer's o weights and
                    // the shared pair's (the first 96 gate+up and 64 down CTAs' shares)
  };
  auto nblocks = [&](const Form& f, int i) {
    if (!f.bytes) return 0;
    if (f.routed_only) return i == 3 || i == 4 ? blocks[i] * 8 / 9 : 0;
    if (f.free_o_shared) return i == 1 ? 0 : i == 3 || i == 4 ? blocks[i] * 8 / 9 : blocks[i];
    return blocks[i];
  };
  auto step = [&](const Form& f) {
    if (f.handshake) CK(cudaMemsetAsync(arrivals, 0, LAYERS * NSTAGE * 4, s));
    int* last = nullptr;  // the previous launch's arrival count, and how many arrive there
    int last_n = 0;
    for (int l = 0; l < LAYERS; ++l)
      for (int i = 0; i < NSTAGE; ++i) {
        if (!(f.mask >> i & 1)) continue;
        const Stage& st = LAYER[i];
        const int prev = (i + NSTAGE - 1) % NSTAGE;
        int* mine = f.handshake ? arrivals + l * NSTAGE + i : nullptr;
        const char* lw = w + l * layer_bytes;
        Rider r = {};
        const int rider = i == 0 ? f.rider : 0;
        if (rider) {
          r.p[0] = lw + off[1], r.n[0] = off[2] - off[1];
          r.p[1] = lw + off[3], r.n[1] = (size_t)96 * WARPS * blocks[3] * 512;
          r.p[2] = lw + off[4], r.n[2] = (size_t)64 * WARPS * blocks[4] * 512;
        }
        CK(m3e::launch_kernel(stage, dim3(st.ctas + rider), dim3(THREADS), smem, s, f.dep && pdl,
                              reinterpret_cast<const uint4*>(lw + off[i]), nblocks(f, i), st.pre || f.pre,
                              f.wait && !f.handshake, xs + (size_t)prev * XV, xs + (size_t)i * XV, st.ctas,
                              st.merge ? counters + i : nullptr, last, last_n, mine, sink, r));
        last = mine;
        last_n = st.merge ? 1 : st.ctas;
      }
  };
  auto row = [&](const char* what, const Form& f) {
    const float us = graph_us([&] { step(f); }, s) / LAYERS;
    double mb = 0;
    for (int i = 0; i < NSTAGE; ++i)
      if (f.mask >> i & 1) mb += (double)LAYER[i].ctas * WARPS * nblocks(f, i) * 512 / 1e6;
    if (f.bytes && f.mask == (1u << NSTAGE) - 1)
      printf("| %s | %.1f | %.1f | %.0f %% |\n", what, mb, us, 100 * roof_us / us);
    else
      printf("| %s | %.1f | %.1f | - |\n", what, mb, us);
  };
  printf("| a layer (32 in one graph) | MB | us a layer | %% of the copy-rate layer |\n|---|---|---|---|\n");
  const unsigned all = (1u << NSTAGE) - 1;
  Form f;
  row("six dependent launches, ideal kernels", f);
  f.dep = false;
  row("the same, plain stream order (no programmatic launch)", f);
  f = Form();
  f.pre = true;
  row("the same, every launch's first blocks before its wait (as if gate+up knew its experts)", f);
  f = Form();
  f.handshake = true;
  row("the same, each launch waiting on the one before's arrival count (R21's handshake)", f);
  f = Form();
  f.wait = false;
  row("the same six grids, no launch waiting for another (the bytes alone)", f);
  f = Form();
  f.bytes = false;
  row("the same six launches, no bytes (the chain alone)", f);
  f = Form();
  f.routed_only = true;
  f.pre = true;
  row("the same, only the routed experts' bytes, every launch's first blocks before its wait", f);
  f = Form();
  f.free_o_shared = true;
  row("the same, o's and the shared pair's bytes free (as if prefetched at no cost)", f);
  for (int rc : {16, 64, 132}) {
    char name[96];
    snprintf(name, sizeof name, "the same, those bytes by an L2 prefetch rider of %d CTAs on attention", rc);
    f = Form();
    f.rider = rc;
    row(name, f);
  }
  f = Form();
  f.mask = all & ~4u;
  row("five launches: routing's dropped (as if folded into o)", f);
  f.mask = 0b011000;
  row("two launches, gate+up and down only, with their bytes", f);
  f.mask = 0b100111;
  row("four launches, attention, o, routing, q/k/v, with their bytes", f);
  for (int i = 0; i < NSTAGE; ++i) {
    char name[96];
    snprintf(name, sizeof name, "%s alone, %d CTAs (32 a step, dependent)", LAYER[i].name, LAYER[i].ctas);
    f.mask = 1u << i;
    row(name, f);
  }
  // the persistent form: one launch a step, every co-resident CTA (a grid of more could deadlock)
  CK(cudaMemcpyToSymbol(LAYER_D, LAYER, sizeof LAYER));
  CK(cudaFuncSetAttribute(persistent, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  int occ = 0;
  CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, persistent, THREADS, smem));
  Persistent P = {};
  P.w = w;
  P.layer_bytes = layer_bytes;
  for (int i = 0; i < NSTAGE; ++i) P.off[i] = off[i], P.blocks[i] = blocks[i];
  P.layers = LAYERS;
  P.xs = xs;
  CK(cudaMalloc(&P.counters, LAYERS * NSTAGE * 4));
  P.arrivals = arrivals;
  P.sink = sink;
  for (int per : {occ, 2})
    for (bool pre : {false, true}) {
      P.pre_all = pre;
      const float us = graph_us(
          [&] {
            CK(cudaMemsetAsync(P.counters, 0, LAYERS * NSTAGE * 4, s));
            CK(cudaMemsetAsync(P.arrivals, 0, LAYERS * NSTAGE * 4, s));
            persistent<<<per * sms, THREADS, smem, s>>>(P);
            CK(cudaGetLastError());
          },
          s) / LAYERS;
      printf("| persistent: one launch a step, %d CTAs (%d an SM)%s | %.1f | %.1f | %.0f %% |\n", per * sms, per,
             pre ? ", every item's first blocks before its wait" : "", layer_bytes / 1e6, us, 100 * roof_us / us);
    }
  CK(cudaFree(w));
  return 0;
}

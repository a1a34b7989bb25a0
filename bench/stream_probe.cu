// The weight stream alone, as the decode kernel moves it (a profiling tool, not a test): each warp of a
// 16-warp CTA reads its contiguous share of 512-byte blocks through a per-lane cp.async ring DU blocks
// deep (w4a16_decode.cuh's K loop without the math: each block's 16 bytes a lane are folded into a
// checksum), for a fixed total of bytes cut into different CTA counts. It asks what a launch of that
// shape can stream at all (the one-token MoE pair was 432 + 288 CTAs in two dependent launches before
// R24; a pair fused into one launch would be 216-264 CTAs of 330-400 KB each, one wave), and what one
// L2 round trip costs meanwhile (a 17th warp's chain of L2 hits), with the ring filled by cp.async or
// by Hopper's bulk copy engine. Every call reads fresh DRAM (calls rotate over buffers past the L2's
// size); CUDA graph of the calls, timed by events; GB/s and % of the device-to-device copy rate measured
// the same way.
//
//   nvcc -std=c++17 -O3 -arch=sm_90 -Inative/cuda bench/stream_probe.cu -o /tmp/stream_probe && /tmp/stream_probe
#include <algorithm>
#include <vector>

#include "probe.cuh"

constexpr int WARPS = 16;

// Hopper's bulk copy engine (sm_90; nothing below, where only the cp.async ring runs): one 512-byte
// block into shared memory, completing on an mbarrier (PTX ISA, cp.async.bulk and mbarrier).
__device__ __forceinline__ void mbar_init(uint32_t bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(bar));
#endif
}
__device__ __forceinline__ void bulk512(uint32_t dst, const void* src, uint32_t bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], 512;\n" ::"r"(bar) : "memory");
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], 512, [%2];\n" ::"r"(dst),
               "l"(src), "r"(bar)
               : "memory");
#endif
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t phase) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "{\n .reg .pred p;\n W: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n @!p bra W;\n}\n" ::"r"(bar),
      "r"(phase)
      : "memory");
#endif
}

// blocks: 512-byte blocks per warp (a warp's share, contiguous). DU: the ring's depth, blocks per warp.
// BULK: the ring filled by the bulk copy engine (one request a block by lane 0, an mbarrier a slot) in
// place of 32 lanes' cp.async. A 17th warp (every launch has it) streams nothing: its lane 0 walks
// `hops` dependent 4-byte loads (.cg: from L2) through a small cycle every CTA reads, while the ring
// streams, and leaves the mean ns a hop in lat[CTA]: what one round trip of the decode kernel's control
// loads (an expert id, a count, x) costs under the stream.
template <int DU, bool BULK>
__global__ void __launch_bounds__(WARPS * 32 + 32, 2)
    stream(const uint4* w, int blocks, unsigned* sink, const unsigned* chase, int hops, float* lat) {
  extern __shared__ __align__(16) uint8_t smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (warp == WARPS) {  // the chase warp
    if (lane == 0) {
      unsigned cur = blockIdx.x & 1023, t0, t1;
      asm volatile("mov.u32 %0, %%globaltimer_lo;" : "=r"(t0));
      for (int h = 0; h < hops; ++h) cur = __ldcg(chase + cur);
      asm volatile("mov.u32 %0, %%globaltimer_lo;" : "=r"(t1));
      lat[blockIdx.x] = (float)(t1 - t0) / hops;
      if (cur == 0xffffffffu) sink[blockIdx.x] = cur;
    }
    return;
  }
  const uint4* src = w + ((size_t)(blockIdx.x * WARPS + warp) * blocks) * 32 + lane;
  const uint32_t ring = m3e::smem_u32(smem) + (warp * DU * 32 + lane) * 16;
  unsigned acc = 0;
  if constexpr (BULK) {
    const uint32_t slot0 = m3e::smem_u32(smem) + warp * DU * 512;
    const uint32_t bar0 = m3e::smem_u32(smem) + WARPS * DU * 512 + warp * DU * 8;
    const uint4* wsrc = src - lane;
    if (lane == 0) {
#pragma unroll
      for (int u = 0; u < DU; ++u) mbar_init(bar0 + u * 8);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");  // the inits, before the engine's use
#endif
#pragma unroll
      for (int u = 0; u < DU; ++u)
        if (u < blocks) bulk512(slot0 + u * 512, wsrc + u * 32, bar0 + u * 8);
    }
    __syncwarp();
    for (int i0 = 0; i0 < blocks; i0 += DU) {
      const uint32_t phase = (i0 / DU) & 1;
#pragma unroll
      for (int u = 0; u < DU; ++u) {
        if (i0 + u < blocks) {
          mbar_wait(bar0 + u * 8, phase);
          const uint4 v = m3e::lds_u4(ring + u * 512);
          acc ^= v.x + v.y * 3u + v.z * 5u + v.w * 7u;
          __syncwarp();  // every lane has read the slot before it is refilled
          if (lane == 0 && i0 + u + DU < blocks)
            bulk512(slot0 + u * 512, wsrc + (size_t)(i0 + u + DU) * 32, bar0 + u * 8);
        }
      }
    }
  } else {
    ring_first<DU>(ring, src, blocks);
    acc = ring_rest<DU>(ring, src, blocks, acc);
  }
  if (acc == 0x9e3779b9u) sink[blockIdx.x] = acc;  // (never, in practice: keeps the loads alive)
}

// us a call: `calls` launches captured in a graph, rotating over `sets` buffers of `bytes`
template <typename Launch>
static float time_graph(Launch launch, int sets, int calls, cudaStream_t s) {
  return graph_us([&] { for (int c = 0; c < calls; ++c) launch(c % sets); }, s, 5) / calls;
}

int main() {
  int dev = 0, sms = 0, l2 = 0;
  CK(cudaGetDevice(&dev));
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  CK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));
  cudaStream_t s;
  CK(cudaStreamCreate(&s));
  // the M3-Lite MoE pair at one token: 9 experts x 9.73 MB (rounded to whole warps' shares below)
  const size_t total = 9ull * 9732096;
  const int sets = 6;  // 6 x 87.6 MB rotating, past a 50 MB L2
  uint4* w = nullptr;
  const size_t cap = total + (64u << 20);
  CK(cudaMalloc(&w, cap * sets));
  fill<<<1024, 256>>>(reinterpret_cast<uint32_t*>(w), cap * sets / 4);
  unsigned* sink = nullptr;
  CK(cudaMalloc(&sink, 1 << 20));
  CK(cudaDeviceSynchronize());

  // the copy rate, as bench/kernels.py measures it (one set copied into the next)
  const float copy_us = time_graph(
      [&](int i) {
        CK(cudaMemcpyAsync(reinterpret_cast<char*>(w) + ((i + 1) % sets) * cap, reinterpret_cast<char*>(w) + i * cap,
                           total, cudaMemcpyDeviceToDevice, s));
      },
      sets, 24, s);
  const double copy_gbs = 2.0 * total / (copy_us * 1e3);  // read + write
  printf("device: %d SMs, L2 %d MB; copy of %.1f MB: %.1f us = %.0f GB/s (read + write)\n", sms, l2 >> 20,
         total / 1e6, copy_us, copy_gbs);
  // the chase: one cycle through 1024 words (random order, 4 KB: L2-resident once walked)
  std::vector<unsigned> cyc(1024), order(1024);
  for (int i = 0; i < 1024; ++i) order[i] = i;
  srand(7);
  for (int i = 1023; i > 0; --i) std::swap(order[i], order[rand() % (i + 1)]);
  for (int i = 0; i < 1024; ++i) cyc[order[i]] = order[(i + 1) % 1024];
  unsigned* chase = nullptr;
  float* lat = nullptr;
  CK(cudaMalloc(&chase, 1024 * 4));
  CK(cudaMalloc(&lat, 8192 * 4));
  CK(cudaMemcpy(chase, cyc.data(), 1024 * 4, cudaMemcpyHostToDevice));
  const int hops = 8;

  printf("| ring | CTAs | KB a CTA | blocks a warp in flight | us | GB/s | %% of copy | L2 hop ns under it "
         "(median / p90) |\n|---|---|---|---|---|---|---|---|\n");
  auto run = [&](int ctas, int du, bool bulk, bool idle) {
    const int blocks = idle ? 0 : (int)(total / 512 / ((size_t)ctas * WARPS));  // per warp
    const size_t bytes = (size_t)ctas * WARPS * blocks * 512;
    const int smem = WARPS * du * (512 + 8);
    float us = 0;
    std::vector<float> l(ctas);
    auto go = [&](auto kern) {
      CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      auto launch = [&](int i) {
        kern<<<ctas, WARPS * 32 + 32, smem, s>>>(
            reinterpret_cast<const uint4*>(reinterpret_cast<char*>(w) + i * cap), blocks, sink, chase, hops, lat);
        CK(cudaGetLastError());
      };
      us = time_graph(launch, sets, 24, s);
      launch(0);  // one more call, eagerly, for the chase's times (set 0: the least recently read)
      CK(cudaMemcpy(l.data(), lat, ctas * 4, cudaMemcpyDeviceToHost));
    };
    if (bulk) {
      if (du == 4) go(stream<4, true>);
      else if (du == 8) go(stream<8, true>);
      else go(stream<2, true>);
    } else {
      if (du == 4) go(stream<4, false>);
      else if (du == 8) go(stream<8, false>);
      else go(stream<2, false>);
    }
    std::sort(l.begin(), l.end());
    const double gbs = bytes / (us * 1e3);
    if (idle)
      printf("| (none) | %d | 0 | - | %.1f | - | - | %.0f / %.0f |\n", ctas, us, l[ctas / 2], l[ctas * 9 / 10]);
    else
      printf("| %s | %d | %.0f | %d | %.1f | %.0f | %.0f %% | %.0f / %.0f |\n", bulk ? "bulk copy" : "cp.async", ctas,
             bytes / 1024.0 / ctas, du, us, gbs, 100.0 * gbs / copy_gbs, l[ctas / 2], l[ctas * 9 / 10]);
  };
  // the chase alone; then the pair's two launches' shapes (as if their bytes streamed with no
  // dependency), a fused pair's one wave (216: 24 CTAs a pair of 8 slabs; 264: every slot), many small
  // CTAs (the lm_head's kind), each through both rings
  run(264, 4, false, true);
  for (bool bulk : {false, true}) {
    for (int ctas : {216, 264, 432, 720, 4224}) run(ctas, 4, bulk, false);
    run(264, 2, bulk, false);
    run(264, 8, bulk, false);
  }
  return 0;
}

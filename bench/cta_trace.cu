// CTA timelines of the decode kernel's and the decode attention's launches (a profiling tool, not a
// test): the kernels built with -DM3E_TRACE (trace.cuh: per CTA, entry / its wait done / main phase
// start / its end / exit in globaltimer ns, its SM, kind and block index), run as CUDA graphs the way
// bench/kernels.py times them (calls over rotating weight sets or routings, so every call reads
// DRAM), one replay traced. Torch-free: the kernels' C API only, random weights made on the GPU.
//
//   nvcc -std=c++17 -O3 -DM3E_TRACE -arch=sm_90 -Inative/cuda bench/cta_trace.cu -o /tmp/cta_trace
//   /tmp/cta_trace OUT_DIR        # writes OUT_DIR/trace_<case>.csv, one line per CTA
//   python3 bench/cta_trace.py OUT_DIR   # the summary: phases, concurrency, bandwidth over time
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

// one translation unit, so that the trace buffer is one symbol
#include "moe.cu"
#include "moe_bf16.cu"
#include "moe_f16.cu"
#include "w4a16.cu"
#include "w4a16_bf16.cu"
#include "w4a16_f16.cu"
#include "decode_ops.cu"

static void fail(const char* file, int line, const char* what, const char* msg) {
  fprintf(stderr, "%s:%d %s: %s\n", file, line, what, msg);
  exit(1);
}
#define CK(x)                                                                   \
  do {                                                                          \
    const cudaError_t e_ = (x);                                                 \
    if (e_ != cudaSuccess) fail(__FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
  } while (0)
#define OK(x)                                                                  \
  do {                                                                         \
    const int r_ = (x);                                                        \
    if (r_ != M3E_OK) fail(__FILE__, __LINE__, #x, m3e_error_string(r_));      \
  } while (0)

// random 32-bit words (weights: random nibbles), or 16-bit values in [lo, hi) as bf16 (scales, x)
__global__ void fill_bits(uint32_t* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    uint32_t h = (uint32_t)i * 2654435761u ^ seed;
    h ^= h >> 15, h *= 2246822519u, h ^= h >> 13, h *= 3266489917u, h ^= h >> 16;
    p[i] = h;
  }
}
__global__ void fill_bf16(uint16_t* p, size_t n, float lo, float hi, uint32_t seed) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    uint32_t h = (uint32_t)i * 2654435761u ^ seed;
    h ^= h >> 15, h *= 2246822519u, h ^= h >> 13;
    const float v = lo + (hi - lo) * (h & 0xffffff) / 16777216.f;
    p[i] = __bfloat16_as_ushort(__float2bfloat16(v));
  }
}

template <typename T>
static T* dalloc(size_t n) {
  T* p;
  CK(cudaMalloc(&p, n * sizeof(T)));
  CK(cudaMemset(p, 0, n * sizeof(T)));
  return p;
}
static uint32_t* rand_words(size_t n, uint32_t seed) {
  auto* p = dalloc<uint32_t>(n);
  fill_bits<<<1024, 256>>>(p, n, seed);
  return p;
}
static uint16_t* rand_bf16(size_t n, float lo, float hi, uint32_t seed) {
  auto* p = dalloc<uint16_t>(n);
  fill_bf16<<<1024, 256>>>(p, n, lo, hi, seed);
  return p;
}

// calls(i) for i < n captured twice in one graph, replayed warm; then one traced replay to OUT/trace_name.csv
template <class F>
static void trace_case(const char* name, const char* out_dir, int n, F&& call, cudaStream_t s) {
  cudaGraph_t g;
  cudaGraphExec_t ge;
  for (int i = 0; i < n; ++i) call(i);  // once eagerly (plans, shared-memory opt-ins)
  CK(cudaStreamSynchronize(s));
  CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  for (int r = 0; r < 2; ++r)
    for (int i = 0; i < n; ++i) call(i);
  CK(cudaStreamEndCapture(s, &g));
  CK(cudaGraphInstantiate(&ge, g, 0));
  for (int r = 0; r < 3; ++r) CK(cudaGraphLaunch(ge, s));
  CK(cudaStreamSynchronize(s));
  const unsigned zero = 0;
  CK(cudaMemcpyToSymbol(m3e_trace_n, &zero, sizeof zero));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  CK(cudaEventRecord(e0, s));
  CK(cudaGraphLaunch(ge, s));
  CK(cudaEventRecord(e1, s));
  CK(cudaStreamSynchronize(s));
  float ms = 0;
  CK(cudaEventElapsedTime(&ms, e0, e1));
  unsigned cnt = 0;
  CK(cudaMemcpyFromSymbol(&cnt, m3e_trace_n, sizeof cnt));
  const unsigned cap = TRACE_CAP;
  if (cnt > cap) cnt = cap;
  std::vector<unsigned long long> buf(cnt * 8);
  CK(cudaMemcpyFromSymbol(buf.data(), m3e_trace_buf, buf.size() * sizeof(unsigned long long)));
  const std::string path = std::string(out_dir) + "/trace_" + name + ".csv";
  FILE* f = fopen(path.c_str(), "w");
  if (!f) {
    perror(path.c_str());
    exit(1);
  }
  fprintf(f, "t_entry,t_wait,t_loop,t_loop_end,t_exit,sm,epi,bx,by\n");
  for (unsigned i = 0; i < cnt; ++i) {
    const unsigned long long* r = &buf[i * 8];
    fprintf(f, "%llu,%llu,%llu,%llu,%llu,%llu,%llu,%llu,%llu\n", r[0], r[1], r[2], r[3], r[4], r[5], r[6],
            r[7] & 0xffffffffu, r[7] >> 32);
  }
  fclose(f);
  printf("%s: %d calls, %.1f us a call (event time of the traced replay), %u CTAs -> %s\n", name, 2 * n,
         ms * 1e3f / (2 * n), cnt, path.c_str());
  CK(cudaGraphExecDestroy(ge));
  CK(cudaGraphDestroy(g));
}

// one token's GEMM, M = 1, int4 g128 symmetric, bf16, n_sets weight sets in turn
static void gemm_case(const char* name, const char* out_dir, int K, int N, int n_sets, int sms, cudaStream_t s) {
  m3e_w4a16_plan_t plan;
  OK(m3e_w4a16_plan(1, N, K, 128, 0, sms, 0, 0, &plan));
  std::vector<uint32_t*> w;
  std::vector<uint16_t*> sc;
  for (int i = 0; i < n_sets; ++i) {
    w.push_back(rand_words((size_t)N * K / 8, 11 + i));
    sc.push_back(rand_bf16((size_t)N * (K / 128), 0.001f, 0.02f, 101 + i));
  }
  uint16_t* x = rand_bf16(K, -1.f, 1.f, 7);
  uint16_t* out = dalloc<uint16_t>(N);
  float* ws = plan.workspace_floats ? dalloc<float>(plan.workspace_floats) : nullptr;
  int* cnt = plan.n_counters ? dalloc<int>(plan.n_counters) : nullptr;
  trace_case(name, out_dir, n_sets, [&](int i) {
    m3e_w4a16_args a = {};
    a.x = x, a.w = w[i], a.scales = sc[i], a.out = out, a.workspace = ws, a.counters = cnt;
    a.M = 1, a.N = N, a.K = K, a.group = 128, a.G = K / 128, a.act_bf16 = 1, a.scale_bf16 = 1;
    a.splits = plan.splits, a.n_tile = plan.n_tile;
    OK(m3e_w4a16_gemm(&a, s));
  }, s);
  printf("  plan: n_tile %d, splits %d, grid %d\n", plan.n_tile, plan.splits, plan.grid_x);
  for (auto* p : w) CK(cudaFree(p));
  for (auto* p : sc) CK(cudaFree(p));
}

// the fused MoE at one token, M3-Lite experts (E = 48, H = 4096, I = 1536, g128), `slots` pairs, six
// routings in turn (distinct experts each), with the gate+up RMSNorm as the runtime calls it
// pre: the last slot pre-routed (the runtime's shared expert, m3e_moe_args.pre_routed; no routing kernel
// here, so no early flag: its CTAs only run first)
static void moe_case(const char* name, const char* out_dir, int slots, int ns_gu, int ns_dn, cudaStream_t s,
                     bool pre = false) {
  const int E = 48, H = 4096, I = 1536, n_sets = 6;
  m3e_moe_plan_t plan;
  OK(m3e_moe_plan(1, slots, E, H, I, 128, 0, ns_gu, ns_dn, 0, &plan));
  uint32_t* w_gu = rand_words((size_t)E * 2 * I * H / 8, 1);
  uint16_t* s_gu = rand_bf16((size_t)E * 2 * I * (H / 128), 0.001f, 0.02f, 2);
  uint32_t* w_dn = rand_words((size_t)E * H * I / 8, 3);
  uint16_t* s_dn = rand_bf16((size_t)E * H * (I / 128), 0.001f, 0.02f, 4);
  uint16_t* x = rand_bf16(H, -1.f, 1.f, 5);
  uint16_t* nw = rand_bf16(H, 0.5f, 1.5f, 6);
  uint16_t* out = dalloc<uint16_t>(H);
  uint16_t* inter = dalloc<uint16_t>((size_t)slots * I);
  int* rows = dalloc<int>(slots);
  int* tiles = dalloc<int>((size_t)(plan.tiles_gu + plan.tiles_dn) * 4);
  float* sl = dalloc<float>(plan.slot_floats);
  int* cnt = dalloc<int>(plan.n_counters);
  std::vector<int> h_ids;
  srand(1);
  for (int r = 0; r < n_sets; ++r) {
    std::vector<int> perm(E);
    for (int e = 0; e < E; ++e) perm[e] = e;
    for (int e = E - 1; e > 0; --e) std::swap(perm[e], perm[rand() % (e + 1)]);
    h_ids.insert(h_ids.end(), perm.begin(), perm.begin() + slots);
  }
  int* ids = dalloc<int>(h_ids.size());
  CK(cudaMemcpy(ids, h_ids.data(), h_ids.size() * sizeof(int), cudaMemcpyHostToDevice));
  std::vector<float> h_w(slots, 1.f / slots);
  float* wts = dalloc<float>(slots);
  CK(cudaMemcpy(wts, h_w.data(), slots * sizeof(float), cudaMemcpyHostToDevice));
  trace_case(name, out_dir, n_sets, [&](int i) {
    m3e_moe_args a = {};
    a.x = x, a.ids = ids + i * slots, a.weights = wts, a.w_gu = w_gu, a.s_gu = s_gu, a.w_dn = w_dn, a.s_dn = s_dn;
    a.out = out, a.inter = inter, a.rows = rows, a.tiles = tiles, a.slots = sl, a.counters = cnt;
    a.T = 1, a.topk = slots, a.E = E, a.H = H, a.I = I, a.group = 128, a.act_bf16 = 1, a.scale_bf16 = 1;
    a.weights_f32 = 1, a.ns_gu = ns_gu, a.ns_dn = ns_dn, a.norm_w = nw, a.norm_eps = 1e-5f;
    a.pre_routed = pre, a.pre_id = E - 1;
    OK(m3e_moe_w4a16(&a, s));
  }, s);
  printf("  plan: ns_gu %d, ns_dn %d\n", plan.ns_gu, plan.ns_dn);
  for (void* p : {(void*)w_gu, (void*)s_gu, (void*)w_dn, (void*)s_dn}) CK(cudaFree(p));
}

// one token's decode attention, M3-Lite heads (32 q / 4 kv, head_dim 128, q/k norm), bf16, `keys`
// slots (the new token at the last), `layers` caches in turn as a decode step's layers (bench/attn_decode.py)
static void attn_case(const char* name, const char* out_dir, int keys, int layers, cudaStream_t s) {
  const int nh = 32, nkv = 4, D = 128;
  int splits = 0, chunk = 0;
  OK(m3e_attn_plan(keys, D, &splits, &chunk));
  uint16_t* qkv = rand_bf16((size_t)(nh + 2 * nkv) * D, -1.f, 1.f, 7);
  uint16_t* qn = rand_bf16(D, 0.9f, 1.1f, 8);
  uint16_t* kn = rand_bf16(D, 0.9f, 1.1f, 9);
  uint16_t* cs = rand_bf16(D, -1.f, 1.f, 10);
  uint16_t* sn = rand_bf16(D, -1.f, 1.f, 11);
  uint16_t* out = dalloc<uint16_t>((size_t)nh * D);
  std::vector<uint16_t*> kc, vc;
  for (int l = 0; l < layers; ++l) {
    kc.push_back(rand_bf16((size_t)nkv * keys * D, -1.f, 1.f, 100 + l));
    vc.push_back(rand_bf16((size_t)nkv * keys * D, -1.f, 1.f, 200 + l));
  }
  float* ws = dalloc<float>((size_t)nh * M3E_ATTN_MAX_SPLITS * (D + 2));
  int* cnt = dalloc<int>(nkv);
  CK(cudaMemset(cnt, 0, nkv * sizeof(int)));
  trace_case(name, out_dir, layers, [&](int i) {
    m3e_attn_args a = {};
    a.qkv = qkv, a.q_norm = qn, a.k_norm = kn, a.cos = cs, a.sin = sn, a.out = out;
    a.k_cache = kc[i], a.v_cache = vc[i], a.workspace = ws, a.counters = cnt;
    a.pos0 = keys - 1, a.keys = keys, a.splits = splits, a.chunk = chunk, a.nh = nh, a.nkv = nkv, a.D = D;
    a.cap = keys, a.act_bf16 = 1, a.eps = 1e-6f;
    OK(m3e_attn_decode(&a, s));
  }, s);
  printf("  plan: %d chunks of %d slots\n", splits, chunk);
  for (int l = 0; l < layers; ++l) {
    CK(cudaFree(kc[l]));
    CK(cudaFree(vc[l]));
  }
}

int main(int argc, char** argv) {
  const char* out_dir = argc > 1 ? argv[1] : ".";
  int dev = 0, sms = 0;
  CK(cudaGetDevice(&dev));
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, dev));
  printf("device: %s, %d SMs\n", prop.name, sms);
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  attn_case("attn_256", out_dir, 256, 16, s);
  attn_case("attn_64", out_dir, 64, 16, s);
  moe_case("moe9", out_dir, 9, 0, 0, s);
  moe_case("moe9_pre", out_dir, 9, 0, 0, s, true);
  moe_case("moe8", out_dir, 8, 0, 0, s);
  moe_case("moe9_8_8", out_dir, 9, 8, 8, s);
  gemm_case("gemm_4096x14336", out_dir, 4096, 14336, 5, sms, s);
  gemm_case("gemm_4096x4096", out_dir, 4096, 4096, 15, sms, s);
  gemm_case("gemm_14336x4096", out_dir, 14336, 4096, 5, sms, s);
  gemm_case("gemm_4096x151936", out_dir, 4096, 151936, 1, sms, s);
  return 0;
}

// The small ops of a decode step, fused (m3e_api.cuh: m3e_route, m3e_rope_qkv). Run by eager torch
// they were ~25 elementwise, sort and gather launches per layer (routing) and ~20 (q/k norm, RoPE,
// cache writes), 1-4 us each at one token: more time than the layer's int4 GEMMs (NOTES.md).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>

#include "m3e_api.cuh"
#include "ptx.cuh"
#include "trace.cuh"

namespace m3e {
namespace ops {

template <bool BF16>
struct Act;
template <>
struct Act<true> {
  using T = __nv_bfloat16;
  static __device__ __forceinline__ float f(T v) { return __bfloat162float(v); }
  static __device__ __forceinline__ T t(float v) { return __float2bfloat16(v); }
};
template <>
struct Act<false> {
  using T = __half;
  static __device__ __forceinline__ float f(T v) { return __half2float(v); }
  static __device__ __forceinline__ T t(float v) { return __float2half(v); }
};

// q / k RMS norm and RoPE with the reference's roundings (F.rms_norm: one rounding of x r w; RoPE:
// x c and rotate_half(x) s each rounded, then their sum), shared by rope_qkv_kernel and the decode
// attention's prologue, whose outputs must agree bit for bit.
template <class A>
__device__ __forceinline__ float norm_rounded(float v, float r, float w) {
  return A::f(A::t(v * r * w));
}
template <class A>
__device__ __forceinline__ typename A::T rope_rounded(float v, float partner, float c, float s) {
  return A::t(A::f(A::t(v * c)) + A::f(A::t(partner * s)));
}

constexpr int MAX_EXPERTS = 256;  // 8 per lane of the selecting warp
constexpr int MAX_TOPK = 16;

// The two bf16 / fp16 values of a 32-bit word as floats (lo = the first in memory).
__device__ __forceinline__ void pair(uint32_t u, float& lo, float& hi, bool bf16) {
  if (bf16) {
    lo = __uint_as_float(u << 16);
    hi = __uint_as_float(u & 0xffff0000u);
  } else {
    lo = __half2float(__ushort_as_half((unsigned short)(u & 0xffffu)));
    hi = __half2float(__ushort_as_half((unsigned short)(u >> 16)));
  }
}

__device__ __forceinline__ float dot8(uint4 a, uint4 b, bool bf16) {
  float s = 0.f, a0, a1, b0, b1;
  const uint32_t av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    pair(av[i], a0, a1, bf16);
    pair(bv[i], b0, b1, bf16);
    s = fmaf(a0, b0, s);
    s = fmaf(a1, b1, s);
  }
  return s;
}

// (value, expert) order of the top-k: larger value first, then the lower expert id.
__device__ __forceinline__ bool better(float v, int e, float bv, int be) { return v > bv || (v == bv && e < be); }

// Top k of token t's logits by the CTA (NT threads), softmax, weights, ids. The logits were written
// by other CTAs of the launch: read through L2 into shared memory (sv). Each expert's place in the
// order (value, then the lower id: `better`) is counted by one thread against all E (no dependent
// shuffle chain: one warp picking the k best in turn took k rounds of a 5-level argmax, ~1 us at
// k = 8, NOTES.md R18); the k best land in their slots, then one warp takes the softmax as before.
template <bool BF16, int NT>
__device__ void route_select(const m3e_route_args& a, const float* logits, int t, float* sv, int* sel) {
  using A = Act<BF16>;
  const int tid = threadIdx.x, lane = tid % 32;
  // a NaN logit ranks as -inf, so `better` orders all E strictly: every expert gets its own place and
  // every slot below k <= E is filled
  for (int e = tid; e < a.E; e += NT) {
    const float v = __ldcg(logits + (size_t)t * a.E + e);
    sv[e] = isnan(v) ? -INFINITY : v;
  }
  __syncthreads();
  for (int e = tid; e < a.E; e += NT) {
    const float v = sv[e];
    int rank = 0;
#pragma unroll 4
    for (int f = 0; f < a.E; ++f) rank += better(sv[f], f, v, e);
    if (rank < a.k) sel[rank] = e;
  }
  __syncthreads();
  if (tid >= 32) return;
  float mx = -INFINITY, den = 0.f;
  if (!a.norm_topk) {  // softmax over all experts, then the top k of it (8 experts a lane, as summed before)
    float v[8];
#pragma unroll
    for (int r = 0; r < 8; ++r) {
      const int e = lane + 32 * r;
      v[r] = e < a.E ? sv[e] : -INFINITY;
    }
#pragma unroll
    for (int r = 0; r < 8; ++r) mx = fmaxf(mx, v[r]);
    for (int o = 16; o; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
#pragma unroll
    for (int r = 0; r < 8; ++r) den += lane + 32 * r < a.E ? expf(v[r] - mx) : 0.f;
    for (int o = 16; o; o >>= 1) den += __shfl_xor_sync(0xffffffffu, den, o);
  }
  const float top0 = sv[sel[0]];
  float sum = 0.f;
  if (a.norm_topk)
    for (int j = 0; j < a.k; ++j) sum += expf(sv[sel[j]] - top0);  // slot order
  const int width = a.k + (a.extra_id >= 0);
  if (lane < a.k) {
    const int my_id = sel[lane];
    const float my_val = sv[my_id];
    const float p = a.norm_topk ? expf(my_val - top0) / sum : expf(my_val - mx) / den;
    a.ids[(size_t)t * width + lane] = my_id;
    a.weights[(size_t)t * width + lane] = A::f(A::t(p * a.scale));
  }
  if (lane == 0 && a.extra_id >= 0) {
    a.ids[(size_t)t * width + a.k] = a.extra_id;
    a.weights[(size_t)t * width + a.k] = 1.f;
  }
}

// The two values as one 32-bit word of the activation type, each rounded once.
template <bool BF16>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  using A = Act<BF16>;
  const typename A::T l = A::t(lo), h = A::t(hi);
  return (uint32_t)reinterpret_cast<const uint16_t&>(l) | ((uint32_t)reinterpret_cast<const uint16_t&>(h) << 16);
}

// f over the eight element pairs of two 16-byte vectors, in fp32, each result rounded once.
template <bool BF16, typename F>
__device__ __forceinline__ uint4 zip8(uint4 a, uint4 b, F f) {
  const uint32_t av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
  uint32_t o[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    float a0, a1, b0, b1;
    pair(av[j], a0, a1, BF16);
    pair(bv[j], b0, b1, BF16);
    o[j] = pack2<BF16>(f(a0, b0), f(a1, b1));
  }
  return make_uint4(o[0], o[1], o[2], o[3]);
}

__device__ __forceinline__ float block_sum(float v, float* scratch) {
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = (blockDim.x + 31) / 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float s = 0.f;
  for (int i = 0; i < n_warps; ++i) s += scratch[i];
  return s;
}

// Router logits: grid (E, T), one CTA of LOGIT_WARPS warps per (expert, token) splitting H, every
// thread's 16-byte loads of x and the router row issued before the first is used, the warps'
// partial sums added in warp order. One warp per expert (all of H: 16 dependent rounds of 2 KB at
// H = 4096) took 6.9 us for E = 48 on the H100 whether two or eight shared a CTA (NOTES.md R4).
constexpr int LOGIT_WARPS = 4;
constexpr int LOGIT_ILP = 4;  // loads in flight per thread

template <bool BF16>
__global__ void __launch_bounds__(32 * LOGIT_WARPS) route_logits_kernel(m3e_route_args a, float* logits) {
  __shared__ float part[LOGIT_WARPS];
  pdl_launch_dependents();  // sm_90 dependents (the MoE's first launch) may start; they wait for this grid
  pdl_wait();               // launched as a dependent: x is the kernel before's output
  const int t = blockIdx.y, e = blockIdx.x, tid = threadIdx.x, lane = tid % 32;
  if (a.early && e == 0 && t == 0 && tid == 0) {  // x is settled: the MoE's pre-routed pair may start
    __threadfence();
    st_release(a.early, 1);
  }
  constexpr int NT = 32 * LOGIT_WARPS;
  const int64_t m = a.modality[t];
  const uint4* x = reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(a.x) + (size_t)t * a.H);
  const uint4* g = static_cast<const uint4*>(a.norm_w);
  const uint4* w = m >= 0 && m < a.R
                       ? reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(a.routers) + ((size_t)m * a.E + e) * a.H)
                       : nullptr;
  const int n = a.H / 8;
  // H <= 4096 (NOTES.md R16): the row's x, norm weights and router values in registers from one round
  // of loads, used by both the sum of squares and the dot product (it was a dependent L2 round trip per
  // NT vectors of the sum of squares, then one more for the dot); the same sums in the same order
  const bool one = n <= NT * LOGIT_ILP;
  uint4 xv[LOGIT_ILP], wv[LOGIT_ILP], gv[LOGIT_ILP];
  auto load = [&](int i0) {  // vectors i0, i0 + NT, ...: every load issued before the first is used
#pragma unroll
    for (int u = 0; u < LOGIT_ILP; ++u) {
      const int i = i0 + u * NT;
      xv[u] = i < n ? x[i] : make_uint4(0, 0, 0, 0);
      gv[u] = g && i < n ? g[i] : make_uint4(0, 0, 0, 0);
      wv[u] = w && i < n ? w[i] : make_uint4(0, 0, 0, 0);
    }
  };
  if (one) load(tid);
  float r = 0.f;  // with norm_w: the row's rms factor (every CTA of the token computes the same)
  if (g) {
    __shared__ float scratch[LOGIT_WARPS];
    float ss = 0.f;
    if (one) {
#pragma unroll
      for (int u = 0; u < LOGIT_ILP; ++u) ss += dot8(xv[u], xv[u], BF16);  // zero past the row
    } else {
#pragma unroll 1
      for (int i = tid; i < n; i += NT) ss += dot8(x[i], x[i], BF16);
    }
    r = rsqrtf(block_sum(ss, scratch) / a.H + a.norm_eps);
  }
  float s = 0.f;
  if (w) {
    for (int i0 = tid; i0 < n; i0 += NT * LOGIT_ILP) {
      if (!one) load(i0);
#pragma unroll
      for (int u = 0; u < LOGIT_ILP; ++u) {
        if (g) xv[u] = zip8<BF16>(xv[u], gv[u], [r](float v, float w) { return v * r * w; });  // m3e_rmsnorm's
        s += dot8(xv[u], wv[u], BF16);
      }
    }
    for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  }
  if (lane == 0) part[tid / 32] = s;
  __syncthreads();
  __shared__ int s_last;
  if (tid == 0) {
    float v = 0.f;
#pragma unroll
    for (int i = 0; i < LOGIT_WARPS; ++i) v += part[i];
    logits[(size_t)t * a.E + e] = (a.n_fusion && !a.fusion_ok[t] && e >= a.E - a.n_fusion) ? -INFINITY : v;
    // the token's last CTA to arrive selects (the split-K fixup's fence pattern), and zeroes the counter
    __threadfence();
    s_last = atomicAdd(a.counters + t, 1) == a.E - 1;
    if (s_last) a.counters[t] = 0;
    __threadfence();
  }
  __syncthreads();
  if (s_last) {  // (uniform in the CTA)
    __shared__ float sv[MAX_EXPERTS];
    __shared__ int sel[MAX_TOPK];
    route_select<BF16, NT>(a, logits, t, sv, sel);
  }
}

// RMSNorm of each row (F.rms_norm: fp32 throughout, one rounding): grid T, 16-byte vectors. With a
// residual `res`, x is first replaced by x + res rounded to the activation type (torch's add), in
// place, and that sum is normed: the residual add before a norm in one launch.
template <bool BF16>
__global__ void __launch_bounds__(256) rmsnorm_kernel(void* x_, const void* res_, const void* w_, void* out_, int H,
                                                      float eps) {
  __shared__ float scratch[8];
  pdl_launch_dependents();  // the next GEMM may start streaming its weights (it waits for this grid)
  pdl_wait();
  const int t = blockIdx.x;
  uint4* x = reinterpret_cast<uint4*>(static_cast<uint16_t*>(x_) + (size_t)t * H);
  float ss = 0.f;
  if (res_) {
    const uint4* res = reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(res_) + (size_t)t * H);
    for (int i = threadIdx.x; i < H / 8; i += blockDim.x) {
      const uint4 sv = zip8<BF16>(x[i], res[i], [](float a, float b) { return a + b; });
      x[i] = sv;  // this thread reads it back below: no barrier needed
      ss += dot8(sv, sv, BF16);
    }
  } else {
    for (int i = threadIdx.x; i < H / 8; i += blockDim.x) ss += dot8(x[i], x[i], BF16);
  }
  const float r = rsqrtf(block_sum(ss, scratch) / H + eps);
  const uint4* w = reinterpret_cast<const uint4*>(w_);
  uint4* out = reinterpret_cast<uint4*>(static_cast<uint16_t*>(out_) + (size_t)t * H);
  for (int i = threadIdx.x; i < H / 8; i += blockDim.x)
    out[i] = zip8<BF16>(x[i], w[i], [r](float a, float b) { return a * r * b; });
}

template <bool BF16>
__global__ void rope_qkv_kernel(m3e_rope_args a) {
  using A = Act<BF16>;
  using T = typename A::T;
  __shared__ float rotated[512];  // [D] normed values, for rotate_half's partner
  __shared__ float scratch[16];
  const int h = blockIdx.x, t = blockIdx.y, d = threadIdx.x, D = a.D, half = D / 2;
  pdl_launch_dependents();
  pdl_wait();
  const T* row = static_cast<const T*>(a.qkv) + (size_t)t * (a.nh + 2 * a.nkv) * D;
  const int slot = (a.pos_dev ? (int)a.pos_dev[0] : a.pos0) + t;
  if (h >= a.nh + a.nkv) {  // a v head: straight into the cache
    const int hv = h - a.nh - a.nkv;
    static_cast<T*>(a.v_cache)[((size_t)hv * a.cap + slot) * D + d] = row[(size_t)h * D + d];
    return;
  }
  const bool is_q = h < a.nh;
  float v = A::f(row[(size_t)h * D + d]);
  const T* nw = static_cast<const T*>(is_q ? a.q_norm : a.k_norm);
  if (nw) {  // F.rms_norm: fp32 throughout, one rounding
    const float ss = block_sum(v * v, scratch);
    v = norm_rounded<A>(v, rsqrtf(ss / D + a.eps), A::f(nw[d]));
  }
  rotated[d] = v;
  __syncthreads();
  const float c = A::f(static_cast<const T*>(a.cos)[(size_t)t * D + d]);
  const float s = A::f(static_cast<const T*>(a.sin)[(size_t)t * D + d]);
  const float partner = d < half ? -rotated[d + half] : rotated[d - half];
  const T out = rope_rounded<A>(v, partner, c, s);
  if (is_q)
    static_cast<T*>(a.q_out)[((size_t)h * a.T + t) * D + d] = out;
  else
    static_cast<T*>(a.k_cache)[((size_t)(h - a.nh) * a.cap + slot) * D + d] = out;
}


// Decode attention (m3e_attn_decode): grid (nkv, splits), ATT_THREADS threads. A CTA serves the G =
// nh / nkv q heads of one kv head over one chunk of slots, one warp per q head. Its chunk's old slots
// (K and V) are copied into shared memory (cp.async) before the programmatic-dependent wait, so they
// overlap the kernel before; the prologue then recomputes the new token's q (G heads) and k as
// rope_qkv_kernel does (RMS norm, RoPE, each step rounded to the activation type) and puts k and v in
// the chunk's row for pos (the chunk holding pos also writes them to the cache; no CTA reads pos from
// the cache). Each warp runs an online softmax in fp32 over its lane groups (D / 8 lanes a key),
// merged by shuffles; with splits > 1 the chunks' partials are merged in chunk order by the kv head's
// last CTA. The next launch (the o GEMM) may start streaming its weights at once.
constexpr int ATT_WARPS = 8;  // one q head a warp
constexpr int ATT_THREADS = 32 * ATT_WARPS;
constexpr int ATT_MAXG = ATT_WARPS;
constexpr int ATT_MAXD = 256;
constexpr int ATT_KV_BYTES = 32 << 10;  // a chunk's K and V in shared memory: 8192 / D slots at most
constexpr int ATT_KPT = 4;              // key steps a warp loads together

template <bool BF16>
__global__ void __launch_bounds__(ATT_THREADS) attn_decode_kernel(const m3e_attn_args a) {
  using A = Act<BF16>;
  using T = typename A::T;
  // K [chunk][D] then V [chunk][D] of this chunk's slots (the new one from the prologue); at the end
  // the chunk merge's scratch
  __shared__ __align__(16) uint8_t kvs[ATT_KV_BYTES];
  // the inputs as stored: the group's q rows, k, v, then cos, sin, q_norm, k_norm (rows of D)
  __shared__ __align__(16) T in[(ATT_MAXG + 6) * ATT_MAXD];
  __shared__ __align__(16) T qs[ATT_MAXG * ATT_MAXD];  // the group's q rows, normed and roped
  __shared__ float rf[ATT_MAXG + 1];                    // rms factors of those q rows and of k
  __shared__ int s_last;
#ifdef M3E_TRACE
  __shared__ unsigned long long s_trace[4];
  M3E_STAMP(0)
#endif
  const int hk = blockIdx.x, split = blockIdx.y, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int D = a.D, ld = __ffs(D) - 1, half = D >> 1, G = a.nh / a.nkv, vpr = D >> 3, lv = ld - 3;
  const int C = a.chunk, c0 = split * C;
  T* ks = reinterpret_cast<T*>(kvs);
  T* vs = ks + C * D;
  const T* kc = static_cast<const T*>(a.k_cache) + (size_t)hk * a.cap * D;
  const T* vc = static_cast<const T*>(a.v_cache) + (size_t)hk * a.cap * D;
  // pos is a static input of the launch (set before a graph replay or passed by value), and the slots
  // before it were written by earlier steps: both may be read before the wait
  const int pos = a.pos_dev ? (int)a.pos_dev[0] : a.pos0;
  const int n_old = max(0, min(c0 + C, pos) - c0), n = max(0, min(c0 + C, pos + 1) - c0);
  pdl_launch_dependents();
  // 1. the chunk's old slots, requested before the wait (they overlap the kernel before's end)
#pragma unroll 1
  for (int i = tid; i < 2 * n_old * vpr; i += ATT_THREADS) {
    const bool v = i >= n_old * vpr;
    const int r = v ? i - n_old * vpr : i, j = r >> lv, c = (r & (vpr - 1)) * 8;
    cp_async16((v ? vs : ks) + j * D + c, (v ? vc : kc) + (size_t)(c0 + j) * D + c);
  }
  cp_async_commit();
  pdl_wait();
  M3E_STAMP(1)
  // 2. this token's rows: 0..G-1 q, G k, G+1 v, G+2 cos, G+3 sin, G+4 q_norm, G+5 k_norm
  {
    const T* row = static_cast<const T*>(a.qkv);
#pragma unroll 1
    for (int i = tid; i < (G + 6) * vpr; i += ATT_THREADS) {
      const int r = i >> lv, c = (i & (vpr - 1)) * 8;
      const T* src = r < G       ? row + (size_t)(hk * G + r) * D
                     : r == G     ? row + (size_t)(a.nh + hk) * D
                     : r == G + 1 ? row + (size_t)(a.nh + a.nkv + hk) * D
                     : r == G + 2 ? static_cast<const T*>(a.cos)
                     : r == G + 3 ? static_cast<const T*>(a.sin)
                     : r == G + 4 ? static_cast<const T*>(a.q_norm)
                                  : static_cast<const T*>(a.k_norm);
      if (src) cp_async16(in + r * D + c, src + c);
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
  }
  // 3. q / k RMS norms and RoPE, each step rounded as rope_qkv_kernel rounds it (the norm's sum in
  //    another order); the new k and v go to the chunk's row for pos and, from the chunk holding it,
  //    to the cache
#pragma unroll 1
  for (int r = warp; r < G + 1; r += ATT_WARPS) {
    float ss = 0.f;
#pragma unroll 1
    for (int d = lane; d < D; d += 32) {
      const float v = A::f(in[r * D + d]);
      ss += v * v;
    }
    for (int o = 16; o; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if (lane == 0) rf[r] = rsqrtf(ss / D + a.eps);
  }
  __syncthreads();
  const bool has_new = n > n_old;  // pos is in this chunk, at row n_old
  const T* cs = in + (G + 2) * D;
  const T* sn = in + (G + 3) * D;
#pragma unroll 1
  for (int i = tid; i < (G + 1) * D; i += ATT_THREADS) {
    const int r = i >> ld, d = i & (D - 1);
    if (r == G && !has_new) break;
    const bool nrm = (r < G ? a.q_norm : a.k_norm) != nullptr;
    const T* nw = in + (r < G ? G + 4 : G + 5) * D;
    const float f = rf[r];
    auto normed = [&](int e) {
      const float v = A::f(in[r * D + e]);
      return nrm ? norm_rounded<A>(v, f, A::f(nw[e])) : v;
    };
    const float v = normed(d), partner = d < half ? -normed(d + half) : normed(d - half);
    const T o = rope_rounded<A>(v, partner, A::f(cs[d]), A::f(sn[d]));
    if (r < G) {
      qs[i] = o;
    } else {
      ks[n_old * D + d] = o;
      static_cast<T*>(a.k_cache)[((size_t)hk * a.cap + pos) * D + d] = o;
    }
  }
  if (has_new)
#pragma unroll 1
    for (int d = tid; d < D; d += ATT_THREADS) {
      const T v = in[(G + 1) * D + d];
      vs[n_old * D + d] = v;
      static_cast<T*>(a.v_cache)[((size_t)hk * a.cap + pos) * D + d] = v;
    }
  __syncthreads();
  M3E_STAMP(2)

  // 4. warp w: q head hk G + w over the chunk's n slots. A key's D elements are spread over LK = D / 8
  //    lanes (8 each), KW = 32 / LK keys a step; an online softmax per lane group in fp32 (base 2),
  //    the KW groups merged by shuffles at the end
  const int LK = vpr, KW = 32 / LK, sub = lane >> lv, d0 = (lane & (LK - 1)) * 8;
  float m = -INFINITY, l = 0.f, o[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  if (warp < G) {
    const float qscale = rsqrtf((float)D) * 1.4426950408889634f;  // SDPA's 1 / sqrt(D), for exp2
    float q[8];
    {
      const uint4 qv = *reinterpret_cast<const uint4*>(qs + warp * D + d0);
      const uint32_t w[4] = {qv.x, qv.y, qv.z, qv.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        pair(w[e], q[2 * e], q[2 * e + 1], BF16);
        q[2 * e] *= qscale;
        q[2 * e + 1] *= qscale;
      }
    }
#pragma unroll 1
    for (int j0 = 0; j0 < n; j0 += ATT_KPT * KW) {
      float s[ATT_KPT], mx = m;
#pragma unroll
      for (int u = 0; u < ATT_KPT; ++u) {
        const int j = j0 + u * KW + sub;
        const uint4 kv = j < n ? *reinterpret_cast<const uint4*>(ks + j * D + d0) : make_uint4(0, 0, 0, 0);
        const uint32_t w[4] = {kv.x, kv.y, kv.z, kv.w};
        float v = 0.f;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float k0, k1;
          pair(w[e], k0, k1, BF16);
          v = fmaf(q[2 * e], k0, v);
          v = fmaf(q[2 * e + 1], k1, v);
        }
        s[u] = v;
      }
      // each key's sum over its LK lanes, the ATT_KPT keys' shuffles side by side (with LK a runtime
      // value the levels were a loop per key, run one key after another: A6)
#pragma unroll
      for (int off = 16; off; off >>= 1)
        if (off < LK)
#pragma unroll
          for (int u = 0; u < ATT_KPT; ++u) s[u] += __shfl_xor_sync(0xffffffffu, s[u], off);
#pragma unroll
      for (int u = 0; u < ATT_KPT; ++u) {
        s[u] = j0 + u * KW + sub < n ? s[u] : -INFINITY;
        mx = fmaxf(mx, s[u]);
      }
      if (mx == -INFINITY) continue;  // none of this group's slots yet
      const float corr = exp2f(m - mx);
      m = mx;
      l *= corr;
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] *= corr;
#pragma unroll
      for (int u = 0; u < ATT_KPT; ++u) {
        const int j = j0 + u * KW + sub;
        const float p = exp2f(s[u] - mx);  // 0 past n
        l += p;
        const uint4 vv = j < n ? *reinterpret_cast<const uint4*>(vs + j * D + d0) : make_uint4(0, 0, 0, 0);
        const uint32_t w[4] = {vv.x, vv.y, vv.z, vv.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float v0, v1;
          pair(w[e], v0, v1, BF16);
          o[2 * e] = fmaf(p, v0, o[2 * e]);
          o[2 * e + 1] = fmaf(p, v1, o[2 * e + 1]);
        }
      }
    }
#pragma unroll 1
    for (int off = LK; off < 32; off <<= 1) {  // the KW groups of the warp
      const float m2 = __shfl_xor_sync(0xffffffffu, m, off), l2 = __shfl_xor_sync(0xffffffffu, l, off);
      const float M = fmaxf(m, m2);
      const float w1 = m == -INFINITY ? 0.f : exp2f(m - M), w2 = m2 == -INFINITY ? 0.f : exp2f(m2 - M);
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] = w1 * o[e] + w2 * __shfl_xor_sync(0xffffffffu, o[e], off);
      l = w1 * l + w2 * l2;
      m = M;
    }
  }
  const int h = hk * G + warp;
  M3E_STAMP(3)
  if (a.splits == 1) {
    if (warp < G && sub == 0) {
      T* out = static_cast<T*>(a.out) + (size_t)h * D + d0;
      const float r = 1.f / l;
#pragma unroll
      for (int e = 0; e < 8; ++e) out[e] = A::t(o[e] * r);
    }
    M3E_TRACE_OUT(3)
    return;
  }
  // 5. this chunk's partial (O [D], then M, L) per head into the workspace (wo [nh][splits][D], wml
  //    [nh][splits][2] at nh MAX_SPLITS D); the head group's last chunk to arrive merges them in chunk
  //    order (the split-K fixup's fence pattern)
  float* wo = a.workspace;
  float* wml = a.workspace + (size_t)a.nh * M3E_ATTN_MAX_SPLITS * D;
  if (warp < G && sub == 0) {
    float4* dst = reinterpret_cast<float4*>(wo + ((size_t)h * a.splits + split) * D + d0);
    dst[0] = make_float4(o[0], o[1], o[2], o[3]);
    dst[1] = make_float4(o[4], o[5], o[6], o[7]);
    if (lane == 0) reinterpret_cast<float2*>(wml)[(size_t)h * a.splits + split] = make_float2(m, l);
  }
  __syncthreads();
  if (tid == 0) {
    __threadfence();
    s_last = atomicAdd(a.counters + hk, 1) == a.splits - 1;
    if (s_last) a.counters[hk] = 0;
    __threadfence();
  }
  __syncthreads();
  if (!s_last) {
    M3E_TRACE_OUT(3)
    return;
  }
  // the merge: thread f = tid, tid + ATT_THREADS, ... sums quad f (head g, elements d..d+3) over the
  // chunks in chunk order, weighted exp2(M_s - M) / L. The first B chunks' partials of the thread's
  // first quad are requested with the (M, L) rows, so that at B >= S the merge is one round trip
  const int S = a.splits;
  constexpr int B = 16;  // chunks whose partials a thread loads together
  float2* ml = reinterpret_cast<float2*>(kvs);                         // [G][S] (M, L) of each chunk
  float* wt = reinterpret_cast<float*>(kvs) + 2 * ATT_MAXG * M3E_ATTN_MAX_SPLITS;  // [G][S] weight / L
  const int nq = G * D / 4;
  auto quad = [&](int f) {
    return reinterpret_cast<const float4*>(wo + (size_t)(hk * G + ((f * 4) >> ld)) * S * D + ((f * 4) & (D - 1)));
  };
  float4 v[B];
  auto load = [&](const float4* src, int s0) {
#pragma unroll
    for (int b = 0; b < B; ++b)
      v[b] = s0 + b < S ? __ldcg(src + (size_t)(s0 + b) * (D / 4)) : make_float4(0.f, 0.f, 0.f, 0.f);
  };
  if (tid < nq) load(quad(tid), 0);
#pragma unroll 1
  for (int i = tid; i < G * S; i += ATT_THREADS) ml[i] = __ldcg(reinterpret_cast<const float2*>(wml) + (size_t)hk * G * S + i);
  __syncthreads();
  if (warp < G) {
    float M = -INFINITY, L = 0.f;
#pragma unroll 1
    for (int s = lane; s < S; s += 32) M = fmaxf(M, ml[warp * S + s].x);
    for (int off = 16; off; off >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, off));
#pragma unroll 1
    for (int s = lane; s < S; s += 32) {
      const float2 e = ml[warp * S + s];
      L += e.x == -INFINITY ? 0.f : exp2f(e.x - M) * e.y;
    }
    for (int off = 16; off; off >>= 1) L += __shfl_xor_sync(0xffffffffu, L, off);
#pragma unroll 1
    for (int s = lane; s < S; s += 32) {
      const float mx = ml[warp * S + s].x;
      wt[warp * S + s] = mx == -INFINITY ? 0.f : exp2f(mx - M) / L;
    }
  }
  __syncthreads();
#pragma unroll 1
  for (int f = tid; f < nq; f += ATT_THREADS) {
    const int g = (f * 4) >> ld, d = (f * 4) & (D - 1);
    const float4* src = quad(f);
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 1
    for (int s0 = 0; s0 < S; s0 += B) {
      if (f != tid || s0) load(src, s0);
#pragma unroll
      for (int b = 0; b < B; ++b) {
        const float w = s0 + b < S ? wt[g * S + s0 + b] : 0.f;
        if (w != 0.f) {  // a chunk past pos: M = -inf, weight 0 (its O is not read)
          acc.x = fmaf(w, v[b].x, acc.x);
          acc.y = fmaf(w, v[b].y, acc.y);
          acc.z = fmaf(w, v[b].z, acc.z);
          acc.w = fmaf(w, v[b].w, acc.w);
        }
      }
    }
    T* out = static_cast<T*>(a.out) + (size_t)(hk * G + g) * D + d;
    out[0] = A::t(acc.x);
    out[1] = A::t(acc.y);
    out[2] = A::t(acc.z);
    out[3] = A::t(acc.w);
  }
  M3E_TRACE_OUT(4)
}

}  // namespace ops
}  // namespace m3e

extern "C" int m3e_route(const m3e_route_args* a, void* stream) {
  if (!a || !a->x || !a->routers || !a->modality || !a->fusion_ok || !a->ids || !a->weights || !a->logits ||
      !a->counters)
    return M3E_ERR_ARG;
  if (a->T < 1 || a->H < 8 || a->H % 8 || a->E < 1 || a->E > m3e::ops::MAX_EXPERTS || a->R < 1 || a->k < 1 ||
      a->k > m3e::ops::MAX_TOPK || a->k > a->E || a->n_fusion < 0 || a->n_fusion >= a->E)
    return M3E_ERR_SHAPE;
  if ((reinterpret_cast<uintptr_t>(a->x) | reinterpret_cast<uintptr_t>(a->routers) | reinterpret_cast<uintptr_t>(a->norm_w)) & 15)
    return M3E_ERR_ALIGN;
  auto s = static_cast<cudaStream_t>(stream);
  const int pdl = m3e::pdl_capable();
  if (pdl < 0) return M3E_ERR_CUDA;
  constexpr int W = m3e::ops::LOGIT_WARPS;
  const dim3 grid(a->E, a->T);
  const cudaError_t e =
      a->act_bf16
          ? m3e::launch_kernel(m3e::ops::route_logits_kernel<true>, grid, dim3(32 * W), 0, s, pdl == 1, *a, a->logits)
          : m3e::launch_kernel(m3e::ops::route_logits_kernel<false>, grid, dim3(32 * W), 0, s, pdl == 1, *a, a->logits);
  return e == cudaSuccess ? M3E_OK : M3E_ERR_CUDA;
}

extern "C" int m3e_rmsnorm(void* x, const void* res, const void* w, void* out, int T, int H, float eps, int act_bf16,
                           void* stream) {
  if (!x || !w || !out) return M3E_ERR_ARG;
  if (T < 1 || H < 8 || H % 8) return M3E_ERR_SHAPE;
  if ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(res) | reinterpret_cast<uintptr_t>(w) |
       reinterpret_cast<uintptr_t>(out)) & 15)
    return M3E_ERR_ALIGN;
  auto s = static_cast<cudaStream_t>(stream);
  const int pdl = m3e::pdl_capable();
  if (pdl < 0) return M3E_ERR_CUDA;
  const cudaError_t e =
      act_bf16 ? m3e::launch_kernel(m3e::ops::rmsnorm_kernel<true>, dim3(T), dim3(256), 0, s, pdl == 1, x, res, w, out, H, eps)
               : m3e::launch_kernel(m3e::ops::rmsnorm_kernel<false>, dim3(T), dim3(256), 0, s, pdl == 1, x, res, w, out, H,
                                    eps);
  return e == cudaSuccess ? M3E_OK : M3E_ERR_CUDA;
}

extern "C" int m3e_rope_qkv(const m3e_rope_args* a, void* stream) {
  if (!a || !a->qkv || !a->cos || !a->sin || !a->q_out || !a->k_cache || !a->v_cache) return M3E_ERR_ARG;
  if (a->T < 1 || a->nh < 1 || a->nkv < 1 || a->D < 32 || a->D % 32 || a->D > 512 || a->cap < 1) return M3E_ERR_SHAPE;
  dim3 grid(a->nh + 2 * a->nkv, a->T);
  auto s = static_cast<cudaStream_t>(stream);
  const int pdl = m3e::pdl_capable();
  if (pdl < 0) return M3E_ERR_CUDA;
  const cudaError_t e = a->act_bf16
                            ? m3e::launch_kernel(m3e::ops::rope_qkv_kernel<true>, grid, dim3(a->D), 0, s, pdl == 1, *a)
                            : m3e::launch_kernel(m3e::ops::rope_qkv_kernel<false>, grid, dim3(a->D), 0, s, pdl == 1, *a);
  return e == cudaSuccess ? M3E_OK : M3E_ERR_CUDA;
}

extern "C" int m3e_attn_plan(int keys, int D, int* splits, int* chunk) {
  if (!splits || !chunk) return M3E_ERR_ARG;
  if (keys < 1 || (D != 32 && D != 64 && D != 128 && D != 256)) return M3E_ERR_SHAPE;
  // about 16 chunks a kv head, of 16 to 8192 / D slots (a chunk's K and V fill at most 32 KB of
  // shared memory), so at most M3E_ATTN_MAX_SPLITS x 8192 / D slots
  const int most = m3e::ops::ATT_KV_BYTES / (4 * D);
  int c = ((keys + 15) / 16 + 15) / 16 * 16;
  c = c < 16 ? 16 : c > most ? most : c;
  const int n = (keys + c - 1) / c;
  if (n > M3E_ATTN_MAX_SPLITS) return M3E_ERR_SHAPE;
  *chunk = c;
  *splits = n;
  return M3E_OK;
}

extern "C" int m3e_attn_decode(const m3e_attn_args* a, void* stream) {
  if (!a || !a->qkv || !a->cos || !a->sin || !a->out || !a->k_cache || !a->v_cache) return M3E_ERR_ARG;
  if (a->nh < 1 || a->nkv < 1 || a->nh % a->nkv || a->nh / a->nkv > m3e::ops::ATT_MAXG || a->cap < 1 ||
      a->keys < 1 || a->keys > a->cap || (a->D != 32 && a->D != 64 && a->D != 128 && a->D != 256))
    return M3E_ERR_SHAPE;
  int splits = 0, chunk = 0;
  if (int rc = m3e_attn_plan(a->keys, a->D, &splits, &chunk); rc != M3E_OK) return rc;
  if (a->splits != splits || a->chunk != chunk) return M3E_ERR_ARG;
  if (splits > 1 && (!a->workspace || !a->counters)) return M3E_ERR_WORKSPACE;
  if (!a->pos_dev && (a->pos0 < 0 || a->pos0 >= a->keys)) return M3E_ERR_SHAPE;
  for (const void* q : {a->qkv, a->cos, a->sin, a->q_norm, a->k_norm, (const void*)a->k_cache, (const void*)a->v_cache,
                        (const void*)a->workspace})
    if (reinterpret_cast<uintptr_t>(q) & 15) return M3E_ERR_ALIGN;  // 16-byte copies (NULL passes)
  auto s = static_cast<cudaStream_t>(stream);
  const int pdl = m3e::pdl_capable();
  if (pdl < 0) return M3E_ERR_CUDA;
  const dim3 grid(a->nkv, splits), block(m3e::ops::ATT_THREADS);
  const cudaError_t e = a->act_bf16 ? m3e::launch_kernel(m3e::ops::attn_decode_kernel<true>, grid, block, 0, s, pdl == 1, *a)
                                    : m3e::launch_kernel(m3e::ops::attn_decode_kernel<false>, grid, block, 0, s, pdl == 1, *a);
  return e == cudaSuccess ? M3E_OK : M3E_ERR_CUDA;
}

// The small ops of a decode step, fused (m3e_api.cuh: m3e_route, m3e_rope_qkv). Run by eager torch
// they were ~25 elementwise, sort and gather launches per layer (routing) and ~20 (q/k norm, RoPE,
// cache writes), 1-4 us each at one token: more time than the layer's int4 GEMMs (NOTES.md).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>

#include "m3e_api.cuh"
#include "ptx.cuh"

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

// Top k of token t's logits by one warp (8 experts a lane), softmax, weights, ids. The logits were
// written by other CTAs of the launch: read through L2.
template <bool BF16>
__device__ void route_select(const m3e_route_args& a, const float* logits, int t, int lane) {
  using A = Act<BF16>;
  float v[8];
#pragma unroll
  for (int r = 0; r < 8; ++r) {
    const int e = lane + 32 * r;
    v[r] = e < a.E ? __ldcg(logits + (size_t)t * a.E + e) : -INFINITY;
  }
  float mx = -INFINITY, den = 0.f;
  if (!a.norm_topk) {  // softmax over all experts, then the top k of it
#pragma unroll
    for (int r = 0; r < 8; ++r) mx = fmaxf(mx, v[r]);
    for (int o = 16; o; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
#pragma unroll
    for (int r = 0; r < 8; ++r) den += lane + 32 * r < a.E ? expf(v[r] - mx) : 0.f;
    for (int o = 16; o; o >>= 1) den += __shfl_xor_sync(0xffffffffu, den, o);
  }
  unsigned taken = 0;  // bit r: expert lane + 32 r already picked
  float top0 = 0.f, sum = 0.f, my_val = 0.f;
  int my_id = 0;
  for (int j = 0; j < a.k; ++j) {
    float bv = -INFINITY;
    int be = 0x7fffffff;
#pragma unroll
    for (int r = 0; r < 8; ++r) {
      const int e = lane + 32 * r;
      if (e < a.E && !(taken >> r & 1u) && better(v[r], e, bv, be)) {
        bv = v[r];
        be = e;
      }
    }
    for (int o = 16; o; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int oe = __shfl_xor_sync(0xffffffffu, be, o);
      if (better(ov, oe, bv, be)) {
        bv = ov;
        be = oe;
      }
    }
    if (be % 32 == lane) taken |= 1u << (be / 32);
    if (j == 0) top0 = bv;
    if (a.norm_topk) sum += expf(bv - top0);
    if (lane == j) {  // lane j keeps slot j
      my_val = bv;
      my_id = be;
    }
  }
  const int width = a.k + (a.extra_id >= 0);
  if (lane < a.k) {
    const float p = a.norm_topk ? expf(my_val - top0) / sum : expf(my_val - mx) / den;
    a.ids[(size_t)t * width + lane] = my_id;
    a.weights[(size_t)t * width + lane] = A::f(A::t(p * a.scale));
  }
  if (lane == 0 && a.extra_id >= 0) {
    a.ids[(size_t)t * width + a.k] = a.extra_id;
    a.weights[(size_t)t * width + a.k] = 1.f;
  }
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
  constexpr int NT = 32 * LOGIT_WARPS;
  const int64_t m = a.modality[t];
  float s = 0.f;
  if (m >= 0 && m < a.R) {
    const uint4* x = reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(a.x) + (size_t)t * a.H);
    const uint4* w = reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(a.routers) + ((size_t)m * a.E + e) * a.H);
    const int n = a.H / 8;
    for (int i0 = tid; i0 < n; i0 += NT * LOGIT_ILP) {
      uint4 xv[LOGIT_ILP], wv[LOGIT_ILP];
#pragma unroll
      for (int u = 0; u < LOGIT_ILP; ++u) {
        const int i = i0 + u * NT;
        xv[u] = i < n ? x[i] : make_uint4(0, 0, 0, 0);
        wv[u] = i < n ? w[i] : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < LOGIT_ILP; ++u) s += dot8(xv[u], wv[u], BF16);
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
  if (s_last && tid < 32) route_select<BF16>(a, logits, t, lane);
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
    v = A::f(A::t(v * rsqrtf(ss / D + a.eps) * A::f(nw[d])));
  }
  rotated[d] = v;
  __syncthreads();
  const float c = A::f(static_cast<const T*>(a.cos)[(size_t)t * D + d]);
  const float s = A::f(static_cast<const T*>(a.sin)[(size_t)t * D + d]);
  const float partner = d < half ? -rotated[d + half] : rotated[d - half];
  const T out = A::t(A::f(A::t(v * c)) + A::f(A::t(partner * s)));
  if (is_q)
    static_cast<T*>(a.q_out)[((size_t)h * a.T + t) * D + d] = out;
  else
    static_cast<T*>(a.k_cache)[((size_t)(h - a.nh) * a.cap + slot) * D + d] = out;
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
  if ((reinterpret_cast<uintptr_t>(a->x) | reinterpret_cast<uintptr_t>(a->routers)) & 15) return M3E_ERR_ALIGN;
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

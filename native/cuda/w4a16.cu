// W4A16 GEMM: the plan (tile and split-K choice), argument checks and the dtype dispatch. The kernel
// itself is in w4a16.cuh.
#include "w4a16.cuh"

namespace m3e {
namespace w4 {

// Tile of M: the smallest of 8/16/32/64 rows that holds M (decode pays for at most 7 padded rows),
// 64 for everything larger (prefill walks M in 64-row tiles).
static int m_tile_of(int M) { return M <= 8 ? 1 : M <= 16 ? 2 : M <= 32 ? 4 : 8; }

}  // namespace w4
}  // namespace m3e

using namespace m3e::w4;

extern "C" const char* m3e_error_string(int code) {
  switch (code) {
    case M3E_OK: return "ok";
    case M3E_ERR_SHAPE: return "M must be >= 1 and K and N multiples of 64";
    case M3E_ERR_GROUP: return "group must be 32, 64, 128 or 0 (per channel) and G = K / group";
    case M3E_ERR_ALIGN: return "every pointer must be 16-byte aligned";
    case M3E_ERR_WORKSPACE: return "split-K needs the plan's workspace and zeroed counters";
    case M3E_ERR_CUDA: return "a CUDA call or kernel launch failed";
    case M3E_ERR_ARG: return "a required pointer is null or a flag is out of range";
    default: return "unknown error";
  }
}

extern "C" int m3e_w4a16_plan(int M, int N, int K, int sms, int splits_req, m3e_w4a16_plan_t* plan) {
  if (!plan) return M3E_ERR_ARG;
  if (M < 1 || N < 64 || K < 64 || N % 64 || K % 64) return M3E_ERR_SHAPE;
  const int mt = m_tile_of(M);
  const int gx = (N + NT - 1) / NT, gy = (M + 8 * mt - 1) / (8 * mt);
  const int nch = (K + KC - 1) / KC;
  int splits = splits_req;
  if (splits <= 0) {
    // Fill the machine: 3 CTAs per SM for 8-row tiles, 2 for 16- and 32-row tiles (their register
    // caps, w4a16.cuh), which keeps 2-3 x 3 chunks x 8 KB of weights in flight per SM; 1 per SM for
    // 64-row tiles (168-204 registers). The partials cost
    // 2 x 4 B per output per slice, in L2, against K / 2 B of weights per output column.
    const int per_sm = mt == 1 ? MIN_CTAS_DECODE : mt <= 4 ? 2 : 1;
    const int ctas = gx * gy;
    splits = (per_sm * (sms > 0 ? sms : 1) + ctas - 1) / ctas;
  }
  if (splits > nch) splits = nch;
  if (splits < 1) splits = 1;
  const int cps = (nch + splits - 1) / splits;
  splits = (nch + cps - 1) / cps;  // no empty slice
  plan->m_tile = 8 * mt;
  plan->splits = splits;
  plan->grid_x = gx;
  plan->grid_y = gy;
  plan->workspace_floats = splits > 1 ? (size_t)gx * gy * splits * 8 * mt * NT : 0;
  plan->n_counters = splits > 1 ? gx * gy : 0;
  return M3E_OK;
}

static bool misaligned(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) != 0; }

extern "C" int m3e_w4a16_gemm(const m3e_w4a16_args* a, void* stream) {
  if (!a || !a->x || !a->w || !a->scales || !a->out) return M3E_ERR_ARG;
  if (a->M < 1 || a->N % 64 || a->K % 64 || a->N < 64 || a->K < 64) return M3E_ERR_SHAPE;
  if (a->act_bf16 < 0 || a->act_bf16 > 1 || a->scale_bf16 < 0 || a->scale_bf16 > 1 || a->out_f32 < 0 ||
      a->out_f32 > 1)
    return M3E_ERR_ARG;
  if (a->mins && a->zeros) return M3E_ERR_ARG;
  int gshift, gmask;
  switch (a->group) {
    case 32: gshift = 5; break;
    case 64: gshift = 6; break;
    case 128: gshift = 7; break;
    case 0: gshift = 31; break;
    default: return M3E_ERR_GROUP;
  }
  gmask = a->group ? a->group - 1 : 0x7fffffff;
  if (a->G != (a->group ? a->K / a->group : 1)) return M3E_ERR_GROUP;
  if (misaligned(a->x) || misaligned(a->w) || misaligned(a->scales) || misaligned(a->mins) ||
      misaligned(a->zeros) || misaligned(a->out))
    return M3E_ERR_ALIGN;
  const int mt = m_tile_of(a->M);
  const int gx = (a->N + NT - 1) / NT, gy = (a->M + 8 * mt - 1) / (8 * mt);
  const int nch = (a->K + KC - 1) / KC;
  if (a->splits < 1 || a->splits > nch) return M3E_ERR_ARG;
  const int cps = (nch + a->splits - 1) / a->splits;
  if ((nch + cps - 1) / cps != a->splits) return M3E_ERR_ARG;  // not the plan's count: a slice would be empty
  if (a->splits > 1 && (!a->workspace || !a->counters)) return M3E_ERR_WORKSPACE;

  Params p;
  p.x = static_cast<const uint16_t*>(a->x);
  p.w = reinterpret_cast<const uint4*>(a->w);
  p.s = a->scales;
  p.mn = a->mins;
  p.zp = a->zeros;
  p.out = static_cast<uint16_t*>(a->out);
  p.ws = a->workspace;
  p.cnt = a->counters;
  p.M = a->M;
  p.N = a->N;
  p.K = a->K;
  p.G = a->G;
  p.gshift = gshift;
  p.gmask = gmask;
  p.scale_bf16 = a->scale_bf16;
  p.splits = a->splits;
  p.cps = cps;
  p.out_f32 = a->out_f32;
  const dim3 grid(gx, gy, a->splits);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return a->act_bf16 ? launch_bf16(p, mt, a->mins != nullptr, grid, s)
                     : launch_f16(p, mt, a->mins != nullptr, grid, s);
}

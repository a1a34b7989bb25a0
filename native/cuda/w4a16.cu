// W4A16 GEMM: the plan (kernel, tile and split-K choice), argument checks and the dtype dispatch. The
// kernels are in w4a16.cuh (mma tiles) and w4a16_decode.cuh (M <= 8).
#include "w4a16_decode.cuh"

namespace m3e {
namespace w4 {

// Tile of M: the smallest of 8/16/32 rows that holds M (decode pays for at most 7 padded rows), 32-row
// tiles up to M = 256 (two CTAs an SM where a 64-row tile's registers allow one: M = 64 2-34 %
// faster, M = 256 faster on 4 of the 6 benchmark shapes, NOTES.md v11), 64 beyond (2-5 % faster at
// M = 1024).
static int m_tile_of(int M) { return M <= 8 ? 1 : M <= 16 ? 2 : M <= 256 ? 4 : 8; }

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
    case M3E_ERR_ARG: return "a required pointer is null, or a flag, n_tile or splits is not the plan's (int8: the decode kernel, symmetric)";
    case M3E_ERR_SMEM: return "one token row of K does not fit the shared memory of a CTA (the MoE kernels have no split-K)";
    default: return "unknown error";
  }
}

// Decode plan: NS slabs per CTA, then the split count. One slab per CTA (R24): its 8 warps take 8
// blocks each at K = 4096, as two slabs of the 16-warp CTA did (NOTES.md v10: two slabs were 10.6
// against 12.2 us at 4096 x 4096 then), and four CTAs an SM overlap their fixed phases. Split-K only
// below half of the SMs (the fixup's extra L2 round trips cost more than idle SMs); then as many
// slices as the shared memory needs.
static int decode_plan(int M, int N, int K, int gshift, bool affine, int sms, int splits_req, int ns,
                       m3e_w4a16_plan_t* plan) {
  if (M > DECODE_MAX_M) return M3E_ERR_ARG;
  const int kb = K / 64, G = gshift == 31 ? 1 : K >> gshift;
  auto fits = [&](int n, int cps) { return DecodeSmem(M, n, cps, gshift, G, affine, false).total <= DECODE_SMEM_MAX; };
  if (ns == 0) ns = 1;  // or as requested: 1, 2 or 4 (N % 64 == 0, so each divides N / 16)
  const int gx = N / 16 / ns;
  int splits = splits_req > 0 ? splits_req : 2 * gx >= sms ? 1 : (sms + gx - 1) / gx;
  if (splits > kb) splits = kb;
  int cps = (kb + splits - 1) / splits;
  while (cps > 1 && !fits(ns, cps)) cps--;
  splits = (kb + cps - 1) / cps;  // no empty slice
  plan->m_tile = 8;
  plan->n_tile = 16 * ns;
  plan->splits = splits;
  plan->grid_x = gx;
  plan->grid_y = 1;
  plan->workspace_floats = splits > 1 ? (size_t)gx * splits * 16 * ns * M : 0;
  plan->n_counters = splits > 1 ? gx : 0;
  return M3E_OK;
}

extern "C" int m3e_w4a16_plan(int M, int N, int K, int group, int affine, int sms, int splits_req,
                              int n_tile_req, m3e_w4a16_plan_t* plan) {
  if (!plan) return M3E_ERR_ARG;
  if (M < 1 || N < 64 || K < 64 || N % 64 || K % 64) return M3E_ERR_SHAPE;
  const int gshift = group_shift(group);
  if (gshift < 0 || (group && K % group)) return M3E_ERR_GROUP;
  if (n_tile_req != 0 && n_tile_req != 16 && n_tile_req != 32 && n_tile_req != 64 && n_tile_req != NT)
    return M3E_ERR_ARG;
  if (n_tile_req == 0 ? M <= DECODE_MAX_M && M * K * 2 <= DECODE_X_MAX : n_tile_req < NT)
    return decode_plan(M, N, K, gshift, affine != 0, sms, splits_req, n_tile_req / 16, plan);
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
  plan->n_tile = NT;
  plan->splits = splits;
  plan->grid_x = gx;
  plan->grid_y = gy;
  plan->workspace_floats = splits > 1 ? (size_t)gx * gy * splits * 8 * mt * NT : 0;
  plan->n_counters = splits > 1 ? gx * gy : 0;
  return M3E_OK;
}

extern "C" int m3e_w4a16_gemm(const m3e_w4a16_args* a, void* stream) {
  if (!a || !a->x || !a->w || !a->scales || !a->out) return M3E_ERR_ARG;
  if (a->M < 1 || a->N % 64 || a->K % 64 || a->N < 64 || a->K < 64) return M3E_ERR_SHAPE;
  if (a->act_bf16 < 0 || a->act_bf16 > 1 || a->scale_bf16 < 0 || a->scale_bf16 > 1 || a->out_f32 < 0 ||
      a->out_f32 > 1)
    return M3E_ERR_ARG;
  if (a->mins && a->zeros) return M3E_ERR_ARG;
  const int gshift = group_shift(a->group);
  if (gshift < 0) return M3E_ERR_GROUP;
  const int gmask = a->group ? a->group - 1 : 0x7fffffff;
  if (a->G != (a->group ? a->K / a->group : 1)) return M3E_ERR_GROUP;
  if (misaligned(a->x) || misaligned(a->w) || misaligned(a->scales) || misaligned(a->mins) ||
      misaligned(a->zeros) || misaligned(a->out))
    return M3E_ERR_ALIGN;
  const bool decode = a->n_tile != NT;
  if (decode && (a->M > DECODE_MAX_M || (a->n_tile != 16 && a->n_tile != 32 && a->n_tile != 64)))
    return M3E_ERR_ARG;
  // K in the units a slice is made of: 128-k chunks (tiles) or 64-k blocks (decode)
  const int nch = decode ? a->K / 64 : (a->K + KC - 1) / KC;
  if (a->splits < 1 || a->splits > nch) return M3E_ERR_ARG;
  const int cps = (nch + a->splits - 1) / a->splits;
  if ((nch + cps - 1) / cps != a->splits) return M3E_ERR_ARG;  // not the plan's count: a slice would be empty
  if (a->splits > 1 && (!a->workspace || !a->counters)) return M3E_ERR_WORKSPACE;
  if (a->norm_w && (!decode || a->splits != 1 || misaligned(a->norm_w))) return M3E_ERR_ARG;
  if (a->residual && a->out_f32) return M3E_ERR_ARG;
  if (a->w_lo && (!decode || a->mins || a->zeros || misaligned(a->w_lo))) return M3E_ERR_ARG;

  Params p = {};
  p.x = static_cast<const uint16_t*>(a->x);
  p.w = reinterpret_cast<const uint4*>(a->w);
  p.w2 = reinterpret_cast<const uint4*>(a->w_lo);
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
  p.norm_w = a->norm_w;
  p.norm_eps = a->norm_eps;
  p.res = a->residual;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool has_min = a->mins != nullptr;
  if (decode) {
    const int pdl = m3e::pdl_capable();
    if (pdl < 0) return M3E_ERR_CUDA;
    p.pdl = pdl;
    const DecodeSmem L(a->M, a->n_tile / 16, cps, gshift, a->G, has_min, a->zeros != nullptr, a->norm_w != nullptr);
    if (L.total > DECODE_SMEM_MAX) return M3E_ERR_ARG;  // splits not from the plan
    decode_layout(p, L, a->n_tile / 16, cps);
    const int smem = L.total;
    const dim3 grid(a->N / a->n_tile, a->splits);
    return a->act_bf16 ? launch_decode_bf16(p, grid, smem, s) : launch_decode_f16(p, grid, smem, s);
  }
  const int mt = m_tile_of(a->M);
  const dim3 grid((a->N + NT - 1) / NT, (a->M + 8 * mt - 1) / (8 * mt), a->splits);
  return a->act_bf16 ? launch_bf16(p, mt, has_min, grid, s) : launch_f16(p, mt, has_min, grid, s);
}

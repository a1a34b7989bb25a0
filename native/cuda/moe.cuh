// The fused int4 MoE pair's launches of the decode kernel (w4a16_decode.cuh with a MoE epilogue):
// the per-dtype instantiations live in moe_f16.cu / moe_bf16.cu so that ninja compiles them in
// parallel; the grouping kernel, plan and entry point in moe.cu.
#pragma once

#include "w4a16_decode.cuh"

namespace m3e {
namespace w4 {

// pdl: a programmatic dependent launch (sm_90), launch_decode.
int launch_moe_f16(const Params& p, int epi, dim3 grid, int smem, cudaStream_t stream, bool pdl);
int launch_moe_bf16(const Params& p, int epi, dim3 grid, int smem, cudaStream_t stream, bool pdl);
// The tile kernel's MoE launches (w4a16.cuh) for prefill-sized groups: mt = token rows per tile / 8.
int launch_moe_tile_f16(const Params& p, int epi, int mt, bool has_min, dim3 grid, cudaStream_t stream);
int launch_moe_tile_bf16(const Params& p, int epi, int mt, bool has_min, dim3 grid, cudaStream_t stream);

// The instantiations, listed: gate+up or down, symmetric or affine (zero point or float minimum).
#define M3E_MOE_DISPATCH(BF16)                                                                     \
  const bool affine = p.mn || p.zp;                                                              \
  if (epi == EPI_GATE_UP)                                                                        \
    return affine ? launch_decode<BF16, true, EPI_GATE_UP>(p, grid, smem, stream, pdl)                \
                  : launch_decode<BF16, false, EPI_GATE_UP>(p, grid, smem, stream, pdl);              \
  if (epi == EPI_DOWN)                                                                           \
    return affine ? launch_decode<BF16, true, EPI_DOWN>(p, grid, smem, stream, pdl)                   \
                  : launch_decode<BF16, false, EPI_DOWN>(p, grid, smem, stream, pdl);                 \
  return M3E_ERR_ARG;

// The tile kernel's: 16, 32 or 64 token rows per tile, gate+up or down, with or without the float
// minimum (zero points are a runtime flag).
#define M3E_MOE_TILE_CASE(BF16, MT, MIN)                                      \
  case MT * 2 + MIN:                                                         \
    return epi == EPI_GATE_UP ? launch<BF16, MT, MIN, EPI_GATE_UP>(p, grid, stream) \
                              : launch<BF16, MT, MIN, EPI_DOWN>(p, grid, stream);
#define M3E_MOE_TILE_DISPATCH(BF16)                                          \
  if (epi != EPI_GATE_UP && epi != EPI_DOWN) return M3E_ERR_ARG;             \
  switch (mt * 2 + (has_min ? 1 : 0)) {                                      \
    M3E_MOE_TILE_CASE(BF16, 2, false)                                        \
    M3E_MOE_TILE_CASE(BF16, 2, true)                                         \
    M3E_MOE_TILE_CASE(BF16, 4, false)                                        \
    M3E_MOE_TILE_CASE(BF16, 4, true)                                         \
    M3E_MOE_TILE_CASE(BF16, 8, false)                                        \
    M3E_MOE_TILE_CASE(BF16, 8, true)                                         \
    default: return M3E_ERR_ARG;                                             \
  }

}  // namespace w4
}  // namespace m3e

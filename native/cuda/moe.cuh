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

}  // namespace w4
}  // namespace m3e

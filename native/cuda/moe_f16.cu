// fp16-activation instantiations of the fused MoE pair (moe.cuh); a file of its own so that the JIT
// build compiles the fp16 and bf16 halves in parallel.
#include "moe.cuh"

namespace m3e {
namespace w4 {
int launch_moe_f16(const Params& p, int epi, dim3 grid, int smem, cudaStream_t stream, bool pdl) {
  M3E_MOE_DISPATCH(false)
}
int launch_moe_tile_f16(const Params& p, int epi, int mt, bool has_min, dim3 grid, cudaStream_t stream) {
  M3E_MOE_TILE_DISPATCH(false)
}
}  // namespace w4
}  // namespace m3e

// fp16-activation instantiations of the W4A16 GEMM (w4a16.cuh, w4a16_decode.cuh); a file of
// its own so that the JIT build compiles the fp16 and bf16 halves in parallel.
#include "w4a16_decode.cuh"

namespace m3e {
namespace w4 {
int launch_f16(const Params& p, int mt, bool has_min, dim3 grid, cudaStream_t stream) {
  M3E_W4A16_DISPATCH(false)
}
int launch_decode_f16(const Params& p, dim3 grid, int smem, cudaStream_t stream) {
  M3E_W4A16_DECODE_DISPATCH(false)
}
}  // namespace w4
}  // namespace m3e

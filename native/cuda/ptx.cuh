// PTX helpers shared by the kernels. Everything here exists on sm_80 and later (the consumer
// targets sm_80/86/89 and the H100's sm_90); the programmatic dependent launch (sm_90) compiles to
// nothing below sm_90 and is only requested where the device has it.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace m3e {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses L1 (.cg: weights and activations are streamed, never
// re-read by this SM from L1). With pred false the source size is 0 and the 16 bytes are zero-filled
// (PTX ISA, cp.async: "src-size ... remaining bytes are filled with zeros"); `gmem` must still be a
// valid address, so callers pass the tensor's base then.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred = true) {
  const int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(n));
}
// The same to a 32-bit shared-space address (the decode kernel keeps these in registers: a generic
// pointer costs a conversion per copy).
__device__ __forceinline__ void cp_async16(uint32_t saddr, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(saddr), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Wait until at most N committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Two 8x8 b16 matrices; lanes 0-7 give the row addresses of matrix 0, lanes 8-15 of matrix 1. Lane l
// receives row l/4, columns 2*(l%4) and +1 of each: exactly the B fragment of mma.m16n8k16 when the
// matrix is stored [n][k] (PTX ISA, "Matrix fragments for mma.m16n8k16", and ldmatrix).
__device__ __forceinline__ void ldmatrix_x2(uint32_t& r0, uint32_t& r1, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r0), "=r"(r1)
               : "r"(smem_u32(p))
               : "memory");
}

// Four 8x8 b16 matrices, lanes 8i..8i+7 giving the row addresses of matrix i (a shared-space address).
// With x stored [m][k] and the matrices at k 0-7, 8-15, 16-23, 24-31, {r0, r1} and {r2, r3} are the
// m16n8k16 B fragments of two consecutive k16 steps (same fragment rule as ldmatrix_x2). No "memory"
// clobber: volatile keeps it after the cp.async wait, and a clobber made nvcc reload the kernel
// parameters and recompute addresses after every use (seen in the decode kernel's SASS).
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, uint32_t saddr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(saddr));
}

// 8 or 16 bytes of shared memory at a 32-bit shared-space address (one register, where a generic
// pointer takes two). volatile: ordered after the cp.async wait that makes the bytes valid.
__device__ __forceinline__ float2 lds64(uint32_t saddr) {
  float2 v;
  asm volatile("ld.shared.v2.f32 {%0,%1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(saddr));
  return v;
}
__device__ __forceinline__ uint4 lds_u4(uint32_t saddr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(saddr));
  return v;
}
__device__ __forceinline__ float4 lds128(uint32_t saddr) {
  float4 v;
  asm volatile("ld.shared.v4.f32 {%0,%1,%2,%3}, [%4];\n" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(saddr));
  return v;
}
__device__ __forceinline__ void sts_u4(uint32_t saddr, uint4 v) {
  asm volatile("st.shared.v4.u32 [%0], {%1,%2,%3,%4};\n" ::"r"(saddr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

// Makes v opaque to the compiler at this point, so that a loop uses the register rather than
// recomputing v from the thread index in every iteration (ptxas rematerialized the decode kernel's
// lane addresses and constants in every block: ~20 instructions of ~95, NOTES.md v12).
__device__ __forceinline__ void pin(uint32_t& v) { asm volatile("" : "+r"(v)); }

// A 32-bit load with acquire semantics at GPU scope (a flag another CTA sets after its stores).
__device__ __forceinline__ int ld_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// A 32-bit store with release semantics at GPU scope (sets a flag that ld_acquire reads).
__device__ __forceinline__ void st_release(int* p, int v) {
  asm volatile("st.release.gpu.global.b32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}

// (a & b) | c in one instruction: lut = (0xf0 & 0xcc) | 0xaa.
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;\n" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}

// a * 1 + b on two 16-bit floats (fp16 or bf16). Used as an exact subtraction of two small integers
// (fma.rn.bf16x2 is sm_80; sub.bf16x2 would need sm_90).
template <bool BF16>
__device__ __forceinline__ uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r;
  if constexpr (BF16)
    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  else
    asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}

// c[16x8] += a[16x16] * b[16x8], fp32 accumulators. Not volatile: it is a pure function of its
// registers, and leaving it movable lets the compiler issue the next ldmatrix before it. Fragments (PTX ISA, mma.m16n8k16, g = lane/4,
// t = lane%4): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..];
// b0 = B[2t..2t+1][g], b1 = B[2t+8..][g]; c0,c1 = C[g][2t..2t+1], c2,c3 = C[g+8][2t..2t+1].
template <bool BF16>
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  if constexpr (BF16)
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Programmatic dependent launch (PTX ISA griddepcontrol, sm_90; compiled out below, where the
// launch attribute is not set either). wait: the grids this one depends on have completed and their
// memory is visible (returns at once when launched without the attribute); launch_dependents: the
// next launch of the stream may start its CTAs (they run up to their own wait).
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Host side: whether the current device takes programmatic dependent launches (sm_90 and later),
// asked once per device; -1 when the CUDA calls fail.
inline int pdl_capable() {
  static int known[64] = {};  // 0 unknown, 1 no, 2 yes
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return -1;
  if (dev < 64 && known[dev]) return known[dev] == 2;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return -1;
  if (dev < 64) known[dev] = major >= 9 ? 2 : 1;
  return major >= 9;
}

// Launch `kern` on `stream`, as a programmatic dependent of the stream's previous kernel when pdl
// (the kernel must call pdl_wait before reading what earlier launches wrote; the one-token MoE down
// launch instead waits on per-pair counts that imply it, w4a16_decode.cuh).
template <typename... P, typename... A>
cudaError_t launch_kernel(void (*kern)(P...), dim3 grid, dim3 block, int smem, cudaStream_t stream, bool pdl,
                          A&&... args) {
  if (!pdl) {
    kern<<<grid, block, smem, stream>>>(static_cast<P>(args)...);
    return cudaGetLastError();
  }
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  if (cudaError_t e = cudaLaunchKernelEx(&cfg, kern, static_cast<P>(args)...); e != cudaSuccess) return e;
  return cudaGetLastError();
}

// 16-bit float bits -> float.
__device__ __forceinline__ float bits_to_float(uint32_t u, bool bf16) {
  return bf16 ? __uint_as_float(u << 16) : __half2float(__ushort_as_half(static_cast<unsigned short>(u)));
}

}  // namespace m3e

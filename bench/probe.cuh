// What the two probes (stream_probe.cu, layer_probe.cu) share: the CUDA error check, a fill of
// distinct words, the time of a CUDA graph's replay, and the decode kernel's weight ring without its
// math: a warp streams `blocks` 512-byte blocks, this lane's 16 bytes of block i at src + 32 i, DU
// blocks deep through the lane's slots at ring + 512 u (w4a16_decode.cuh's K loop), and folds each
// block's 16 bytes into a checksum so the loads stay alive.
#pragma once

#include <cstdio>
#include <cstdlib>

#include "ptx.cuh"

#define CK(x)                                                                                  \
  do {                                                                                         \
    const cudaError_t e_ = (x);                                                                \
    if (e_ != cudaSuccess) {                                                                   \
      fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));       \
      exit(1);                                                                                 \
    }                                                                                          \
  } while (0)

__global__ void fill(uint32_t* p, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    p[i] = (uint32_t)(i * 2654435761u);
}

// us a replay of a graph captured from `body` (one warm replay first)
template <typename Body>
inline float graph_us(Body body, cudaStream_t s, int reps = 10) {
  cudaGraph_t g;
  cudaGraphExec_t ge;
  CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
  body();
  CK(cudaStreamEndCapture(s, &g));
  CK(cudaGraphInstantiate(&ge, g, 0));
  CK(cudaGraphLaunch(ge, s));
  CK(cudaStreamSynchronize(s));
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  CK(cudaEventRecord(a, s));
  for (int r = 0; r < reps; ++r) CK(cudaGraphLaunch(ge, s));
  CK(cudaEventRecord(b, s));
  CK(cudaEventSynchronize(b));
  float ms = 0;
  CK(cudaEventElapsedTime(&ms, a, b));
  CK(cudaGraphExecDestroy(ge));
  CK(cudaGraphDestroy(g));
  CK(cudaEventDestroy(a));
  CK(cudaEventDestroy(b));
  return ms * 1e3f / reps;
}

// The first DU blocks, one commit group each (a caller may request them before a wait).
template <int DU>
__device__ __forceinline__ void ring_first(uint32_t ring, const uint4* src, int blocks) {
#pragma unroll
  for (int u = 0; u < DU; ++u) {
    if (u < blocks) m3e::cp_async16(ring + u * 512, src + u * 32);
    m3e::cp_async_commit();
  }
}

// The rest: each block as it lands, its slot refilled with the block DU on; returns acc folded
// with every block, once no copy is left in flight.
template <int DU>
__device__ __forceinline__ unsigned ring_rest(uint32_t ring, const uint4* src, int blocks, unsigned acc) {
  for (int i0 = 0; i0 < blocks; i0 += DU) {
#pragma unroll
    for (int u = 0; u < DU; ++u) {
      if (i0 + u < blocks) {
        m3e::cp_async_wait<DU - 1>();
        const uint4 v = m3e::lds_u4(ring + u * 512);
        acc ^= v.x + v.y * 3u + v.z * 5u + v.w * 7u;
        if (i0 + u + DU < blocks) m3e::cp_async16(ring + u * 512, src + (size_t)(i0 + u + DU) * 32);
      }
      m3e::cp_async_commit();
    }
  }
  m3e::cp_async_wait<0>();
  return acc;
}

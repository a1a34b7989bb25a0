// CTA timelines for bench/cta_trace.cu, which builds the kernels with -DM3E_TRACE in one translation
// unit; without it the stamps compile to nothing. A kernel keeps `s_trace[4]` in shared memory,
// stamps it with M3E_STAMP(i) and writes its record with M3E_TRACE_OUT(epi) (thread 0).
#pragma once

#ifdef M3E_TRACE
// Per CTA: {entry, its wait done, the main phase's start, its end, the exit} in globaltimer ns, then
// {SM, EPI, blockIdx.x, blockIdx.y}; for the decode kernel the main phase is its K loop and EPI its
// epilogue (0 GEMM, 1 gate+up, 2 down), for the decode attention the chunk's attention (EPI 3, or 4 for
// the kv head's last CTA, whose end includes the chunk merge). Thread 0 stamps shared memory (no
// registers held across the kernel) and writes the record at the end.
constexpr unsigned TRACE_CAP = 1u << 15;  // records of 8 words
__device__ unsigned long long m3e_trace_buf[TRACE_CAP * 8];
__device__ unsigned int m3e_trace_n;
__device__ __forceinline__ unsigned long long globaltimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
#define M3E_STAMP(i) \
  if (threadIdx.x == 0) s_trace[i] = globaltimer();
// the record, by thread 0 (not inlined: its registers stay out of the kernel's count)
__device__ __noinline__ void trace_out(const unsigned long long* st, int epi) {
  const unsigned long long t_exit = globaltimer();  // before the counter's round trip
  unsigned sm;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
  const unsigned i = atomicAdd(&m3e_trace_n, 1u);
  if (i >= TRACE_CAP) return;
  for (int j = 0; j < 4; ++j) m3e_trace_buf[i * 8 + j] = st[j];
  m3e_trace_buf[i * 8 + 4] = t_exit;
  m3e_trace_buf[i * 8 + 5] = sm;
  m3e_trace_buf[i * 8 + 6] = epi;
  m3e_trace_buf[i * 8 + 7] = ((unsigned long long)blockIdx.y << 32) | blockIdx.x;
}
#define M3E_TRACE_OUT(epi) \
  if (threadIdx.x == 0) trace_out(s_trace, epi);
#else
#define M3E_STAMP(i)
#define M3E_TRACE_OUT(epi)
#endif

// W4A16 GEMM on mma.sync: out[M, N] = x[M, K] @ W[N, K]^T with int4 W, fp16 or bf16 x.
//
// The product is computed transposed, out^T = W . x^T ("swap AB"): the weights are the mma's A
// operand (16 rows of N per fragment) and the activations its B operand (8 columns of M). At decode
// (M = 1..8) this pads M to 8 instead of 16, and the weights, the only large stream, go from global
// memory to registers through shared memory without any shuffle: the repack (m3edge/runtime/native.py) put
// every lane's A fragment of a 16x64 block in one 16-byte vector.
//
//   CTA = 8 warps, NT = 128 rows of N, 8*MT rows of M, one slice of K (split-K, blockIdx.z)
//
//          K (chunks of KC = 128, STAGES-deep cp.async pipeline)
//        +----------------------------------------+
//  warp0 | 16 rows: A frags, 1 uint4/lane per 64 k |   W[N/16][K/64][32 lanes][4 words]
//  ...   |                                        |
//  warp7 | 16 rows                                |
//        +----------------------------------------+
//  x^T   | 8*MT columns, [m][k] in smem (ldmatrix) |   every warp reads all of it
//        +----------------------------------------+
//
// Precision: the dequantized A fragment holds the integer q - z (or u = q + 8 for the float-minimum
// form), exact in fp16 and bf16, so the tensor cores compute sum_k x * (q - z) exactly into fp32.
// The group's scale is applied in fp32 when the group ends ("flush"): acc += s * tmp. So the only
// roundings are fp32 ones, and bf16 activations meet the 1e-3 parity bound that a bf16 product
// w = (q - z) * s rounded to bf16 (relative 2^-9) would miss. The float minimum adds m * sum_k x,
// and sum_k x comes from one more mma with A = ones (its rows all equal the sum over k).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "m3e_api.cuh"
#include "ptx.cuh"

namespace m3e {
namespace w4 {

constexpr int WARPS = 8;             // warps per CTA, one 16-row slab of N each
constexpr int THREADS = WARPS * 32;
constexpr int NT = WARPS * 16;       // rows of N per CTA
constexpr int KC = 128;              // k per pipeline stage (2 blocks of 64)
constexpr int MAXG = KC / 32;        // groups a stage can touch (group >= 32)
#ifndef M3E_DECODE_CTAS
#define M3E_DECODE_CTAS 3
#endif
// CTAs per SM the M <= 8 tile (MT = 1, no float minimum) is compiled for (a register cap of
// 65536 / (256 * n)): 3 -> 85 registers; v5 needs 71 (v4 spilled at 85, v3 at 85 was no faster
// than 2 because the SMs were issue-bound, see NOTES.md).
constexpr int MIN_CTAS_DECODE = M3E_DECODE_CTAS;

template <int MT>  // MT: 8-column tiles of M per CTA (1, 2, 4, 8 -> 8, 16, 32, 64 rows of x)
struct Cfg {
  // 4 stages keep 3 chunks (24 KB of weights per CTA) in flight for decode; 3 for MT = 8 so the
  // CTA fits the 99 KB that sm_86/sm_89 allow a block.
  static constexpr int STAGES = MT >= 8 ? 3 : 4;
  static constexpr int XS = KC + 8;  // x row stride in halves: 272 B = 17 x 16 B, so the 8 rows an
                                     // ldmatrix reads fall in 8 different 16-byte bank groups
  static constexpr int W_BYTES = WARPS * (KC / 64) * 32 * 16;
  static constexpr int X_BYTES = 8 * MT * XS * 2;
  static constexpr int S_BYTES = WARPS * MAXG * 16 * 2;  // scales (and mins) of the stage's groups
  static constexpr int Z_BYTES = WARPS * MAXG * 16;      // zero points + 8
  static constexpr int STAGE = W_BYTES + X_BYTES + 2 * S_BYTES + Z_BYTES;
  static constexpr int SMEM = STAGES * STAGE;
};

struct Params {
  const uint16_t* x;
  const uint4* w;
  const uint4* w2;  // decode GEMM, int8 W (W8): the low plane (w the high one; m3e_w4a16_args w_lo)
  const uint16_t* s;
  const uint16_t* mn;
  const uint8_t* zp;
  uint16_t* out;  // fp32 when out_f32
  float* ws;
  int* cnt;
  int M, N, K, G;
  int gshift;  // log2(group); 31 per channel, so k >> gshift is 0 for every k
  int gmask;   // group - 1; 0x7fffffff per channel, so no group ends inside K
  int scale_bf16, splits, cps;  // cps: K per split, in 128-k chunks (tiles) or 64-k blocks (decode)
  int out_f32;                   // out is fp32 (else the activations' 16-bit type)
  int pdl;                       // decode GEMM: launched as a programmatic dependent (sm_90)
  const uint16_t* norm_w;        // decode GEMM (one K slice) and one token's MoE gate+up: RMSNorm of x's rows first
  float norm_eps;
  const uint16_t* res;           // GEMM: [M][N] added to the (16-bit) output (m3e_w4a16_args residual)
  // decode kernel only (w4a16_decode.cuh): slabs per CTA, log2 of its warps per slab, the x row
  // stride in halves, groups per slab in the metadata layout, shared-memory offsets (DecodeSmem)
  int ns, wk_shift, xstride, gs, sm_meta, sm_sx, sm_raw_s, sm_raw_2, sm_ring;
  int sm_nw;  // decode kernel: the fused norm's weights in shared memory at this offset (0: read from global)
  // fused MoE launches of the decode kernel only (moe.cu): w/s/mn/zp are stacked over experts; the
  // (token, slot) pairs t topk + j sorted by expert; one token tile per CTA column {expert, first
  // entry of moe_rows, rows (0: no work), 0}; the routing weights [T topk], fp32 (rw_f32) or the
  // activations' 16-bit type
  const int* moe_rows;
  const int4* moe_tiles;
  const void* moe_rw;
  const uint16_t* moe_res;  // [T][N] in the activations' type, added to down's output, or null
  // no tile list (moe_tiles null; decode kernel, one token): CTA column i is pair i, its expert read
  // from the ids [T topk] (int64 when ids_i64); an id outside [0, moe_E) is a zero slot
  const void* moe_ids;
  int ids_i64, moe_E;
  // one token (no tile list): per pair, gate+up's CTAs that have stored [topk], then down's CTAs that
  // have seen all of them [topk]; down waits for moe_ready_target (gate+up's N tiles) of its pair
  int* moe_ready;
  int moe_ready_target;
  // one token: moe_pre_id >= 0 is the last slot's expert, known before routing (the shared expert);
  // that pair's CTAs are then the first of each launch (CTA row 0), and with moe_early ([2]: a flag
  // m3e_route sets once the launch before it has completed, then a count of this pair's gate+up CTAs
  // that saw it) its gate+up CTAs wait for the flag, not for routing: they stream during routing
  int moe_pre_id;
  int* moe_early;
  int topk, rw_f32;
};

// log2(group) for the kernels (31 per channel: k >> 31 is 0 for every k), -1 for an unsupported group.
static inline int group_shift(int group) {
  switch (group) {
    case 32: return 5;
    case 64: return 6;
    case 128: return 7;
    case 0: return 31;
    default: return -1;
  }
}

static inline bool misaligned(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) != 0; }

// Eight 16-bit activations (a 16-byte vector): the sum of a_i b_i in fp32, and a_i r b_i rounded once
// each to the activations' type (the fused RMSNorm: m3e_rmsnorm's arithmetic).
template <bool BF16>
__device__ __forceinline__ float dot8_bits(uint4 a, uint4 b) {
  const uint32_t av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    s = fmaf(bits_to_float(av[j] & 0xffffu, BF16), bits_to_float(bv[j] & 0xffffu, BF16), s);
    s = fmaf(bits_to_float(av[j] >> 16, BF16), bits_to_float(bv[j] >> 16, BF16), s);
  }
  return s;
}
template <bool BF16>
__device__ __forceinline__ uint32_t float_to_bits(float v) {
  if constexpr (BF16)
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  else
    return __half_as_ushort(__float2half_rn(v));
}
template <bool BF16>
__device__ __forceinline__ uint4 scale8_bits(uint4 a, uint4 b, float r) {
  const uint32_t av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
  uint32_t o[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t lo = float_to_bits<BF16>(bits_to_float(av[j] & 0xffffu, BF16) * r * bits_to_float(bv[j] & 0xffffu, BF16));
    const uint32_t hi = float_to_bits<BF16>(bits_to_float(av[j] >> 16, BF16) * r * bits_to_float(bv[j] >> 16, BF16));
    o[j] = lo | hi << 16;
  }
  return make_uint4(o[0], o[1], o[2], o[3]);
}

// Output i: fp32, or rounded to the activations' type; with the GEMM's residual (16-bit outputs only),
// the rounded value plus residual i, rounded again (the reference's `h + o_proj(x)`, bit for bit).
template <bool BF16>
__device__ __forceinline__ void store(const Params& p, size_t i, float v) {
  if (p.out_f32) {
    reinterpret_cast<float*>(p.out)[i] = v;
    return;
  }
  if (p.res) v = bits_to_float(float_to_bits<BF16>(v), BF16) + bits_to_float(p.res[i], BF16);
  p.out[i] = static_cast<uint16_t>(float_to_bits<BF16>(v));
}

// What a CTA does with its sums: the GEMM's store (with split-K), or one of the fused MoE pair's
// epilogues (moe.cu), in both kernels (this tile kernel for prefill-sized groups, the decode kernel).
enum Epilogue { EPI_GEMM = 0, EPI_GATE_UP = 1, EPI_DOWN = 2 };

// The routing weight of pair i, fp32 or the activations' 16-bit type.
template <bool BF16>
__device__ __forceinline__ float route_weight(const Params& p, int i) {
  return p.rw_f32 ? static_cast<const float*>(p.moe_rw)[i]
                  : bits_to_float(static_cast<const uint16_t*>(p.moe_rw)[i], BF16);
}

// The MoE epilogues, shared by both kernels. The CTA holds `rows` pairs (pair(m): t topk + j) and
// output columns n0 .. n0 + ncols - 1 (ncols a multiple of 16); val(m, c) is its fp32 sum for pair
// m and column n0 + c, readable by every thread (staged in shared memory). NTHR: the CTA's threads.
//
// gate+up: column slabs 2i and 2i + 1 are the gate and up rows of the same 16 outputs (the repack
// interleaves them: moe.cu), so silu(gate) * up is computed here in fp32 and rounded once to the
// intermediate's type [T topk][N / 2]; output index fastest for coalesced stores.
template <bool BF16, int NTHR, typename Pair, typename Val>
__device__ __forceinline__ void moe_gate_up_store(const Params& p, int rows, int n0, int ncols, Pair pair, Val val) {
  const int nh = ncols / 2, inter = p.N / 2;
  for (int i = threadIdx.x; i < nh * rows; i += NTHR) {
    const int m = i / nh, c = i - m * nh, col = 32 * (c >> 4) + (c & 15);
    const float g = val(m, col), u = val(m, col + 16);
    store<BF16>(p, (size_t)pair(m) * inter + n0 / 2 + c, g / (1.f + expf(-g)) * u);
  }
}

// down: each pair's routing-weighted output goes to its slot row of the workspace [T topk][N]
// (fp32); the CTA that brings a token's arrival count (per token and N tile: ntiles of them per
// token) to topk sums the token's slots in slot order: deterministic, one launch (the fence pattern
// of the split-K fixup), plus the residual row when there is one. s_token: `rows` ints of shared memory.
template <bool BF16, int NTHR, typename Pair, typename Val>
__device__ __forceinline__ void moe_down_store(const Params& p, int rows, int n0, int ncols, int ntile, int ntiles,
                                               Pair pair, Val val, int* s_token) {
  const int tid = threadIdx.x;
  for (int i = tid; i < ncols * rows; i += NTHR) {
    const int m = i / ncols, c = i - m * ncols, pr = pair(m);
    p.ws[(size_t)pr * p.N + n0 + c] = val(m, c) * route_weight<BF16>(p, pr);
  }
  __syncthreads();
  if (tid < rows) {
    const int t = pair(tid) / p.topk;
    int* c = p.cnt + (size_t)t * ntiles + ntile;
    __threadfence();
    const bool last = atomicAdd(c, 1) == p.topk - 1;
    if (last) *c = 0;  // every slot has arrived: zero for the next call
    s_token[tid] = last ? t : -1;
    __threadfence();
  }
  __syncthreads();
  for (int i = tid; i < ncols * rows; i += NTHR) {
    const int m = i / ncols, c = i - m * ncols, t = s_token[m];
    if (t < 0) continue;
    const float* src = p.ws + (size_t)t * p.topk * p.N + n0 + c;
    float v = 0.f;
    for (int j = 0; j < p.topk; ++j) v += __ldcg(src + (size_t)j * p.N);
    const size_t o = (size_t)t * p.N + n0 + c;
    store<BF16>(p, o, p.moe_res ? v + bits_to_float(p.moe_res[o], BF16) : v);
  }
}

// BF16: activations (and so the mma) are bf16, else fp16.
// MT: 8-column tiles of M per warp (the CTA's M tile is 8 * MT).
// HAS_MIN: float-minimum form; costs one extra mma per tile and k16 step and MT*4 registers, so it
// is a template parameter, while the zero point (two byte loads per k16 step) is a runtime branch.
//
// EPI: the GEMM (grid: N tiles x M tiles x K slices), or the fused MoE pair's gate+up or down for
// prefill-sized groups (grid: N tiles x token tiles, one slice): the tile's expert and up to 8 MT
// (token, slot) pairs come from the grouped list (moe.cu), the x rows are gathered by pair, and the
// expert's weights are read once per tile instead of once per 8 rows as in the decode kernel.
template <bool BF16, int MT, bool HAS_MIN, int EPI = EPI_GEMM>
__global__ void __launch_bounds__(THREADS, MT == 1 && !HAS_MIN ? MIN_CTAS_DECODE : MT >= 8 ? 1 : 2)
    w4a16_kernel(const Params p) {
  using C = Cfg<MT>;
  constexpr bool MOE = EPI != EPI_GEMM;
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ int s_last;
  __shared__ int s_pair[MOE ? 8 * MT : 1], s_token[MOE ? 8 * MT : 1];  // MoE: the tile's pairs

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  int M = p.M, m0 = blockIdx.y * 8 * MT;
  size_t expert = 0;
  if constexpr (MOE) {
    const int4 tl = p.moe_tiles[blockIdx.y];
    if (tl.z == 0) return;  // past the last tile (the grid is sized for the worst case)
    expert = tl.x;
    M = tl.z;
    m0 = 0;
    if (tid < M) s_pair[tid] = p.moe_rows[tl.y + tid];
    __syncthreads();
  }
  // the expert's weights [E][N/16][K/64][32] uint4 and scales / minimums / zero points [E][N/16][G][16]
  const size_t meta_e = expert * p.N * p.G;
  const uint4* pw = p.w + expert * (p.N / 16) * (p.K / 64) * 32;
  const uint16_t* ps = p.s + meta_e;
  const uint16_t* pmn = HAS_MIN ? p.mn + meta_e : nullptr;
  const uint8_t* pzp = p.zp ? p.zp + meta_e : nullptr;
  const int slabs = p.N / 16, slab0 = blockIdx.x * WARPS, slab = slab0 + warp;
  const bool active = slab < slabs;  // the last CTA of N may have idle warps (N % 128 == 64)
  const int nch_total = (p.K + KC - 1) / KC;
  const int c_begin = blockIdx.z * p.cps;
  const int c_end = min(c_begin + p.cps, nch_total);
  const int nch = c_end - c_begin;  // >= 1: the plan leaves no slice empty
  const int kend = min(c_end * KC, p.K);
  const int kb64 = p.K / 64;
  const bool has_zp = p.zp != nullptr;

  // Magic-number dequantization: OR a nibble into the mantissa of EX (1024.0 in fp16, 128.0 in bf16)
  // to get EX + u exactly, then add -(EX + 8 + z): the integer q - z, exact.
  constexpr uint32_t EX = BF16 ? 0x43004300u : 0x64006400u;
  constexpr uint32_t NEG = BF16 ? 0xC300u : 0xE400u;  // -EX; OR (8 + z) in for -(EX + 8 + z)
  constexpr uint32_t ONE2 = BF16 ? 0x3F803F80u : 0x3C003C00u;

  // Copy assignments, fixed for the whole K loop and computed once: v4 recomputed every granule's
  // source address per chunk, ~150 of the ~440 instructions a warp spent per chunk (ncu: 3.58 M
  // instructions for an 8 MB decode GEMM, the SMs issue-bound). Offsets are 32-bit element counts.
  constexpr int WG = WARPS * (KC / 64) * 32 / THREADS;          // weight granules per thread (2)
  constexpr int XG = (8 * MT * (KC / 8) + THREADS - 1) / THREADS;  // activation granules per thread
  static_assert(WG * THREADS == WARPS * (KC / 64) * 32, "weight granules must tile the CTA");
  uint32_t w_off[WG];  // uint4 units from p.w, at chunk 0 of this slice
  bool w_ok[WG];
#pragma unroll
  for (int r = 0; r < WG; ++r) {
    const int i = tid + r * THREADS, w = i / ((KC / 64) * 32), b = (i / 32) % (KC / 64), l = i % 32;
    w_ok[r] = slab0 + w < slabs;
    w_off[r] = ((uint32_t)(slab0 + w) * kb64 + c_begin * (KC / 64) + b) * 32 + l;
  }
  uint32_t x_off[XG];  // halves from p.x at chunk 0; rows past M read nothing (zero-fill)
  bool x_ok[XG], x_in[XG];
#pragma unroll
  for (int r = 0; r < XG; ++r) {
    const int i = tid + r * THREADS, row = i / (KC / 8), c8 = i % (KC / 8);
    x_in[r] = i < 8 * MT * (KC / 8);
    x_ok[r] = x_in[r] && m0 + row < M;
    // MoE: gate+up reads the pair's token, down the pair's row of the intermediate (the plan keeps
    // both offsets below 2^31)
    int xr = m0 + row;
    if constexpr (MOE) xr = x_ok[r] ? (EPI == EPI_GATE_UP ? s_pair[row] / p.topk : s_pair[row]) : 0;
    x_off[r] = x_ok[r] ? (uint32_t)xr * p.K + c_begin * KC + c8 * 8 : 0;
  }
  // meta: threads 0-63 copy scales (and mins) as 16 B halves of (slab, group) rows, 64-95 zero points
  const int meta_w = tid < WARPS * MAXG * 2 ? tid / (MAXG * 2) : (tid - WARPS * MAXG * 2) / MAXG;
  const int meta_gi = tid < WARPS * MAXG * 2 ? (tid / 2) % MAXG : (tid - WARPS * MAXG * 2) % MAXG;
  const bool meta_s = tid < WARPS * MAXG * 2 && slab0 + meta_w < slabs;
  const bool meta_z = has_zp && !meta_s && tid < WARPS * MAXG * 3 && slab0 + meta_w < slabs;
  const uint32_t meta_row = (uint32_t)(slab0 + meta_w) * p.G + meta_gi;  // + the chunk's first group

  auto load_chunk = [&](int c, int stage) {
    uint8_t* base = smem + stage * C::STAGE;
    const int k0 = (c_begin + c) * KC, klen = min(KC, p.K - k0);
    // weights: one 16 B vector per lane per 64-k block, each slab's blocks contiguous in global
#pragma unroll
    for (int r = 0; r < WG; ++r) {
      const int i = tid + r * THREADS, b = (i / 32) % (KC / 64);
      if (w_ok[r] && b * 64 < klen) cp_async16(base + i * 16, pw + w_off[r] + c * (KC / 64) * 32);
    }
    // activations [8*MT][KC] of this chunk; rows past M are zero-filled
    uint16_t* xs = reinterpret_cast<uint16_t*>(base + C::W_BYTES);
#pragma unroll
    for (int r = 0; r < XG; ++r) {
      const int i = tid + r * THREADS, row = i / (KC / 8), c8 = i % (KC / 8);
      if (x_in[r] && c8 * 8 < klen)
        cp_async16(xs + row * C::XS + c8 * 8, x_ok[r] ? p.x + x_off[r] + c * KC : p.x, x_ok[r]);
    }
    // scales, mins, zero points of the groups this chunk touches: 16 rows x ng groups per slab
    const int gfirst = k0 >> p.gshift, ng = ((k0 + klen - 1) >> p.gshift) - gfirst + 1;
    uint8_t* meta = base + C::W_BYTES + C::X_BYTES;
    if (meta_s && meta_gi < ng) {
      const int h = tid % 2;
      const uint32_t src = (meta_row + gfirst) * 16 + h * 8;
      const int dst = ((meta_w * MAXG + meta_gi) * 16 + h * 8) * 2;
      cp_async16(meta + dst, ps + src);
      if (HAS_MIN) cp_async16(meta + C::S_BYTES + dst, pmn + src);
    } else if (meta_z && meta_gi < ng) {
      cp_async16(meta + 2 * C::S_BYTES + (meta_w * MAXG + meta_gi) * 16, pzp + (meta_row + gfirst) * 16);
    }
  };

  // Partial accumulators (sum_k x * (q - z) of the current group, before its scale):
  //
  // HB ("half blocks", decode tiles MT <= 2): one partial accumulator per 32 k of the chunk (the
  // smallest group), all scaled once the chunk's 8 mma steps are issued. The chunk is then straight-
  // line code (no group test or branch between steps), so the compiler can overlap the 8 dequant ->
  // mma chains; v3 tested a group end after every step and ran at 7.6 cycles per issued
  // instruction (ncu), latency-bound. It costs 4 scale FMAs per chunk even when groups are longer.
  constexpr bool HB = MT == 1 || (MT == 2 && !HAS_MIN);  // MT = 2 with the minimum spilled
  constexpr int NACC = HB ? 4 : 1;
  constexpr int NSX = HAS_MIN ? (HB ? 4 : 1) : 1;
  float acc[MT][4], tmp[NACC][MT][4], sx[NSX][MT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      acc[i][j] = 0.f;
#pragma unroll
      for (int a = 0; a < NACC; ++a) tmp[a][i][j] = 0.f;
#pragma unroll
      for (int a = 0; a < NSX; ++a) sx[a][i][j] = 0.f;
    }

#pragma unroll 1  // one copy of load_chunk's code here rather than STAGES - 1 (instruction cache)
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (s < nch) load_chunk(s, s);
    cp_async_commit();  // commit even when empty: the wait below counts groups
  }

  for (int c = 0; c < nch; ++c) {
    cp_async_wait<C::STAGES - 2>();
    __syncthreads();  // chunk c landed for every thread, and stage (c - 1) % STAGES is free again
    if (c + C::STAGES - 1 < nch) load_chunk(c + C::STAGES - 1, (c + C::STAGES - 1) % C::STAGES);
    cp_async_commit();
    if (!active) continue;

    const uint8_t* base = smem + (c % C::STAGES) * C::STAGE;
    const int k0 = (c_begin + c) * KC, klen = min(KC, p.K - k0);
    // Steps after which a group ends, as a bit mask over the chunk's 8 k16 steps: chunks start at
    // multiples of 128 >= group, so this depends on the step's offset alone; the slice's last step
    // always flushes. Computed once per chunk instead of a compare per step.
    uint32_t flush = 0;
#pragma unroll
    for (int st = 0; st < KC / 16; ++st) flush |= (((st * 16 + 16) & p.gmask) == 0 ? 1u : 0u) << st;
    if (k0 + klen == kend) flush |= 1u << (klen / 16 - 1);
    const uint4* sw = reinterpret_cast<const uint4*>(base) + warp * (KC / 64) * 32;
    const uint16_t* xs = reinterpret_cast<const uint16_t*>(base + C::W_BYTES);
    const uint16_t* ss = reinterpret_cast<const uint16_t*>(base + C::W_BYTES + C::X_BYTES) + warp * MAXG * 16;
    const uint16_t* sm = ss + C::S_BYTES / 2;
    const uint8_t* sz = base + C::W_BYTES + C::X_BYTES + 2 * C::S_BYTES + warp * MAXG * 16;
    // this lane's ldmatrix row: lanes 0-7 address k 0-7 of rows 0-7, lanes 8-15 k 8-15 (lanes 16-31
    // repeat them; x2 ignores their addresses)
    const uint16_t* xl = xs + (lane & 7) * C::XS + ((lane >> 3) & 1) * 8;

    // -(EX + 8 + z) for rows g and g + 8 of group gi, both halves (u itself for the float minimum)
    auto neg_bias = [&](int gi, uint32_t& nlo, uint32_t& nhi) {
      if (HAS_MIN) {
        nlo = nhi = NEG | (NEG << 16);
      } else if (has_zp) {
        nlo = NEG | sz[gi * 16 + g];
        nhi = NEG | sz[gi * 16 + g + 8];
        nlo |= nlo << 16;
        nhi |= nhi << 16;
      } else {
        nlo = nhi = (NEG | 8u) | ((NEG | 8u) << 16);
      }
    };
    // one k16 step: dequantize this lane's word into the A fragment, mma into partial `ta`
    auto step = [&](uint32_t q, int kk, int gi, float (*ta)[4], float (*tsx)[4]) {
      uint32_t nlo, nhi;
      neg_bias(gi, nlo, nhi);
      // word nibbles (repack): n0,n4 = row g k 2t,2t+1; n1,n5 = row g+8; n2,n6 = row g k+8; n3,n7
      uint32_t a[4];
      a[0] = fma2<BF16>(and_or(q, 0x000f000fu, EX), ONE2, nlo);
      a[1] = fma2<BF16>(and_or(q >> 4, 0x000f000fu, EX), ONE2, nhi);
      a[2] = fma2<BF16>(and_or(q >> 8, 0x000f000fu, EX), ONE2, nlo);
      a[3] = fma2<BF16>(and_or(q >> 12, 0x000f000fu, EX), ONE2, nhi);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        uint32_t b0, b1;
        ldmatrix_x2(b0, b1, xl + mt * 8 * C::XS + kk);
        mma16816<BF16>(ta[mt], a, b0, b1);
        if constexpr (HAS_MIN) {
          const uint32_t ones[4] = {ONE2, ONE2, ONE2, ONE2};
          mma16816<BF16>(tsx[mt], ones, b0, b1);
        }
      }
    };
    // acc += s * partial (+ m * sum_k x) for group gi: the group's scale in fp32 (precision note above)
    auto scale_into_acc = [&](int gi, float (*ta)[4], float (*tsx)[4]) {
      const float s_lo = bits_to_float(ss[gi * 16 + g], p.scale_bf16);
      const float s_hi = bits_to_float(ss[gi * 16 + g + 8], p.scale_bf16);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        acc[mt][0] += s_lo * ta[mt][0];
        acc[mt][1] += s_lo * ta[mt][1];
        acc[mt][2] += s_hi * ta[mt][2];
        acc[mt][3] += s_hi * ta[mt][3];
        ta[mt][0] = ta[mt][1] = ta[mt][2] = ta[mt][3] = 0.f;
      }
      if constexpr (HAS_MIN) {
        const float m_lo = bits_to_float(sm[gi * 16 + g], p.scale_bf16);
        const float m_hi = bits_to_float(sm[gi * 16 + g + 8], p.scale_bf16);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {  // tsx[mt][0], [1] = sum_k x of columns 2t, 2t+1
          acc[mt][0] += m_lo * tsx[mt][0];
          acc[mt][1] += m_lo * tsx[mt][1];
          acc[mt][2] += m_hi * tsx[mt][0];
          acc[mt][3] += m_hi * tsx[mt][1];
          tsx[mt][0] = tsx[mt][1] = tsx[mt][2] = tsx[mt][3] = 0.f;
        }
      }
    };

    if constexpr (HB) {
#pragma unroll
      for (int b = 0; b < KC / 64; ++b) {
        if (b * 64 < klen) {  // the last chunk of an odd K / 64 holds one block
          const uint4 q4 = sw[b * 32 + lane];
          const uint32_t qw[4] = {q4.x, q4.y, q4.z, q4.w};
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int h = b * 2 + j / 2;  // 32-k half block
            step(qw[j], b * 64 + j * 16, (h * 32) >> p.gshift, tmp[h % NACC], sx[h % NSX]);
          }
        }
      }
#pragma unroll
      for (int h = 0; h < KC / 32; ++h)
        if (h * 32 < klen) scale_into_acc((h * 32) >> p.gshift, tmp[h % NACC], sx[h % NSX]);
    } else {
#pragma unroll
      for (int b = 0; b < KC / 64; ++b) {
        if (b * 64 >= klen) break;
        const uint4 q4 = sw[b * 32 + lane];
        const uint32_t qw[4] = {q4.x, q4.y, q4.z, q4.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int gi = (b * 64 + j * 16) >> p.gshift;  // group within the chunk
          step(qw[j], b * 64 + j * 16, gi, tmp[0], sx[0]);
          // group ends (or the slice does)
          if (flush & (1u << (b * 4 + j))) scale_into_acc(gi, tmp[0], sx[0]);
        }
      }
    }
  }
  cp_async_wait<0>();  // no copy may outlive the CTA's shared memory

  if constexpr (MOE) {
    // the C tile through shared memory (the stages are dead after the barrier) as [8 MT pairs][NT
    // + 4] fp32, then the MoE epilogue reads it by (pair, column)
    constexpr int CS = NT + 4;
    static_assert(8 * MT * CS * 4 <= C::SMEM, "the C tile must fit the stages' shared memory");
    float* ct = reinterpret_cast<float*>(smem);
    __syncthreads();
    if (active) {
      const int nl = warp * 16 + g;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int ml = mt * 8 + 2 * t;
        ct[ml * CS + nl] = acc[mt][0];
        ct[(ml + 1) * CS + nl] = acc[mt][1];
        ct[ml * CS + nl + 8] = acc[mt][2];
        ct[(ml + 1) * CS + nl + 8] = acc[mt][3];
      }
    }
    __syncthreads();
    const int n0 = blockIdx.x * NT, ncols = min(NT, p.N - n0);
    auto pair = [&](int m) { return s_pair[m]; };
    auto val = [&](int m, int c) { return ct[m * CS + c]; };
    if constexpr (EPI == EPI_GATE_UP)
      moe_gate_up_store<BF16, THREADS>(p, M, n0, ncols, pair, val);
    else
      moe_down_store<BF16, THREADS>(p, M, n0, ncols, blockIdx.x, gridDim.x, pair, val, s_token);
    return;
  }

  // C fragment: acc[mt][0..1] = out^T rows n_lo, columns m, m + 1; acc[mt][2..3] rows n_lo + 8
  const int n_lo = slab * 16 + g;
  if (p.splits == 1) {
    if (active) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int m = m0 + mt * 8 + 2 * t;
        if (m < p.M) {
          store<BF16>(p, (size_t)m * p.N + n_lo, acc[mt][0]);
          store<BF16>(p, (size_t)m * p.N + n_lo + 8, acc[mt][2]);
        }
        if (m + 1 < p.M) {
          store<BF16>(p, (size_t)(m + 1) * p.N + n_lo, acc[mt][1]);
          store<BF16>(p, (size_t)(m + 1) * p.N + n_lo + 8, acc[mt][3]);
        }
      }
    }
    return;
  }

  // Split-K: each slice writes fp32 partials [split][8*MT][NT] of its tile; the last slice to arrive
  // (counter per tile) sums them in split order (deterministic) and writes out, then resets the
  // counter for the next call. One launch, no second reduction kernel (its launch gap would cost as
  // much as the whole decode GEMM).
  const int tile = blockIdx.y * gridDim.x + blockIdx.x;
  constexpr int TILE = 8 * MT * NT;
  float* wt = p.ws + (size_t)tile * p.splits * TILE;
  const int nl = warp * 16 + g;
  if (active) {
    float* mine = wt + (size_t)blockIdx.z * TILE;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int ml = mt * 8 + 2 * t;
      if (m0 + ml < p.M) {
        mine[ml * NT + nl] = acc[mt][0];
        mine[ml * NT + nl + 8] = acc[mt][2];
      }
      if (m0 + ml + 1 < p.M) {
        mine[(ml + 1) * NT + nl] = acc[mt][1];
        mine[(ml + 1) * NT + nl + 8] = acc[mt][3];
      }
    }
  }
  // The barrier orders every thread's partials before thread 0's fence, and fences are cumulative
  // (PTX memory model), so one fence releases them all (as CUTLASS's Semaphore does); v5 fenced in
  // every thread and ncu counted 0.45 cycles of membar stall per issued instruction.
  __syncthreads();
  if (tid == 0) {
    __threadfence();
    s_last = atomicAdd(p.cnt + tile, 1) == p.splits - 1;
    __threadfence();  // acquire: the other slices' partials, read below through L2 (__ldcg)
  }
  __syncthreads();
  if (!s_last) return;
  if (active) {
    // ZU slices' loads per round, all independent, so the sum costs ceil(splits / ZU) L2 round
    // trips rather than one per slice (v1 summed one load at a time: 10 us of a 13.5 us decode GEMM).
    constexpr int ZU = MT <= 2 ? 8 : 2;
    float v[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 4; ++h) v[mt][h] = 0.f;
    for (int z0 = 0; z0 < p.splits; z0 += ZU) {
#pragma unroll
      for (int zz = 0; zz < ZU; ++zz) {
        if (z0 + zz >= p.splits) break;
        const float* src = wt + (size_t)(z0 + zz) * TILE;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int h = 0; h < 4; ++h) {  // h: (column +0/+1) x (row +0/+8)
            const int ml = mt * 8 + 2 * t + (h & 1), nn = nl + (h >> 1) * 8;
            if (m0 + ml < p.M) v[mt][h] += __ldcg(src + ml * NT + nn);
          }
      }
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 4; ++h) {
        const int ml = mt * 8 + 2 * t + (h & 1), nn = nl + (h >> 1) * 8;
        if (m0 + ml < p.M) store<BF16>(p, (size_t)(m0 + ml) * p.N + blockIdx.x * NT + nn, v[mt][h]);
      }
  }
  if (tid == 0) p.cnt[tile] = 0;
}

// > 48 KB of dynamic shared memory needs an opt-in per kernel; done once per process and device
// (`opted`: the kernel's own flags). max_carveout: also ask for the largest shared-memory share of
// the SM's L1 (the decode kernel: four CTAs of up to ~55 KB an SM; its loads bypass L1 anyway).
template <typename Kern>
int opt_in_smem(Kern kern, int bytes, bool* opted, bool max_carveout = false) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return M3E_ERR_CUDA;
  if (dev < 64 && !opted[dev]) {
    if (cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) != cudaSuccess)
      return M3E_ERR_CUDA;
    if (max_carveout && cudaFuncSetAttribute(kern, cudaFuncAttributePreferredSharedMemoryCarveout,
                                             cudaSharedmemCarveoutMaxShared) != cudaSuccess)
      return M3E_ERR_CUDA;
    opted[dev] = true;
  }
  return M3E_OK;
}

template <bool BF16, int MT, bool HAS_MIN, int EPI = EPI_GEMM>
int launch(const Params& p, dim3 grid, cudaStream_t stream) {
  auto kern = w4a16_kernel<BF16, MT, HAS_MIN, EPI>;
  static bool opted[64] = {};
  if (int rc = opt_in_smem(kern, Cfg<MT>::SMEM, opted); rc != M3E_OK) return rc;
  kern<<<grid, THREADS, Cfg<MT>::SMEM, stream>>>(p);
  return cudaGetLastError() == cudaSuccess ? M3E_OK : M3E_ERR_CUDA;
}

// One activation dtype's dispatch over (MT, HAS_MIN); defined in w4a16_f16.cu / w4a16_bf16.cu so
// that ninja compiles the two halves in parallel.
int launch_f16(const Params& p, int mt, bool has_min, dim3 grid, cudaStream_t stream);
int launch_bf16(const Params& p, int mt, bool has_min, dim3 grid, cudaStream_t stream);

// The instantiations, listed (STYLE.md 4): M tiles of 8/16/32/64 rows (decode to prefill), each with
// and without the float minimum; zero points and the scale dtype are runtime flags.
#define M3E_W4A16_DISPATCH(BF16)                                             \
  switch (mt * 2 + (has_min ? 1 : 0)) {                                      \
    case 2: return launch<BF16, 1, false>(p, grid, stream);                  \
    case 3: return launch<BF16, 1, true>(p, grid, stream);                   \
    case 4: return launch<BF16, 2, false>(p, grid, stream);                  \
    case 5: return launch<BF16, 2, true>(p, grid, stream);                   \
    case 8: return launch<BF16, 4, false>(p, grid, stream);                  \
    case 9: return launch<BF16, 4, true>(p, grid, stream);                   \
    case 16: return launch<BF16, 8, false>(p, grid, stream);                 \
    case 17: return launch<BF16, 8, true>(p, grid, stream);                  \
    default: return M3E_ERR_ARG;                                             \
  }

}  // namespace w4
}  // namespace m3e

// W4A16 decode kernel (M <= 8): the weights stream through a per-lane cp.async ring, no barrier.
//
// At M <= 8 the GEMM is a stream of weight bytes (8 MB for 4096 x 4096) with a few FLOPs each. The
// tile kernel (w4a16.cuh) moved them through a cp.async pipeline with a barrier per 128-k chunk and
// reached ~21 % of copy bandwidth (NOTES.md, v1-v7). Here every warp keeps its next DU 512-byte
// blocks in flight, each lane copying (cp.async) and later reading back only its own 16 bytes, so
// the K loop has no barrier; the activations (M x K, small) and the scales are staged once per CTA
// and requested before the weights, and x is read as mma B fragments by ldmatrix.
// Same repacked layout as the tile kernel (swap AB); the arithmetic differs in one step (v12): the A
// fragment is C + u straight from the lop3 (no subtraction: 7 instructions per 8 weights in place of
// 11), and the C' sum_k x that this adds is taken off by starting each half block's fp32 accumulator
// at -C' sum_k x, summed once per CTA. The products are still exact; the sums now carry values ~C'
// times larger than the result, so the fp32 rounding is ~2^-19 relative rather than ~2^-24 (the
// parity bound is 1e-3).
//
//   grid = (N / (16 NS), splits); CTA = 8 warps = NS slabs (16 rows of N) x WK = 8 / NS warps along K
//
//            the CTA's K slice in 64-k blocks (one slab's blocks are contiguous, 512 B each)
//           +----+----+----+----+----+----+----+----+----+----+ ...
//   slab 0  | w0 | w1 | .. | w7 | w0 | w1 | .. | w7 | w0 | .. |        NS = 1, WK = 8
//           +----+----+----+----+----+----+----+----+----+----+
//   x[M][slice] in shared memory (cp.async, once) -> ldmatrix.x4 -> B fragments (2 per block)
//   C fragments of the WK warps of a slab -> shared memory -> summed in warp order -> out; with
//   split-K, a partial that the slice's last CTA sums in slice order (deterministic, as the tiles do)
//
// The fused MoE pair (moe.cu) is this kernel with another epilogue (EPI): grid = (token tiles, N
// tiles), each CTA one expert's slabs for up to 8 (token, slot) rows gathered from the grouped list,
// no split-K; gate+up writes silu(gate) * up, down the routing-weighted slot outputs and the last
// of a token's slots to arrive sums them in slot order.
#pragma once

#include "trace.cuh"
#include "w4a16.cuh"

namespace m3e {
namespace w4 {

// Blocks in flight per warp (2 KB; 16 KB per CTA): 8 measured the same (NOTES.md v10), 2 and 3 slower
// (R22). Warps per CTA and CTAs per SM: 8 and 4 (R24; the registers allow 1024 threads an SM at 64
// a thread). With 16 warps, two an SM, the same warps ran half as many CTAs at once, and a decode
// launch is set by its CTAs' fixed phases (the wait, the expert id, the scales' round trip, the
// reduction and stores: NOTES.md "CTA timelines"), which twice the CTAs overlap: the one-token MoE
// pair 43-44 -> 40-42 us, lite-24g 379 -> 399 tok/s. 4 warps, eight an SM, was slower (364).
constexpr int DU = 4;
constexpr int DWARPS = 8;  // 8 / NS warps along K per slab
constexpr int DTHREADS = DWARPS * 32;
constexpr int DECODE_CTAS_PER_SM = 1024 / DTHREADS;  // __launch_bounds__: 64K registers, 64 a thread
constexpr int DECODE_MAX_M = 8;   // one 8-column B tile; the tile kernel is faster from M = 9 (NOTES.md v10)
constexpr int DECODE_SMEM_MAX = 96 << 10;  // fits the 99 KB a block may have on sm_86/sm_89
// The plan's limit on x (M K 2 bytes) for the decode kernel: every CTA stages all of its K slice, and
// past this the slice no longer fits one CTA and the split-K fixup made the decode kernel slower
// than the tile kernel (NOTES.md v10: M = 4 at 14336 x 4096, M = 8 at 4096 x 4096).
constexpr int DECODE_X_MAX = 32 << 10;

static inline int align16(int b) { return (b + 15) & ~15; }

// Groups a slice of 64 cps k can touch: cps * 64 >> gshift, plus one when a group-128 slice starts
// mid group (gshift 31 = per channel: one).
static inline int decode_groups(int cps, int gshift, int G) {
  const int gs = gshift >= 31 ? 1 : ((cps * 64) >> gshift) + 1;
  return gs < G ? gs : G;
}

// Shared memory of a decode CTA (host side; the kernel gets the offsets in Params):
//   x     [M][64 cps + 8] halves (cp.async); +16 B per row so an ldmatrix phase's 8 rows hit 8 bank groups
//   meta  [NS][units][8 rows r] float2 {s_r, s_r+8}, or float4 {s_r, s_r+8, m_r, m_r+8} in the affine
//         form: each unit's scale (and minimum), expanded from the groups once per CTA so that the K
//         loop reads them with one load; a unit is a 32-k half block for group 32, else a 64-k block
//   sx    [2 cps half blocks][M rounded up to even] float: -C' times the half block's sum of a row of
//         x (see the K loop)
//   raw   [NS][gs][16] scales as stored, then minimums (16-bit) or zero points (bytes) (cp.async)
//   nw    [K] the fused norm's weights (cp.async), where the launch has a norm and they fit (else
//         the norm reads them from global memory)
//   ring  [warp][DU][32 lanes] 16 B: the weights in flight
// After the K loop the warps' C fragments reuse the space from offset 0.
struct DecodeSmem {
  int gs, meta, sx, raw_s, raw_2, nw, ring, total;
  DecodeSmem(int M, int ns, int cps, int gshift, int G, bool has_min, bool has_zp, bool norm = false) {
    const int units = gshift == 5 ? 2 * cps : cps;
    gs = decode_groups(cps, gshift, G);
    meta = align16(M * (cps * 64 + 8) * 2);
    sx = meta + ns * units * 8 * (has_min || has_zp ? 16 : 8);
    raw_s = sx + align16(2 * cps * ((M + 1) & ~1) * 4);
    raw_2 = raw_s + align16(ns * gs * 32);
    nw = raw_2 + align16(has_min ? ns * gs * 32 : has_zp ? ns * gs * 16 : 0);
    ring = nw;
    total = ring + DWARPS * DU * 512;
    if (norm && total + cps * 128 <= DECODE_SMEM_MAX) {  // else the norm reads them from global memory
      ring += cps * 128;
      total += cps * 128;
    }
    const int red = DWARPS * 4 * 32 * 4;
    if (total < red) total = red;
  }
};

// The layout fields of Params for a decode launch of ns slabs per CTA over K slices of cps blocks.
static inline void decode_layout(Params& p, const DecodeSmem& L, int ns, int cps) {
  p.ns = ns;
  p.wk_shift = 0;
  while ((ns << (p.wk_shift + 1)) <= DWARPS) p.wk_shift++;  // log2(DWARPS / ns)
  p.xstride = cps * 64 + 8;
  p.gs = L.gs;
  p.sm_meta = L.meta;
  p.sm_sx = L.sx;
  p.sm_raw_s = L.raw_s;
  p.sm_raw_2 = L.raw_2;
  p.sm_ring = L.ring;
  p.sm_nw = L.ring > L.nw ? L.nw : 0;
}

// One thread of a CTA: wait until *count reaches target (another launch's CTAs raise it after their
// stores), then count this CTA among the n that read it; the last of them zeroes both for the next call
// (nothing raises count again before all n have read it).
__device__ __forceinline__ void await_count(int* count, int target, int* readers, int n) {
  while (ld_acquire(count) < target) __nanosleep(32);
  if (atomicAdd(readers, 1) == n - 1) {
    *count = 0;
    *readers = 0;
  }
}

// BF16: activation dtype. AFFINE: w = u s + m with u = q + 8 in [0, 15]: the float-minimum form, and
// the zero-point form with m = -s (z + 8); m sum_k x is added per scale unit from the same sums of x
// that correct the A fragment. 4 CTAs per SM: 64 registers.
// EPI: the epilogue (Epilogue); the MoE ones read their rows and expert from the tile list (or, with
// none, their one pair's expert from the ids).
// W8: a symmetric int8 W (the GEMM only) as two int4 planes read in one pass: q = 16 (u_hi - 8 + u_lo /
// 16) with p.w the high plane (nibbles u_hi = (q >> 4) + 8) and p.w2 the low one (u_lo = q & 15), both
// in the int4 layout, and p.s 16 times the int8 scale. The low plane's A fragment is (C + u_lo) / 16,
// exact in both 16-bit types (8 + u / 16 in bf16, 64 + u / 16 in fp16: the exponent of C / 16, u in
// the mantissa), so both planes accumulate into one chain per half block against the same B
// fragments, started at -(17 C / 16 + 8) sum_k x: sums as large as the int4 form's, so the same
// rounding. A ring block is then the two planes' 512 bytes.
template <bool BF16, bool AFFINE, int EPI, bool W8 = false>
__global__ void __launch_bounds__(DTHREADS, DECODE_CTAS_PER_SM) w4a16_decode_kernel(const Params p) {
  static_assert(!W8 || (!AFFINE && EPI == EPI_GEMM), "W8: the symmetric GEMM only");
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ int s_last;
#ifdef M3E_TRACE
  __shared__ unsigned long long s_trace[4];
  M3E_STAMP(0)
  M3E_STAMP(1)
#endif
  constexpr bool MOE = EPI != EPI_GEMM;
  constexpr int E = AFFINE ? 16 : 8;  // meta entry bytes
  constexpr uint32_t EX = BF16 ? 0x43004300u : 0x64006400u;  // C in both halves: EX | u = C + u (w4a16.cuh)
  constexpr uint32_t EXL = BF16 ? 0x41004100u : 0x54005400u;  // C / 16 in both: EXL | u = (C + u) / 16
  constexpr int RB = W8 ? DU / 2 : DU;  // blocks in the ring (a W8 block is two 512-byte planes)
  constexpr uint32_t ONE2 = BF16 ? 0x3F803F80u : 0x3C003C00u;
  const uint32_t sb = smem_u32(smem);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int wks = p.wk_shift, wk = 1 << wks, ns = p.ns, sl = warp >> wks, kp = warp & (wk - 1);
  const int K = p.K, cps = p.cps, gshift = p.gshift, gs = p.gs, xstride = p.xstride;
  // GEMM: grid (N tiles, splits). MoE: grid (token tiles, N tiles), one slice, the tile's expert; at
  // one token (no tile list) grid (N tiles, pairs): CTAs start pair by pair, so gate+up finishes its
  // pairs in order and down's CTAs, started in the same order, wait for their own pair only
  const bool direct = MOE && !p.moe_tiles;
  // one token: CTA row y is pair y, or with a pre-routed last pair (moe_pre_id) that pair first
  const int drow = !direct ? 0 : p.moe_pre_id < 0 ? blockIdx.y : (blockIdx.y + gridDim.y - 1) % gridDim.y;
  const bool pre = direct && p.moe_pre_id >= 0 && drow == (int)gridDim.y - 1;
  int rows = p.M, row0 = 0, expert = 0;
  if constexpr (EPI == EPI_GATE_UP) {
    if (pre && p.moe_early) {
      // the pre-routed pair reads only x (the launch before routing wrote it) and its own weights:
      // wait for routing's flag that x is settled, not for routing; the pair's last CTA past here
      // clears the flag and the count for the next call (the next routing runs after this launch)
      if (tid == 0) await_count(p.moe_early, 1, p.moe_early + 1, gridDim.x);
      __syncthreads();
    } else {
      // launched dependent on the grouping or routing (sm_90): its tiles or ids are read next; once
      // every gate+up CTA is past this point they are complete, and down's CTAs may start streaming
      // their weights
      pdl_wait();
    }
    M3E_STAMP(1)
    pdl_launch_dependents();
  }
  if constexpr (MOE) {
    if (p.moe_tiles) {
      const int4 t = p.moe_tiles[blockIdx.x];
      if (t.z == 0) return;  // past the last tile (the grid is sized for the worst case)
      expert = t.x;
      row0 = t.y;
      rows = t.z;
    } else {  // one pair per CTA row, no grouping launch (moe.cu: one token); its expert is read below
      row0 = drow;
      rows = 1;
    }
  }
  const int ntile = MOE && !direct ? blockIdx.y : blockIdx.x, ntiles = MOE && !direct ? gridDim.y : gridDim.x;
  const int slab0 = ntile * ns, kb_lo = MOE ? 0 : blockIdx.y * cps;
  // the r-th pair of a MoE tile: the grouped list's entry, or the CTA's own pair
  auto pair_of = [&](int r) { return p.moe_tiles ? p.moe_rows[row0 + r] : row0 + r; };
  // a row of x: the GEMM's row r; gate+up: the token of the r-th pair of the tile; down: that pair's
  // row of the intermediate
  auto xrow = [&](int r) -> const uint16_t* {
    if constexpr (MOE) {
      const int pr = pair_of(r);
      return p.x + (size_t)(EPI == EPI_GATE_UP ? pr / p.topk : pr) * K;
    } else {
      return p.x + (size_t)r * K;
    }
  };
  const int nkb = min(cps, K / 64 - kb_lo);                    // the slice's blocks, >= 1
  const int nb = nkb > kp ? (nkb - kp + wk - 1) >> wks : 0;    // this warp's: kp, kp + wk, ...
  const int g_lo = (kb_lo * 64) >> gshift;
  const int gn = (((kb_lo + nkb) * 64 - 1) >> gshift) - g_lo + 1;  // groups of this slice, <= gs

  // 1. the small inputs first, in two cp.async groups ahead of the weights' (v14): (A) the slice's x
  //    rows and the fused norm's weights, (B) its groups' scales and minimums / zero points, as
  //    stored. The norm and the sums of x need only A, so they run while B is in flight; the scales
  //    come from DRAM behind every CTA's weight requests, x from L2.
  // (loops not unrolled: they run about once per thread, and unrolling adds remainder bookkeeping)
  // The GEMM launched as a programmatic dependent (sm_90: p.pdl) gets x after the wait, as down does:
  // its CTAs start while the kernel before runs and stream their weights meanwhile. x then comes by
  // plain loads (step 3), so that waiting for it does not wait for the weights' groups (v14).
  const bool late_x = EPI == EPI_DOWN || (EPI == EPI_GEMM && p.pdl);
  if (!late_x) {
#pragma unroll 1
    for (int r = 0; r < rows; ++r) {
      const uint16_t* xr = xrow(r) + kb_lo * 64;
#pragma unroll 1
      for (int c = tid; c < nkb * 8; c += DTHREADS) cp_async16(sb + (r * xstride + c * 8) * 2, xr + c * 8);
    }
  }
  if (p.sm_nw) {  // the norm's weights (one K slice: the whole row)
#pragma unroll 1
    for (int c = tid; c < K / 8; c += DTHREADS) cp_async16(sb + p.sm_nw + c * 16, p.norm_w + c * 8);
  }
  cp_async_commit();
  if constexpr (MOE) {
    if (direct) {
      const long long id = pre            ? p.moe_pre_id
                           : p.ids_i64 ? static_cast<const long long*>(p.moe_ids)[row0]
                                       : static_cast<const int*>(p.moe_ids)[row0];
      expert = id >= 0 && id < p.moe_E ? (int)id : -1;
    }
  }
  if (MOE && expert < 0) {  // an id of no expert: nothing to compute; down counts its zero slot as arrived
    cp_async_wait<0>();     // no copy may outlive the CTA's shared memory
    if constexpr (EPI == EPI_DOWN) {
      __shared__ int s_tok;
      pdl_wait();  // the slots and counters of the launch before are settled
      moe_down_store<BF16, DTHREADS>(p, 1, slab0 * 16, 16 * ns, ntile, ntiles, pair_of,
                                     [](int, int) { return 0.f; }, &s_tok);
    }
    return;
  }
  // the expert's weights: [E][N/16][K/64][32] uint4, scales / minimums / zero points [E][N/16][G][16]
  const uint4* pw = p.w + (size_t)expert * (p.N / 16) * (K / 64) * 32;
  const size_t meta_e = (size_t)expert * p.N * p.G;
#pragma unroll 1
  for (int s = 0; s < ns; ++s)  // 16 scales of a (slab, group): two 16-byte granules
#pragma unroll 1
    for (int c = tid; c < gn * 2; c += DTHREADS) {
      const size_t src = meta_e + ((size_t)(slab0 + s) * p.G + g_lo) * 16 + c * 8;
      cp_async16(sb + p.sm_raw_s + (s * gs * 2 + c) * 16, p.s + src);
      if (AFFINE && p.mn) cp_async16(sb + p.sm_raw_2 + (s * gs * 2 + c) * 16, p.mn + src);
      if (AFFINE && p.zp && c % 2 == 0) cp_async16(sb + p.sm_raw_2 + (s * gs + c / 2) * 16, p.zp + src);
    }
  cp_async_commit();

  // 2. this warp's first DU blocks, one commit group each. cp.async rather than loads to registers:
  //    ptxas sank such loads below the barrier of step 3 (v9), and their order behind the group
  //    above is what keeps the weights in flight while x and the scales arrive
  const size_t w_at = ((size_t)(slab0 + sl) * (K / 64) + kb_lo + kp) * 32 + lane;
  const uint4* wn = pw + w_at;
  const uint4* wn2 = W8 ? p.w2 + w_at : nullptr;                   // W8: the low plane
  const int wstep = wk * 32;                                       // uint4 between this warp's blocks
  const uint32_t ring = sb + p.sm_ring + (warp * DU * 32 + lane) * 16;  // slot u at + 512 u
#pragma unroll
  for (int u = 0; u < RB; ++u) {  // W8: block u in slots 2u (high plane) and 2u + 1 (low)
    if (u < nb) {
      cp_async16(ring + (W8 ? 2 * u : u) * 512, wn + u * wstep);
      if constexpr (W8) cp_async16(ring + (2 * u + 1) * 512, wn2 + u * wstep);
    }
    cp_async_commit();
  }
  wn += RB * wstep;
  if constexpr (W8) wn2 += RB * wstep;

  // 3. x (late: now, by plain loads), the norm and the sums of x; then the scales (and minimums)
  //    expanded per scale unit, while the weights are in flight. Down's x is gate+up's output: with
  //    the dependent launch (sm_90) its CTAs get here while gate+up drains
  if (late_x) {
    if (EPI == EPI_DOWN && direct) {
      // one token: wait for this pair's gate+up CTAs only (their arrival count), not the whole launch,
      // so down's CTAs fill the SMs that gate+up's last wave leaves idle. Every gate+up CTA has passed
      // its own wait before any down CTA starts (the dependent launch), so what it read is settled,
      // and down's last store to out needs every pair here: gate+up has read x by then. The pair's
      // last reader zeroes both counts for the next call.
      if (tid == 0) await_count(p.moe_ready + row0, p.moe_ready_target, p.moe_ready + p.topk + row0, ntiles);
      __syncthreads();
    } else {
      pdl_wait();
    }
    M3E_STAMP(1)
    // x from L2 (.cg: written by other CTAs of a running launch, for down), 4 vectors a thread in flight
    const int per = nkb * 8, total = rows * per;
#pragma unroll 1
    for (int c0 = tid; c0 < total; c0 += 4 * DTHREADS) {
      uint4 v[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int c = c0 + j * DTHREADS, r = c / per;
        if (c < total) v[j] = __ldcg(reinterpret_cast<const uint4*>(xrow(r) + kb_lo * 64 + (c - r * per) * 8));
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int c = c0 + j * DTHREADS, r = c / per;
        if (c < total) sts_u4(sb + (r * xstride + (c - r * per) * 8) * 2, v[j]);
      }
    }
  }
  cp_async_wait<RB + 1>();  // group A: x (unless late) and the norm's weights
  __syncthreads();
  if constexpr (EPI == EPI_GEMM || EPI == EPI_GATE_UP) {
    if (p.norm_w) {  // the fused RMSNorm: the whole row is here (one K slice); m3e_rmsnorm's arithmetic
      __shared__ float s_ss[DECODE_MAX_M][DWARPS];
      const int nv = K / 8;  // 16-byte vectors of a row
      const uint4* nw = reinterpret_cast<const uint4*>(p.norm_w);
#pragma unroll 1
      for (int r = 0; r < rows; ++r) {
        float ss = 0.f;
#pragma unroll 1
        for (int v = tid; v < nv; v += DTHREADS) {
          const uint4 xv = lds_u4(sb + (r * xstride + v * 8) * 2);
          ss += dot8_bits<BF16>(xv, xv);
        }
        for (int o = 16; o; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        if (lane == 0) s_ss[r][warp] = ss;
      }
      __syncthreads();
#pragma unroll 1
      for (int r = 0; r < rows; ++r) {
        float ss = 0.f;
#pragma unroll
        for (int w = 0; w < DWARPS; ++w) ss += s_ss[r][w];
        const float rr = rsqrtf(ss / K + p.norm_eps);
#pragma unroll 1
        for (int v = tid; v < nv; v += DTHREADS) {
          const uint32_t a = sb + (r * xstride + v * 8) * 2;
          sts_u4(a, scale8_bits<BF16>(lds_u4(a), p.sm_nw ? lds_u4(sb + p.sm_nw + v * 16) : __ldg(nw + v), rr));
        }
      }
      __syncthreads();  // the normed rows, before the sums of x below read them
    }
  }
  // The A fragment holds C + u (u = q + 8 in [0, 15], C = 128 in bf16, 1024 in fp16: one lop3 per two
  // weights, exact), so the tensor cores sum x (C + u); the C' sum_k x the form needs taken off
  // (C' = C + 8 symmetric, C affine) starts the half block's accumulator: sx[hb][m] = -C' times the
  // sum of row m of x over half block hb, here, once per CTA: 4 threads a half block, 16 bytes of
  // every row each, all rows' loads issued together (the weights' ring is only DU blocks deep, so
  // this prologue's latency is the stream's; an mma with A = ones, a dependent pair per half block
  // and warp, was 0.3-1.1 us slower at M = 1, NOTES.md v12)
  constexpr float CX = BF16 ? 128.f : 1024.f;
  constexpr float CS = W8 ? CX * 17.f / 16.f + 8.f : AFFINE ? CX : CX + 8.f;
  const int nu = 2 * nkb;         // half blocks of the slice
  const int mp = (p.M + 1) & ~1;  // sx entries a half block; columns past the tile's rows are left
                                  // unset (their products are never stored)
#pragma unroll 1
  for (int i0 = warp * 32; i0 < nu * 4; i0 += DTHREADS) {  // i: (half block, quarter); whole warps
    const int i = i0 + lane, hb = i >> 2;
    const uint32_t xi = sb + min(i, nu * 4 - 1) * 16;  // (a lane past the slice reads a valid vector)
#pragma unroll 1
    for (int r0 = 0; r0 < rows; r0 += 4) {  // 4 rows' loads at a time (8 spilled in the MoE down kernel)
      uint4 v[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        if (r0 + r >= rows) break;
        v[r] = lds_u4(xi + (r0 + r) * xstride * 2);
      }
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        if (r0 + r >= rows) break;
        float sum = dot8_bits<BF16>(v[r], make_uint4(ONE2, ONE2, ONE2, ONE2));
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        if ((i & 3) == 0 && hb < nu)
          *reinterpret_cast<float*>(smem + p.sm_sx + (hb * mp + r0 + r) * 4) = -CS * sum;
      }
    }
  }
  // ldmatrix.x4 row of this lane: row lane & 7 (rows past M repeat row M - 1: their product columns
  // are never stored), k offset 8 (lane >> 3) = matrix lane >> 3
  const uint32_t xl = sb + (min(lane & 7, rows - 1) * xstride + (lane >> 3) * 8) * 2;
  const int hus = gshift == 5, nm = nkb << hus;  // meta units a block (log2), of the slice
  cp_async_wait<RB>();  // group B: the scales
  __syncthreads();
#pragma unroll 1
  for (int s = 0; s < ns; ++s)
#pragma unroll 1
    for (int e = tid; e < nm * 8; e += DTHREADS) {
      const int un = e >> 3, r = e & 7;
      const int raw = (s * gs + (((kb_lo * 64 + (un << (6 - hus))) >> gshift) - g_lo)) * 16 + r;
      const uint16_t* rs = reinterpret_cast<const uint16_t*>(smem + p.sm_raw_s);
      const float s_lo = bits_to_float(rs[raw], p.scale_bf16), s_hi = bits_to_float(rs[raw + 8], p.scale_bf16);
      uint8_t* dst = smem + p.sm_meta + ((s * nm + un) * 8 + r) * E;
      if constexpr (AFFINE) {
        // w = u s + m: the accumulator holds sum x u, and m sum_k x = (m / -C) sx (a power of two: exact)
        float m_lo, m_hi;
        if (p.mn) {
          const uint16_t* rm = reinterpret_cast<const uint16_t*>(smem + p.sm_raw_2);
          m_lo = bits_to_float(rm[raw], p.scale_bf16);
          m_hi = bits_to_float(rm[raw + 8], p.scale_bf16);
        } else {  // (u - 8 - z) s = u s - (z + 8) s, exact in fp32 (11-bit scale times a 4-bit integer)
          const uint8_t* rz = smem + p.sm_raw_2;
          m_lo = -s_lo * (float)rz[raw];
          m_hi = -s_hi * (float)rz[raw + 8];
        }
        *reinterpret_cast<float4*>(dst) = make_float4(s_lo, s_hi, m_lo * (-1.f / CX), m_hi * (-1.f / CX));
      } else {
        *reinterpret_cast<float2*>(dst) = make_float2(s_lo, s_hi);
      }
    }
  __syncthreads();

  // 4. the K loop: this warp's blocks kp, kp + wk, ... of slab sl; block i's slot is refilled with
  //    block i + DU once its 16 bytes are in registers, so DU - 1 to DU stay in flight
  const uint32_t xa = xl + kp * 128;  // this lane's ldmatrix row, block kp
  // this lane's meta entries (rows g, g + 8) and sx entries (columns 2t, 2t + 1; a column pair past
  // the tile's rows reads the last pair), from block kp; mh, sh: the second half block's offsets
  uint32_t ma = sb + p.sm_meta + ((sl * nm + (kp << hus)) * 8 + (lane >> 2)) * E;
  uint32_t sa = sb + p.sm_sx + (2 * kp * mp + min(2 * (lane & 3), mp - 2)) * 4;
  uint32_t mh = hus * 8 * E, sh = mp * 4;
  // bytes to this warp's next block: x, meta, sx, weights (uint4)
  const uint32_t xstep = wk * 128, mstep = (wk << hus) * 8 * E, sstep = wk * 2 * mp * 4, wstep_ = wstep;
  // the loop's addresses and the dequantization constant pinned in registers (ptx.cuh pin); the
  // steps are left to ptxas (pinning them too spilled in the MoE down kernel)
  uint32_t ex = EX, exl = EXL, xa_ = xa, ring_ = ring;
  pin(ma), pin(sa), pin(mh), pin(sh), pin(ex), pin(xa_), pin(ring_);
  if constexpr (W8) pin(exl);
  float acc[4] = {0.f, 0.f, 0.f, 0.f};

  // one block: 4 k16 steps, two 32-k half blocks with an accumulator each (two independent mma
  // chains). Each starts at its sx (the C' sum_k x taken off, fp32) and is scaled into acc in fp32 at
  // the block's end by its unit's scale. xo: the block's offset in x, bytes (128 per block), from
  // block kp.
  auto block = [&](const uint4& w, const uint4& w2, uint32_t xo) {
    const uint32_t qw[4] = {w.x, w.y, w.z, w.w}, qw2[4] = {w2.x, w2.y, w2.z, w2.w};
    uint32_t b[8];
    ldmatrix_x4(&b[0], xa_ + xo);
    ldmatrix_x4(&b[4], xa_ + xo + 64);
    float tmp[2][4];
    float2 c[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      c[h] = lds64(h ? sa + sh : sa);
      tmp[h][0] = c[h].x, tmp[h][1] = c[h].y, tmp[h][2] = c[h].x, tmp[h][3] = c[h].y;
    }
#pragma unroll
    for (int st = 0; st < 4; ++st) {
      const uint32_t qv = qw[st];  // nibble order: w4a16.cuh step()
      const uint32_t a[4] = {and_or(qv, 0x000f000fu, ex), and_or(qv >> 4, 0x000f000fu, ex),
                             and_or(qv >> 8, 0x000f000fu, ex), and_or(qv >> 12, 0x000f000fu, ex)};
      mma16816<BF16>(tmp[st >> 1], a, b[2 * st], b[2 * st + 1]);
      if constexpr (W8) {  // the low plane, (C + u_lo) / 16
        const uint32_t ql = qw2[st];
        const uint32_t al[4] = {and_or(ql, 0x000f000fu, exl), and_or(ql >> 4, 0x000f000fu, exl),
                                and_or(ql >> 8, 0x000f000fu, exl), and_or(ql >> 12, 0x000f000fu, exl)};
        mma16816<BF16>(tmp[st >> 1], al, b[2 * st], b[2 * st + 1]);
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float* t = tmp[h];
      if constexpr (AFFINE) {  // + (m / -C) sx: the half block's m sum_k x; two fma a value (written as
        // acc += s t + m' sx it was a mul, an fma and an add: a third more instructions in the loop)
        const float4 sm = lds128(h ? ma + mh : ma);
        acc[0] = fmaf(sm.z, c[h].x, fmaf(sm.x, t[0], acc[0]));
        acc[1] = fmaf(sm.z, c[h].y, fmaf(sm.x, t[1], acc[1]));
        acc[2] = fmaf(sm.w, c[h].x, fmaf(sm.y, t[2], acc[2]));
        acc[3] = fmaf(sm.w, c[h].y, fmaf(sm.y, t[3], acc[3]));
      } else {
        const float2 sc = lds64(h ? ma + mh : ma);
        acc[0] += sc.x * t[0];
        acc[1] += sc.x * t[1];
        acc[2] += sc.y * t[2];
        acc[3] += sc.y * t[3];
      }
    }
    ma += mstep;
    sa += sstep;
  };

  M3E_STAMP(2)
  uint32_t xo = 0;
  for (int i0 = 0; i0 < nb; i0 += RB) {
#pragma unroll
    for (int u = 0; u < RB; ++u) {
      if (i0 + u < nb) {
        const uint32_t slot = ring_ + (W8 ? 2 * u : u) * 512;
        cp_async_wait<RB - 1>();  // this lane's copy of block i0 + u landed (one group per block)
        const uint4 w = lds_u4(slot);
        block(w, W8 ? lds_u4(slot + 512) : w, xo);
        xo += xstep;
        if (i0 + u + RB < nb) {
          cp_async16(slot, wn);
          if constexpr (W8) cp_async16(slot + 512, wn2);
        }
        cp_async_commit();  // even when empty: the wait above counts groups
        wn += wstep_;
        if constexpr (W8) wn2 += wstep_;
      }
    }
  }
  cp_async_wait<0>();  // no copy may outlive the CTA's shared memory
  M3E_STAMP(3)
  // the weights are read: the next launch (a dependent on sm_90) may start its CTAs; they wait for
  // this grid to complete before reading its output
  if constexpr (EPI != EPI_GATE_UP) pdl_launch_dependents();

  // 5. the WK partials of each slab: C fragments through shared memory (x is dead by the barrier),
  //    summed in warp order; output index n fastest so that the stores coalesce
  __syncthreads();
  float* red = reinterpret_cast<float*>(smem);  // [warp][4][32 lanes]
#pragma unroll
  for (int j = 0; j < 4; ++j) red[(warp * 4 + j) * 32 + lane] = acc[j];
  __syncthreads();
  // the sum over the WK warps of slab s, row r of the slab, column m, in warp order
  auto reduced = [&](int s, int r, int m) {
    // C fragment (ptx.cuh mma16816): row r = g or g + 8 of the slab, column m = 2t or 2t + 1
    const int ln = (r & 7) * 4 + (m >> 1), j = (r >> 3) * 2 + (m & 1);
    const float* src = red + ((s << wks) * 4 + j) * 32 + ln;
    float v = 0.f;
    for (int k = 0; k < wk; ++k) v += src[k * 128];
    return v;
  };
  const int nrow = 16 * ns, nout = nrow * rows, n0 = slab0 * 16;

  if constexpr (MOE) {
    __shared__ int s_token[DECODE_MAX_M];
    auto val = [&](int m, int c) { return reduced(c >> 4, c & 15, m); };
    if constexpr (EPI == EPI_GATE_UP) {
      moe_gate_up_store<BF16, DTHREADS>(p, rows, n0, nrow, pair_of, val);
      if (direct) {  // one more of this pair's CTAs has stored (the fence pattern of the split-K fixup)
        __syncthreads();
        if (tid == 0) {
          __threadfence();
          atomicAdd(p.moe_ready + row0, 1);
        }
      }
    } else {
      moe_down_store<BF16, DTHREADS>(p, rows, n0, nrow, ntile, ntiles, pair_of, val, s_token);
    }
    M3E_TRACE_OUT(EPI)
    return;
  }

  float* mine = p.splits > 1 ? p.ws + ((size_t)ntile * p.splits + blockIdx.y) * nout : nullptr;
  for (int i = tid; i < nout; i += DTHREADS) {
    const int m = i / nrow, nl = i - m * nrow;
    const float v = reduced(nl >> 4, nl & 15, m);
    if (p.splits == 1)
      store<BF16>(p, (size_t)m * p.N + n0 + nl, v);
    else
      mine[i] = v;
  }
  M3E_TRACE_OUT(EPI)
  if (p.splits == 1) return;

  // split-K: the last slice to arrive sums the slices' partials in slice order (w4a16.cuh explains
  // the single fence)
  __syncthreads();
  if (tid == 0) {
    __threadfence();
    s_last = atomicAdd(p.cnt + ntile, 1) == p.splits - 1;
    __threadfence();
  }
  __syncthreads();
  if (!s_last) return;
  const float* all = p.ws + (size_t)ntile * p.splits * nout;
  for (int i = tid; i < nout; i += DTHREADS) {
    const int m = i / nrow, nl = i - m * nrow;
    float v = 0.f;
    for (int z = 0; z < p.splits; ++z) v += __ldcg(all + (size_t)z * nout + i);
    store<BF16>(p, (size_t)m * p.N + n0 + nl, v);
  }
  if (tid == 0) p.cnt[ntile] = 0;
}

// pdl: launch as a programmatic dependent of the stream's previous kernel (sm_90 only; the MoE
// launches: pdl_wait / pdl_launch_dependents in the kernel say what may overlap).
template <bool BF16, bool AFFINE, int EPI = EPI_GEMM, bool W8 = false>
int launch_decode(const Params& p, dim3 grid, int smem, cudaStream_t stream, bool pdl = false) {
  auto kern = w4a16_decode_kernel<BF16, AFFINE, EPI, W8>;
  static bool opted[64] = {};
  if (int rc = opt_in_smem(kern, DECODE_SMEM_MAX, opted, true); rc != M3E_OK) return rc;
  return launch_kernel(kern, grid, dim3(DTHREADS), smem, stream, pdl, p) == cudaSuccess ? M3E_OK : M3E_ERR_CUDA;
}

// The GEMM's launches (p.pdl: as a programmatic dependent, sm_90).
int launch_decode_f16(const Params& p, dim3 grid, int smem, cudaStream_t stream);
int launch_decode_bf16(const Params& p, dim3 grid, int smem, cudaStream_t stream);

// The instantiations, listed: symmetric or affine (zero point or float minimum), per activation dtype;
// int8 (W8: p.w2, symmetric).
#define M3E_W4A16_DECODE_DISPATCH(BF16)                                                               \
  return p.w2 ? launch_decode<BF16, false, EPI_GEMM, true>(p, grid, smem, stream, p.pdl != 0)       \
              : p.mn || p.zp ? launch_decode<BF16, true>(p, grid, smem, stream, p.pdl != 0) \
                             : launch_decode<BF16, false>(p, grid, smem, stream, p.pdl != 0);

}  // namespace w4
}  // namespace m3e

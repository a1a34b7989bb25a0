// W4A16 decode kernel (M <= 8): the weights stream through a per-lane cp.async ring, no barrier.
//
// At M <= 8 the GEMM is a stream of weight bytes (8 MB for 4096 x 4096) with a few FLOPs each. The
// tile kernel (w4a16.cuh) moved them through a cp.async pipeline with a barrier per 128-k chunk and
// reached ~21 % of copy bandwidth (NOTES.md, v1-v7). Here every warp keeps its next DU 512-byte
// blocks in flight, each lane copying (cp.async) and later reading back only its own 16 bytes, so
// the K loop has no barrier; the activations (M x K, small) and the scales are staged once per CTA
// and requested before the weights, and x is read as mma B fragments by ldmatrix.
// Same repacked layout and the same arithmetic as the tile kernel (swap AB, integer A fragment, the
// group scale applied in fp32 per 32-k half block), so both paths are exact to fp32 rounding.
//
//   grid = (N / (16 NS), splits); CTA = 16 warps = NS slabs (16 rows of N) x WK = 16 / NS warps along K
//
//            the CTA's K slice in 64-k blocks (one slab's blocks are contiguous, 512 B each)
//           +----+----+----+----+----+----+----+----+----+----+ ...
//   slab 0  | w0 | w1 | .. | w15| w0 | w1 | .. | w15| w0 | .. |        NS = 1, WK = 16
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

#include "w4a16.cuh"

namespace m3e {
namespace w4 {

// Blocks in flight per warp (2 KB; 32 KB per CTA) and warps per CTA: 8 in flight or 8 warps per CTA
// measured the same (NOTES.md v10).
constexpr int DU = 4;
constexpr int DWARPS = 16;  // 16 / NS warps along K per slab
constexpr int DTHREADS = DWARPS * 32;
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
//   meta  [NS][2 cps half blocks][8 rows r] float2 {s_r, s_r+8}, or float4 {s_r, s_r+8, m_r, m_r+8} in
//         the affine form: each 32-k half block's scale (and minimum), expanded from the groups once
//         per CTA so that the K loop reads them with one load at the same offset as x
//   raw   [NS][gs][16] scales as stored, then minimums (16-bit) or zero points (bytes) (cp.async)
//   ring  [warp][DU][32 lanes] 16 B: the weights in flight
// After the K loop the warps' C fragments reuse the space from offset 0.
struct DecodeSmem {
  int gs, meta, raw_s, raw_2, ring, total;
  DecodeSmem(int M, int ns, int cps, int gshift, int G, bool has_min, bool has_zp) {
    gs = decode_groups(cps, gshift, G);
    meta = align16(M * (cps * 64 + 8) * 2);
    raw_s = meta + ns * 2 * cps * 8 * (has_min || has_zp ? 16 : 8);
    raw_2 = raw_s + align16(ns * gs * 32);
    ring = raw_2 + align16(has_min ? ns * gs * 32 : has_zp ? ns * gs * 16 : 0);
    total = ring + DWARPS * DU * 512;
    const int red = DWARPS * 4 * 32 * 4;
    if (total < red) total = red;
  }
};

// BF16: activation dtype. AFFINE: w = u s + m with u = q + 8 in [0, 15]: the float-minimum form, and
// the zero-point form with m = -s (z + 8); one more mma per step with A = ones gives sum_k x (as in
// the tile kernel), and m sum_k x is added per half block. 2 CTAs per SM: 64 registers (48 / 64 used).
// EPI: the epilogue (Epilogue); the MoE ones read their rows and expert from the tile list (or, with
// none, their one pair's expert from the ids).
template <bool BF16, bool AFFINE, int EPI>
__global__ void __launch_bounds__(DTHREADS, 2) w4a16_decode_kernel(const Params p) {
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ int s_last;
  constexpr bool MOE = EPI != EPI_GEMM;
  constexpr int E = AFFINE ? 16 : 8;  // meta entry bytes
  const uint32_t sb = smem_u32(smem);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int wks = p.wk_shift, wk = 1 << wks, ns = p.ns, sl = warp >> wks, kp = warp & (wk - 1);
  const int K = p.K, cps = p.cps, gshift = p.gshift, gs = p.gs, xstride = p.xstride;
  // GEMM: grid (N tiles, splits). MoE: grid (token tiles, N tiles), one slice, the tile's expert
  int rows = p.M, row0 = 0, expert = 0;
  if constexpr (EPI == EPI_GATE_UP) {
    // launched dependent on the grouping (sm_90): its tiles are read next; once every gate+up CTA is
    // past this point the grouping is complete, and down's CTAs may start streaming their weights
    pdl_wait();
    pdl_launch_dependents();
  }
  if constexpr (MOE) {
    if (p.moe_tiles) {
      const int4 t = p.moe_tiles[blockIdx.x];
      if (t.z == 0) return;  // past the last tile (the grid is sized for the worst case)
      expert = t.x;
      row0 = t.y;
      rows = t.z;
    } else {  // one pair per CTA column, no grouping launch (moe.cu: one token)
      const long long id = p.ids_i64 ? static_cast<const long long*>(p.moe_ids)[blockIdx.x]
                                     : static_cast<const int*>(p.moe_ids)[blockIdx.x];
      row0 = blockIdx.x;
      rows = 1;
      expert = id >= 0 && id < p.moe_E ? (int)id : -1;
    }
  }
  const int ntile = MOE ? blockIdx.y : blockIdx.x;
  const int slab0 = ntile * ns, kb_lo = MOE ? 0 : blockIdx.y * cps;
  // the r-th pair of a MoE tile: the grouped list's entry, or the CTA's own pair
  auto pair_of = [&](int r) { return p.moe_tiles ? p.moe_rows[row0 + r] : row0 + r; };
  if (MOE && expert < 0) {  // an id of no expert: nothing to compute; down counts its zero slot as arrived
    if constexpr (EPI == EPI_DOWN) {
      __shared__ int s_tok;
      pdl_wait();  // the slots and counters of the launch before are settled
      moe_down_store<BF16, DTHREADS>(p, 1, slab0 * 16, 16 * ns, ntile, gridDim.y, pair_of,
                                     [](int, int) { return 0.f; }, &s_tok);
    }
    return;
  }
  // the expert's weights: [E][N/16][K/64][32] uint4, scales / minimums / zero points [E][N/16][G][16]
  const uint4* pw = p.w + (size_t)expert * (p.N / 16) * (K / 64) * 32;
  const size_t meta_e = (size_t)expert * p.N * p.G;
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

  // 1. the small inputs first, so that their DRAM requests queue ahead of the weights': the slice's
  //    x rows and its groups' scales and minimums / zero points, as stored
  // (loops not unrolled: they run about once per thread, and unrolling adds remainder bookkeeping)
  auto stage_x = [&]() {
#pragma unroll 1
    for (int r = 0; r < rows; ++r) {
      const uint16_t* xr = xrow(r) + kb_lo * 64;
#pragma unroll 1
      for (int c = tid; c < nkb * 8; c += DTHREADS) cp_async16(sb + (r * xstride + c * 8) * 2, xr + c * 8);
    }
  };
  // The GEMM launched as a programmatic dependent (sm_90: p.pdl) stages x after the wait, as down
  // does: its CTAs start while the kernel before (the norm) runs and stream their weights meanwhile.
  const bool late_x = EPI == EPI_DOWN || (EPI == EPI_GEMM && p.pdl);
  if (!late_x) stage_x();
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
  const uint4* wn = pw + ((size_t)(slab0 + sl) * (K / 64) + kb_lo + kp) * 32 + lane;
  const int wstep = wk * 32;                                       // uint4 between this warp's blocks
  const uint32_t ring = sb + p.sm_ring + (warp * DU * 32 + lane) * 16;  // slot u at + 512 u
#pragma unroll
  for (int u = 0; u < DU; ++u) {
    if (u < nb) cp_async16(ring + u * 512, wn + u * wstep);
    cp_async_commit();
  }
  wn += DU * wstep;

  // 3. expand the scales (and minimums) per 32-k half block while the weights are in flight. Down's
  //    x is gate+up's output: with the dependent launch (sm_90) its CTAs get here while gate+up
  //    drains, so x is requested only after the wait, and all groups are awaited (x is the last)
  if (late_x) {
    pdl_wait();
    stage_x();
    cp_async_commit();
    cp_async_wait<0>();
  } else {
    cp_async_wait<DU>();
  }
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
          sts_u4(a, scale8_bits<BF16>(lds_u4(a), __ldg(nw + v), rr));
        }
      }
      // (the barrier after the scale expansion below orders these writes before the K loop's reads)
    }
  }
#pragma unroll 1
  for (int s = 0; s < ns; ++s)
#pragma unroll 1
    for (int e = tid; e < nkb * 16; e += DTHREADS) {
      const int hb = e >> 3, r = e & 7;
      const int raw = (s * gs + (((kb_lo * 64 + hb * 32) >> gshift) - g_lo)) * 16 + r;
      const uint16_t* rs = reinterpret_cast<const uint16_t*>(smem + p.sm_raw_s);
      const float s_lo = bits_to_float(rs[raw], p.scale_bf16), s_hi = bits_to_float(rs[raw + 8], p.scale_bf16);
      uint8_t* dst = smem + p.sm_meta + ((s * 2 * cps + hb) * 8 + r) * E;
      if constexpr (AFFINE) {
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
        *reinterpret_cast<float4*>(dst) = make_float4(s_lo, s_hi, m_lo, m_hi);
      } else {
        *reinterpret_cast<float2*>(dst) = make_float2(s_lo, s_hi);
      }
    }
  __syncthreads();

  // 4. the K loop: this warp's blocks kp, kp + wk, ... of slab sl; block i's slot is refilled with
  //    block i + DU once its 16 bytes are in registers, so DU - 1 to DU stay in flight
  constexpr uint32_t EX = BF16 ? 0x43004300u : 0x64006400u;  // magic-number dequantization (w4a16.cuh)
  constexpr uint32_t ONE2 = BF16 ? 0x3F803F80u : 0x3C003C00u;
  // -(EX + 8) in both halves gives q = u - 8 (symmetric); -EX gives u (affine)
  constexpr uint32_t NEG2 = (BF16 ? (AFFINE ? 0xC300u : 0xC308u) : (AFFINE ? 0xE400u : 0xE408u)) * 0x10001u;
  // ldmatrix.x4 row of this lane: row lane & 7 (rows past M repeat row M - 1: their product columns
  // are never stored), k offset 8 (lane >> 3) = matrix lane >> 3; then block kp
  const uint32_t xa = sb + (min(lane & 7, rows - 1) * xstride + (lane >> 3) * 8 + kp * 64) * 2;
  // this lane's meta entries (rows g, g + 8) from block kp: 16 E bytes per block
  const uint32_t ma = sb + p.sm_meta + ((sl * 2 * cps + 2 * kp) * 8 + (lane >> 2)) * E;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};

  // one block: 4 k16 steps in two 32-k halves (the smallest group); each half's integer partial sum
  // is scaled into acc in fp32 (the precision note in w4a16.cuh). xo: the block's offset in x, bytes
  // (128 per block), from block kp.
  auto block = [&](const uint4& w, uint32_t xo) {
    const uint32_t qw[4] = {w.x, w.y, w.z, w.w};
    uint32_t b[8];
    ldmatrix_x4(&b[0], xa + xo);
    ldmatrix_x4(&b[4], xa + xo + 64);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float tmp[4] = {0.f, 0.f, 0.f, 0.f}, tsx[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int jj = 0; jj < 2; ++jj) {
        const uint32_t qv = qw[2 * h + jj];  // nibble order: w4a16.cuh step()
        uint32_t a[4];
        a[0] = fma2<BF16>(and_or(qv, 0x000f000fu, EX), ONE2, NEG2);
        a[1] = fma2<BF16>(and_or(qv >> 4, 0x000f000fu, EX), ONE2, NEG2);
        a[2] = fma2<BF16>(and_or(qv >> 8, 0x000f000fu, EX), ONE2, NEG2);
        a[3] = fma2<BF16>(and_or(qv >> 12, 0x000f000fu, EX), ONE2, NEG2);
        const int st = 4 * h + 2 * jj;
        mma16816<BF16>(tmp, a, b[st], b[st + 1]);
        if constexpr (AFFINE) {
          const uint32_t ones[4] = {ONE2, ONE2, ONE2, ONE2};
          mma16816<BF16>(tsx, ones, b[st], b[st + 1]);
        }
      }
      const uint32_t e = ma + xo * (E / 8) + h * 8 * E;  // half block 2 kb + h
      if constexpr (AFFINE) {  // + m sum_k x; tsx[0..1] = sum_k x of columns 2t, 2t + 1
        const float4 sm = lds128(e);
        acc[0] += sm.x * tmp[0] + sm.z * tsx[0];
        acc[1] += sm.x * tmp[1] + sm.z * tsx[1];
        acc[2] += sm.y * tmp[2] + sm.w * tsx[0];
        acc[3] += sm.y * tmp[3] + sm.w * tsx[1];
      } else {
        const float2 sc = lds64(e);
        acc[0] += sc.x * tmp[0];
        acc[1] += sc.x * tmp[1];
        acc[2] += sc.y * tmp[2];
        acc[3] += sc.y * tmp[3];
      }
    }
  };

  const uint32_t xstep = wk * 128;  // x bytes from one of this warp's blocks to the next
  uint32_t xo = 0;
  for (int i0 = 0; i0 < nb; i0 += DU) {
#pragma unroll
    for (int u = 0; u < DU; ++u) {
      if (i0 + u < nb) {
        cp_async_wait<DU - 1>();  // this lane's copy of block i0 + u landed (one group per block)
        block(lds_u4(ring + u * 512), xo);
        xo += xstep;
        if (i0 + u + DU < nb) cp_async16(ring + u * 512, wn);
        cp_async_commit();  // even when empty: the wait above counts groups
        wn += wstep;
      }
    }
  }
  cp_async_wait<0>();  // no copy may outlive the CTA's shared memory
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
    if constexpr (EPI == EPI_GATE_UP)
      moe_gate_up_store<BF16, DTHREADS>(p, rows, n0, nrow, pair_of, val);
    else
      moe_down_store<BF16, DTHREADS>(p, rows, n0, nrow, ntile, gridDim.y, pair_of, val, s_token);
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
template <bool BF16, bool AFFINE, int EPI = EPI_GEMM>
int launch_decode(const Params& p, dim3 grid, int smem, cudaStream_t stream, bool pdl = false) {
  auto kern = w4a16_decode_kernel<BF16, AFFINE, EPI>;
  static bool opted[64] = {};
  if (int rc = opt_in_smem(kern, DECODE_SMEM_MAX, opted); rc != M3E_OK) return rc;
  return launch_kernel(kern, grid, dim3(DTHREADS), smem, stream, pdl, p) == cudaSuccess ? M3E_OK : M3E_ERR_CUDA;
}

// The GEMM's launches (p.pdl: as a programmatic dependent, sm_90).
int launch_decode_f16(const Params& p, dim3 grid, int smem, cudaStream_t stream);
int launch_decode_bf16(const Params& p, dim3 grid, int smem, cudaStream_t stream);

// The instantiations, listed: symmetric or affine (zero point or float minimum), per activation dtype.
#define M3E_W4A16_DECODE_DISPATCH(BF16)                                                \
  return p.mn || p.zp ? launch_decode<BF16, true>(p, grid, smem, stream, p.pdl != 0) \
                      : launch_decode<BF16, false>(p, grid, smem, stream, p.pdl != 0);

}  // namespace w4
}  // namespace m3e

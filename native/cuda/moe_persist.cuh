// The one-token fused MoE pair in one persistent launch (v16): as many CTAs as fit the GPU at once,
// each taking (pair, N tile) items of gate+up and then of down in one global order, so that a CTA's
// weight stream runs on across items instead of draining at every CTA's end and at the launch
// boundary (NOTES.md, "CTA timelines": a two-launch call spends its first ~7 us and the gaps at its
// second wave and at the last pairs' down with few CTAs in their K loop).
//
//   items: [gate+up: pair 0 tiles 0..TG-1, pair 1 ..., pair P-1] [down: pair 0 tiles 0..TD-1, ...]
//   CTA:   claim two items (an atomic counter), then one more per item, two ahead of the one it runs
//
//   K loop of item i (the decode kernel's: per-lane cp.async ring of DU blocks, no barrier) ...
//     ... its last DU refills are item i+1's first blocks, with item i+1's scales in the first
//   epilogue of i (sums of the warps, stores, counts) | item i+1's scales expanded | (down: its x)
//   K loop of item i+1, its ring already full
//
// Items are handed out by a counter, in order: a CTA that is not resident holds none, and a down item
// waits only for gate+up items of lower index, each held by a running CTA that never waits before it
// finishes them. So no residency assumption: no wait can deadlock, however few CTAs run at once.
// gate+up's x (the token's row, normed once per CTA) and its sums are the same for every gate+up
// item; down's x is the item's pair's intermediate row, read once the pair's gate+up count is full.
// Arithmetic, per item, is the decode kernel's at M = 1 (w4a16_decode.cuh), so the outputs are its
// outputs for the same slabs per CTA.
#pragma once

#include <type_traits>

#include "w4a16_decode.cuh"

namespace m3e {
namespace w4 {

constexpr int PERSIST_MAX_PAIRS = 32;  // T topk at one token (top k <= 16, plus a shared slot)

// One kind of item, gate+up (0) or down (1): ns slabs of 16 rows per item, 16 / ns = 2^wks warps
// along K, nb blocks per warp (a multiple of DU, >= DU), items per pair, groups per slab, and where
// its x row and its sums of x sit in shared memory.
struct PersistKind {
  int ns, wks, nb, tiles, gn, x_off, sx_off;
};

struct PersistArgs {
  PersistKind k[2];
  int pairs;                         // T topk, T = 1
  int n_gu, n_items;                 // gate+up items, all items
  int hus;                           // 1: group 32 (a scale per half block), else 0
  int sm_meta, sm_raw_s, sm_nw, sm_red, sm_ring;  // shared memory (sm_nw 0: norm weights from global)
  int* claim;                        // [2]: items handed out, CTAs done; zero between calls
};

template <bool BF16>
__global__ void __launch_bounds__(DTHREADS, 2) moe_persist_kernel(const __grid_constant__ Params pg, const __grid_constant__ Params pd,
                                                                  const __grid_constant__ PersistArgs a) {
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ int s_ids[PERSIST_MAX_PAIRS];  // the pairs' experts (-1: no expert)
  __shared__ int s_it[2];                   // this CTA's items: running, next (-1: none)
  __shared__ int s_token[1];
  __shared__ const uint4* s_wn[DWARPS];     // each warp's first weight vector of the next item (lane 0's)
  __shared__ float s_ss[DWARPS];
  constexpr int E = 8;  // meta entry bytes: float2 {s_r, s_r+8}
  constexpr uint32_t EX = BF16 ? 0x43004300u : 0x64006400u;
  constexpr uint32_t ONE2 = BF16 ? 0x3F803F80u : 0x3C003C00u;
  constexpr float CX = BF16 ? 128.f : 1024.f;
  constexpr float CS = CX + 8.f;
  const uint32_t sb = smem_u32(smem);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  // (shapes from the parameter bank, not registers: the K loops need every register they can get)
  const int &n_gu = a.n_gu, &n_items = a.n_items, &hus = a.hus, &gshift = pg.gshift;

  // item -> kind, pair, N tile (pair-major within each kind)
  auto kind_of = [&](int it) { return it >= n_gu; };
  auto pair_of = [&](int it) { return it < n_gu ? it / a.k[0].tiles : (it - n_gu) / a.k[1].tiles; };
  auto tile_of = [&](int it) { return it < n_gu ? it % a.k[0].tiles : (it - n_gu) % a.k[1].tiles; };
  // the item's expert (no expert: expert 0's weights stream and the result is dropped)
  auto expert_of = [&](int it) { return max(s_ids[pair_of(it)], 0); };
  // this lane's first weight vector of item it, and the step between its blocks (uint4)
  auto wfirst = [&](int it) -> const uint4* {
    const int k = kind_of(it);
    const Params& p = k ? pd : pg;
    const int wks = a.k[k].wks, kp = warp & ((1 << wks) - 1), sl = warp >> wks, nkb = p.K / 64;
    return p.w + (size_t)expert_of(it) * (p.N / 16) * nkb * 32 +
           ((size_t)(tile_of(it) * a.k[k].ns + sl) * nkb + kp) * 32 + lane;
  };
  auto wstep = [&](int it) { return 32 << a.k[kind_of(it)].wks; };
  // item it's scales (and minimums / zero points) as stored, into the raw region (cp.async, no commit)
  auto issue_scales = [&](int it) {
    const int k = kind_of(it);
    const Params& p = k ? pd : pg;
    const int ns = a.k[k].ns, gn = a.k[k].gn;
    const size_t base = (size_t)expert_of(it) * p.N * p.G + (size_t)tile_of(it) * ns * 16 * p.G;
#pragma unroll 1
    for (int e = tid; e < ns * gn * 2; e += DTHREADS) {
      const int s = e / (gn * 2), c = e - s * gn * 2;
      const size_t src = base + (size_t)s * p.G * 16 + c * 8;
      cp_async16(sb + a.sm_raw_s + (s * gn * 2 + c) * 16, p.s + src);
    }
  };
  // the raw scales of an item of kind k expanded per scale unit (w4a16_decode.cuh, step 3)
  auto expand = [&](int k) {
    const Params& p = k ? pd : pg;
    const int ns = a.k[k].ns, gn = a.k[k].gn, nm = (p.K / 64) << hus;
#pragma unroll 1
    for (int e = tid; e < ns * nm * 8; e += DTHREADS) {
      const int s = e / (nm * 8), un = (e >> 3) - s * nm, r = e & 7;
      const int raw = (s * gn + ((un << (6 - hus)) >> gshift)) * 16 + r;
      const uint16_t* rs = reinterpret_cast<const uint16_t*>(smem + a.sm_raw_s);
      const float s_lo = bits_to_float(rs[raw], p.scale_bf16), s_hi = bits_to_float(rs[raw + 8], p.scale_bf16);
      *reinterpret_cast<float2*>(smem + a.sm_meta + ((s * nm + un) * 8 + r) * E) = make_float2(s_lo, s_hi);
    }
  };
  // -C' times each half block's sum of kind k's x row (one column: M = 1)
  auto sums = [&](int k) {
    const int nu = 2 * ((k ? pd.K : pg.K) / 64);
    const uint32_t xs = sb + a.k[k].x_off;
    float* sx = reinterpret_cast<float*>(smem + a.k[k].sx_off);
#pragma unroll 1
    for (int i0 = warp * 32; i0 < nu * 4; i0 += DTHREADS) {
      const int i = i0 + lane, hb = i >> 2;
      float sum = dot8_bits<BF16>(lds_u4(xs + min(i, nu * 4 - 1) * 16), make_uint4(ONE2, ONE2, ONE2, ONE2));
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      if ((i & 3) == 0 && hb < nu) sx[hb * 2] = -CS * sum;
    }
  };
  // a down item's wait: its pair's gate+up items have all stored (w4a16_decode.cuh step 3: the acquire
  // by one thread, then the barrier); every down item of the pair counts itself a reader, and the
  // last zeroes both of the pair's counts for the next call. Then, when its pair is not the one
  // staged (load), the pair's intermediate row and its sums. An empty pair has no count and no row.
  auto down_x = [&](int it, bool load) {
    const int pr = pair_of(it);
    if (s_ids[pr] < 0) return;
    if (tid == 0) {
      while (ld_acquire(pg.moe_ready + pr) < pg.moe_ready_target) __nanosleep(32);
      if (atomicAdd(pg.moe_ready + pg.topk + pr, 1) == a.k[1].tiles - 1) {
        pg.moe_ready[pr] = 0;
        pg.moe_ready[pg.topk + pr] = 0;
      }
    }
    __syncthreads();
    if (!load) return;
    const uint4* src = reinterpret_cast<const uint4*>(pd.x + (size_t)pr * pd.K);
#pragma unroll 1
    for (int c = tid; c < pd.K / 8; c += DTHREADS) sts_u4(sb + a.k[1].x_off + c * 16, __ldcg(src + c));
    __syncthreads();
    sums(1);
  };

  // 1. before the wait: the norm's weights (static). After it: the ids, gate+up's x row, the first
  //    two items (group A: x and the norm's weights)
  if (a.sm_nw) {
#pragma unroll 1
    for (int c = tid; c < pg.K / 8; c += DTHREADS) cp_async16(sb + a.sm_nw + c * 16, pg.norm_w + c * 8);
  }
  pdl_wait();  // the ids (routing) and x are the launches' before
  pdl_launch_dependents();
#pragma unroll 1
  for (int c = tid; c < pg.K / 8; c += DTHREADS) cp_async16(sb + a.k[0].x_off + c * 16, pg.x + c * 8);
  cp_async_commit();
  if (tid < a.pairs) {
    const long long id = pg.ids_i64 ? static_cast<const long long*>(pg.moe_ids)[tid]
                                    : static_cast<const int*>(pg.moe_ids)[tid];
    s_ids[tid] = id >= 0 && id < pg.moe_E ? (int)id : -1;
  }
  // two items, claimed one at a time so that the CTAs' first items are the first ones in the order
  // (every pair's gate+up tiles spread over the grid, pair by pair, as a launch's first wave would
  // have them; two items at once gave each CTA two tiles of one pair and held every pair's down back)
  const int first = tid == 0 ? atomicAdd(a.claim, 1) : 0, second = tid == 0 ? atomicAdd(a.claim, 1) : 0;
  if (tid == 0) s_it[0] = first < n_items ? first : -1;
  __syncthreads();
  if (const int cur = s_it[0]; cur >= 0) {
    // 2. the first item's scales (group B) and ring (a group per block), as the decode kernel's start
    issue_scales(cur);
    cp_async_commit();
    {
      const uint4* wn = wfirst(cur);
      const int ws = wstep(cur);
      const uint32_t ring = sb + a.sm_ring + (warp * DU * 32 + lane) * 16;
#pragma unroll
      for (int u = 0; u < DU; ++u) {
        cp_async16(ring + u * 512, wn + u * ws);
        cp_async_commit();
      }
    }
    // 3. gate+up's x normed (m3e_rmsnorm's arithmetic) and its sums, once
    cp_async_wait<DU + 1>();
    __syncthreads();
    if (pg.norm_w) {
      const int nv = pg.K / 8;
      float ss = 0.f;
#pragma unroll 1
      for (int v = tid; v < nv; v += DTHREADS) {
        const uint4 xv = lds_u4(sb + a.k[0].x_off + v * 16);
        ss += dot8_bits<BF16>(xv, xv);
      }
      for (int o = 16; o; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
      if (lane == 0) s_ss[warp] = ss;
      __syncthreads();
      ss = 0.f;
#pragma unroll
      for (int w = 0; w < DWARPS; ++w) ss += s_ss[w];
      const float rr = rsqrtf(ss / pg.K + pg.norm_eps);
      const uint4* nw = reinterpret_cast<const uint4*>(pg.norm_w);
#pragma unroll 1
      for (int v = tid; v < nv; v += DTHREADS) {
        const uint32_t ad = sb + a.k[0].x_off + v * 16;
        sts_u4(ad, scale8_bits<BF16>(lds_u4(ad), a.sm_nw ? lds_u4(sb + a.sm_nw + v * 16) : __ldg(nw + v), rr));
      }
      __syncthreads();
    }
    sums(0);
    if (kind_of(cur)) down_x(cur, true);
    cp_async_wait<DU>();  // group B: the first item's scales
    __syncthreads();
    expand(kind_of(cur));
  }
  if (tid == 0) s_it[1] = second < n_items && s_it[0] >= 0 ? second : -1;
  __syncthreads();

  // 4. the items. At entry: cur's ring holds its first DU blocks, its scales are expanded, its x and
  //    sums are staged; s_it[1] is the next item.
  // cur's K loop; kind KC a compile-time constant, so its layout is read from the parameter bank
  // rather than held in registers. Leaves the warps' C fragments in the red region [warp][4][32 lanes].
  auto k_loop = [&](auto kc) {
    constexpr int KC = decltype(kc)::value;
    const Params& p = KC ? pd : pg;
    const int wks = a.k[KC].wks, wk = 1 << wks, kp = warp & (wk - 1), sl = warp >> wks;
    const int nm = (p.K / 64) << hus;
    uint32_t ma = sb + a.sm_meta + ((sl * nm + (kp << hus)) * 8 + (lane >> 2)) * E;
    uint32_t sa = sb + a.k[KC].sx_off + 16 * kp;
    uint32_t mh = hus * 8 * E;  // the second half block's meta offset (sx: 8 bytes)
    const uint32_t xstep = wk * 128, mstep = (wk << hus) * 8 * E, sstep = wk * 16;
    uint32_t ex = EX, xa_ = sb + a.k[KC].x_off + (lane >> 3) * 16 + kp * 128;
    uint32_t ring_ = sb + a.sm_ring + (warp * DU * 32 + lane) * 16;
    pin(ma), pin(sa), pin(mh), pin(ex), pin(xa_), pin(ring_);
    // the next item's scales, into the raw region (cur's were expanded before its loop): they join
    // the first refill's group. And where this warp's blocks of it start (read back in the last pass:
    // less to hold in registers through the loop)
    if (s_it[1] >= 0) {
      issue_scales(s_it[1]);
      if (lane == 0) s_wn[warp] = wfirst(s_it[1]);
    }
    __syncwarp();
    int ws = 32 << wks;                                      // uint4 between this warp's blocks
    const uint4* wn = wfirst(s_it[0]) + DU * ws;             // this lane's block DU (its first DU are in the ring)
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
      auto block = [&](const uint4& w, uint32_t xo) {  // w4a16_decode.cuh's, int4 only
        const uint32_t qw[4] = {w.x, w.y, w.z, w.w};
        uint32_t b[8];
        ldmatrix_x4(&b[0], xa_ + xo);
        ldmatrix_x4(&b[4], xa_ + xo + 64);
        float tmp[2][4];
        float2 c[2];
  #pragma unroll
        for (int h = 0; h < 2; ++h) {
          c[h] = lds64(h ? sa + 8 : sa);
          tmp[h][0] = c[h].x, tmp[h][1] = c[h].y, tmp[h][2] = c[h].x, tmp[h][3] = c[h].y;
        }
  #pragma unroll
        for (int st = 0; st < 4; ++st) {
          const uint32_t qv = qw[st];
          const uint32_t af[4] = {and_or(qv, 0x000f000fu, ex), and_or(qv >> 4, 0x000f000fu, ex),
                                  and_or(qv >> 8, 0x000f000fu, ex), and_or(qv >> 12, 0x000f000fu, ex)};
          mma16816<BF16>(tmp[st >> 1], af, b[2 * st], b[2 * st + 1]);
        }
  #pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float* t = tmp[h];
          const float2 sc = lds64(h ? ma + mh : ma);
          acc[0] += sc.x * t[0];
          acc[1] += sc.x * t[1];
          acc[2] += sc.y * t[2];
          acc[3] += sc.y * t[3];
        }
        ma += mstep;
        sa += sstep;
      };
    uint32_t xo = 0;
    auto pass = [&](bool refill) {  // DU blocks: each slot refilled with the block DU later
#pragma unroll
      for (int u = 0; u < DU; ++u) {
        const uint32_t slot = ring_ + u * 512;
        cp_async_wait<DU - 1>();  // this lane's copy of the block landed (one group per block)
        const uint4 w = lds_u4(slot);
        block(w, xo);
        xo += xstep;
        if (refill) cp_async16(slot, wn);
        cp_async_commit();  // even when empty: the wait above counts groups
        wn += ws;
      }
    };
#pragma unroll 1
    for (int i0 = DU; i0 <= a.k[KC].nb; i0 += DU) {
      bool refill = true;
      if (i0 == a.k[KC].nb) {  // the last pass refills the ring with the next item's first blocks
        const int nx = s_it[1];
        refill = nx >= 0;
        if (refill) {
          wn = s_wn[warp] + lane;
          ws = wstep(nx);
        }
      }
      pass(refill);
    }
    const int nxt = s_it[1];
    // the next item's scales came with the loop's first refill (in the last pass's first group when
    // that is the only pass); the ring now holds the next item's first blocks
    if (nxt < 0)
      cp_async_wait<0>();
    else if (a.k[KC].nb == DU)
      cp_async_wait<DU - 1>();
    else
      cp_async_wait<DU>();
#pragma unroll
    for (int j = 0; j < 4; ++j)
      asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(sb + a.sm_red + ((warp * 4 + j) * 32 + lane) * 4), "f"(acc[j]));
  };

  while (s_it[0] >= 0) {
    if (kind_of(s_it[0]))
      k_loop(std::integral_constant<int, 1>{});
    else
      k_loop(std::integral_constant<int, 0>{});
    __syncthreads();
    // (read again after the loop, so that nothing of the item is held in registers across it)
    const int cur = s_it[0], nxt = s_it[1], k = kind_of(cur);
    // the item after the next one: claimed now, stored after the epilogue (its round trip hidden)
    const int claimed = tid == 0 && nxt >= 0 ? atomicAdd(a.claim, 1) : -1;
    const int wks = a.k[k].wks, wk = 1 << wks;

    // 5. cur's epilogue: the WK partials of each slab summed in warp order, then its stores
    auto val = [&](int, int c) {
      const int s = c >> 4, r = c & 15;
      const int ln = (r & 7) * 4, j = (r >> 3) * 2;  // C fragment row r, column 0
      const float* src = reinterpret_cast<const float*>(smem + a.sm_red) + ((s << wks) * 4 + j) * 32 + ln;
      float v = 0.f;
      for (int q = 0; q < wk; ++q) v += src[q * 128];
      return v;
    };
    const int pr = pair_of(cur), n0 = tile_of(cur) * a.k[k].ns * 16, nrow = 16 * a.k[k].ns;
    const bool empty = s_ids[pr] < 0;
    auto one = [pr](int) { return pr; };
    if (k == 0) {
      if (!empty) moe_gate_up_store<BF16, DTHREADS>(pg, 1, n0, nrow, one, val);
      __syncthreads();
      if (tid == 0 && !empty) {  // one more of this pair's gate+up items has stored (the split-K fixup's fence)
        __threadfence();
        atomicAdd(pg.moe_ready + pr, 1);
      }
    } else if (empty) {
      moe_down_store<BF16, DTHREADS>(pd, 1, n0, nrow, tile_of(cur), a.k[1].tiles, one,
                                     [](int, int) { return 0.f; }, s_token);
    } else {
      moe_down_store<BF16, DTHREADS>(pd, 1, n0, nrow, tile_of(cur), a.k[1].tiles, one, val, s_token);
    }
    // every thread has read s_it (a barrier of the epilogue since): the next items, published by the
    // barrier below
    if (tid == 0) {
      s_it[0] = nxt;
      s_it[1] = claimed >= 0 && claimed < n_items ? claimed : -1;
    }
    // 6. the next item's scales expanded, and a down item's wait and x (a new pair's row; the loop
    //    is over, so x is free)
    if (nxt >= 0) {
      expand(kind_of(nxt));
      if (kind_of(nxt)) down_x(nxt, k == 0 || pair_of(nxt) != pr);
    }
    __syncthreads();
  }
  cp_async_wait<0>();  // (a CTA without items still has group A in flight)

  // 7. the last CTA out resets the counter for the next call
  if (tid == 0) {
    __threadfence();
    if (atomicAdd(a.claim + 1, 1) == gridDim.x - 1) {
      a.claim[0] = 0;
      a.claim[1] = 0;
    }
  }
}

// The kernel, allowed its shared memory (once per device): before the occupancy query too, which
// counts no CTA past the default 48 KB otherwise.
template <bool BF16>
int persist_opt_in() {
  static bool opted[64] = {};
  return opt_in_smem(moe_persist_kernel<BF16>, DECODE_SMEM_MAX, opted);
}

template <bool BF16>
int launch_persist(const Params& pg, const Params& pd, const PersistArgs& a, int grid, int smem, cudaStream_t stream,
                   bool pdl) {
  if (int rc = persist_opt_in<BF16>(); rc != M3E_OK) return rc;
  return launch_kernel(moe_persist_kernel<BF16>, dim3(grid), dim3(DTHREADS), smem, stream, pdl, pg, pd, a) ==
                 cudaSuccess
             ? M3E_OK
             : M3E_ERR_CUDA;
}

// CTAs of the persistent kernel resident at once on the current device (0 on error).
template <bool BF16>
int persist_ctas(int smem) {
  int dev = 0, sms = 0, per = 0;
  if (persist_opt_in<BF16>() != M3E_OK || cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per, moe_persist_kernel<BF16>, DTHREADS, smem) != cudaSuccess)
    return 0;
  return sms * per;
}

}  // namespace w4
}  // namespace m3e

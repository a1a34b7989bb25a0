// Fused int4 MoE: the grouping of (token, slot) pairs by expert on the GPU, the plan, and the entry
// point that launches grouping, gate+up and down (m3e_api.cuh states the contract).
//
//   ids [T, topk] --group--> rows: pairs t topk + j sorted by expert (stable), tiles: per expert
//                            ceil(count / MR) tiles of <= MR consecutive entries, zero-row tiles after
//                            (one token: no grouping launch; CTA column j is pair j, its expert read
//                            from the ids by the decode kernel)
//   x [T, H] --gate+up--> inter [T topk, I] = silu(x[t] Wg_e^T) * (x[t] Wu_e^T)    (grid: tiles x 2I/16ns)
//   inter  --down--> slots [T topk, H] = w[t, j] inter Wd_e^T; a token's last slot to arrive writes
//                    out[t] = sum_j slots[t topk + j] in slot order                  (grid: tiles x H/16ns)
//
// Both GEMM launches are one of two kernels with a MoE epilogue (the plan picks by pairs per expert):
// - the decode kernel (w4a16_decode.cuh): per CTA one expert's slabs and up to 8 gathered rows, x
//   staged once, the weights streamed through the per-lane ring; at one token every active expert's
//   bytes are read once, as a bandwidth-bound decode needs, but many tokens per expert re-read an
//   expert's slabs once per tile of 8 (or fewer) rows;
// - the mma tile kernel (w4a16.cuh) for prefill-sized groups: tiles of 16, 32 or 64 gathered rows
//   by 128 output rows, the K loop pipelined through shared memory, each expert's weights read once
//   per tile of rows.
#include "moe.cuh"

namespace m3e {
namespace w4 {

constexpr int GROUP_THREADS = 1024;

// One CTA. Warp w handles experts w, w + 32, ...: a ballot over 32 pairs at a time counts them
// (pass 1), then scatters them at their rank among the expert's pairs (pass 3), so the list is the
// same for the same ids (the outputs do not depend on the launch's timing). An id outside [0, E)
// joins no list; its slot's output row is zeroed and counted as arrived for the down launch.
// staged: the ids are first copied to shared memory (as int32, -1 for any id outside [0, E)), so
// that the warps' passes over all n of them read shared memory rather than L2 (NOTES.md, MoE
// prefill); else (more than GROUP_STAGE_MAX pairs) they read global memory.
constexpr int GROUP_STAGE_MAX = 8192;
__global__ void __launch_bounds__(GROUP_THREADS) moe_group_kernel(const void* ids, int ids_i64, int n, int topk,
                                                                  int E, int mr_gu, int nt_gu, int mr_dn, int nt_dn,
                                                                  int H, int gy_dn, int* rows, int4* tiles,
                                                                  float* slots, int* counters, int staged) {
  pdl_launch_dependents();  // gate+up's CTAs may start; they wait for this grid before reading its output
  // [6][E]: pairs, gate+up tiles, down tiles per expert; their exclusive prefix sums; then the staged ids
  extern __shared__ int sh[];
  int *cnt = sh, *ngu = sh + E, *ndn = sh + 2 * E, *off = sh + 3 * E, *tg = sh + 4 * E, *td = sh + 5 * E;
  int* sid = sh + 6 * E;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, nw = GROUP_THREADS / 32;
  auto gid = [&](int i) {
    return ids_i64 ? (long long)static_cast<const long long*>(ids)[i] : (long long)static_cast<const int*>(ids)[i];
  };
  if (staged) {
    for (int i = tid; i < n; i += GROUP_THREADS) {
      const long long e = gid(i);
      sid[i] = e >= 0 && e < E ? (int)e : -1;
    }
    __syncthreads();
  }
  auto id = [&](int i) { return staged ? (long long)sid[i] : gid(i); };
  // 1. pairs per expert, and the tiles they make in each launch
  for (int e = warp; e < E; e += nw) {
    int c = 0;
    for (int p0 = 0; p0 < n; p0 += 32) c += __popc(__ballot_sync(~0u, p0 + lane < n && id(p0 + lane) == e));
    if (lane == 0) {
      cnt[e] = c;
      ngu[e] = (c + mr_gu - 1) / mr_gu;
      ndn[e] = (c + mr_dn - 1) / mr_dn;
    }
  }
  __syncthreads();
  // 2. exclusive prefix sums (E is small: a loop per thread, no division in it)
  for (int e = tid; e < E; e += GROUP_THREADS) {
    int o = 0, a = 0, b = 0;
    for (int f = 0; f < e; ++f) {
      o += cnt[f];
      a += ngu[f];
      b += ndn[f];
    }
    off[e] = o;
    tg[e] = a;
    td[e] = b;
  }
  __syncthreads();
  // 3. the sorted list, in pair order within each expert
  for (int e = warp; e < E; e += nw) {
    int base = off[e];
    for (int p0 = 0; p0 < n; p0 += 32) {
      const bool hit = p0 + lane < n && id(p0 + lane) == e;
      const unsigned m = __ballot_sync(~0u, hit);
      if (hit) rows[base + __popc(m & ((1u << lane) - 1))] = p0 + lane;
      base += __popc(m);
    }
  }
  // 4. the tiles of each launch, then zero-row tiles up to the grid's size
  for (int e = tid; e < E; e += GROUP_THREADS) {
    const int c = cnt[e];
    for (int i = 0; i * mr_gu < c; ++i) tiles[tg[e] + i] = make_int4(e, off[e] + i * mr_gu, min(mr_gu, c - i * mr_gu), 0);
    for (int i = 0; i * mr_dn < c; ++i)
      tiles[nt_gu + td[e] + i] = make_int4(e, off[e] + i * mr_dn, min(mr_dn, c - i * mr_dn), 0);
  }
  const int used_gu = tg[E - 1] + ngu[E - 1], used_dn = td[E - 1] + ndn[E - 1];
  for (int i = used_gu + tid; i < nt_gu; i += GROUP_THREADS) tiles[i] = make_int4(0, 0, 0, 0);
  for (int i = used_dn + tid; i < nt_dn; i += GROUP_THREADS) tiles[nt_gu + i] = make_int4(0, 0, 0, 0);
  // 5. pairs of no expert: a zero slot, arrived in every N tile of the down launch (which runs after)
  for (int p = warp; p < n; p += nw) {
    const long long e = id(p);
    if (e >= 0 && e < E) continue;
    for (int c = lane; c < H; c += 32) slots[(size_t)p * H + c] = 0.f;
    for (int y = lane; y < gy_dn; y += 32) atomicAdd(counters + (size_t)(p / topk) * gy_dn + y, 1);
  }
}

// Token tiles of MR rows that can be needed: sum_e ceil(c_e / MR) over the experts that have pairs
// is at most (n + (MR - 1) min(E, n)) / MR.
static int tile_bound(int n, int E, int mr) { return (n + (mr - 1) * (E < n ? E : n)) / mr; }

// Slabs per CTA and token rows per tile for one launch: the requested slabs, or the first of the
// candidates (most preferred first) that divides N / 16 and fits; then the most token rows whose
// shared memory fits (x is staged whole: no split-K in the MoE launches).
struct Slabs {
  int n[4];  // slabs per CTA in order of preference, 0 = none
};
static int moe_tile(int N, int K, int gshift, bool affine, int ns_req, Slabs pref, bool pairs, int* ns, int* mr) {
  const int G = gshift == 31 ? 1 : K >> gshift;
  if (ns_req > 0) pref = {{ns_req, 0, 0, 0}};
  for (int n : pref.n) {
    if (n == 0) break;
    if (n < 1 || n > DWARPS || (n & (n - 1)) || (N / 16) % n || (pairs && n % 2)) {
      if (ns_req > 0) return M3E_ERR_ARG;
      continue;
    }
    for (int m = DECODE_MAX_M; m >= 1; m /= 2)
      if (DecodeSmem(m, n, K / 64, gshift, G, affine, false).total <= DECODE_SMEM_MAX) {
        *ns = n;
        *mr = m;
        return M3E_OK;
      }
  }
  return M3E_ERR_SMEM;
}

}  // namespace w4
}  // namespace m3e

using namespace m3e::w4;

// Defaults, from the sweeps at H = 4096, I = 1536 (NOTES.md, MoE and R24), gate+up / down slabs per
// CTA: down 4 (its K = I = 1536 is 24 blocks: 12 per warp of the 8-warp CTA, as 8 slabs of the 16-warp
// CTA had, which beat 4 by 4-13 us at T = 1..16 then); gate+up 2 at one token (the runtime's 9-slot
// call in a graph: 2/4 40.3 us, 4/4 41.0, 2/8 41.5, 2/2 42.9; the 16-warp CTA's 4/8 43.4), else 4
// (flushed, T = 4: 4/4 115.5 us against 2/4 124.6; T = 16: 198.0 against 221.1).
//
// The tile kernel from 5 pairs per expert on average, 16-row tiles up to 16 pairs, 32-row tiles
// beyond (the sweep in NOTES.md, MoE prefill: 64-row tiles, one CTA per SM, were slower at every size).
static int mma_rows_auto(int n, int E) {
  const int avg = n / E;
  return avg < 5 ? 0 : avg < 16 ? 16 : 32;
}

extern "C" int m3e_moe_plan(int T, int topk, int E, int H, int I, int group, int affine, int ns_gu_req,
                            int ns_dn_req, int mma_rows_req, m3e_moe_plan_t* plan) {
  if (!plan) return M3E_ERR_ARG;
  if (T < 1 || topk < 1 || E < 1 || H < 64 || I < 64 || H % 64 || I % 64) return M3E_ERR_SHAPE;
  const int gshift = group_shift(group);
  if (gshift < 0 || (group && (H % group || I % group))) return M3E_ERR_GROUP;
  if ((long long)T * topk > (1 << 24)) return M3E_ERR_SHAPE;
  if (mma_rows_req != 0 && mma_rows_req != -1 && mma_rows_req != 16 && mma_rows_req != 32 && mma_rows_req != 64)
    return M3E_ERR_ARG;
  const int n = T * topk;
  const bool forced_ns = ns_gu_req > 0 || ns_dn_req > 0;
  if (mma_rows_req > 0 && forced_ns) return M3E_ERR_ARG;  // slabs per CTA are the decode kernel's
  const int mma = mma_rows_req > 0 ? mma_rows_req : mma_rows_req == 0 && !forced_ns ? mma_rows_auto(n, E) : 0;
  // the tile kernel's limits: 32-bit x offsets (its registers), the token tiles in the grid's y
  const int mma_tiles = mma > 0 ? tile_bound(n, E, mma) : 0;
  const bool fits = (long long)T * H < (1LL << 31) && (long long)n * I < (1LL << 31) && mma_tiles <= 65535;
  if (mma > 0 && !fits && mma_rows_req > 0) return M3E_ERR_SHAPE;
  if (mma > 0 && fits) {
    plan->mma_rows = mma;
    plan->ns_gu = plan->ns_dn = WARPS;
    plan->mr_gu = plan->mr_dn = mma;
    plan->tiles_gu = plan->tiles_dn = mma_tiles;
    plan->slot_floats = (size_t)n * H;
    plan->n_counters = T * ((H + NT - 1) / NT);
    return M3E_OK;
  }
  plan->mma_rows = 0;
  const Slabs gu_pref = T == 1 ? Slabs{{2, 4, 0, 0}} : Slabs{{4, 2, 0, 0}};
  int rc = moe_tile(2 * I, H, gshift, affine != 0, ns_gu_req, gu_pref, true, &plan->ns_gu, &plan->mr_gu);
  if (rc != M3E_OK) return rc;
  rc = moe_tile(H, I, gshift, affine != 0, ns_dn_req, Slabs{{4, 8, 2, 1}}, false, &plan->ns_dn, &plan->mr_dn);
  if (rc != M3E_OK) return rc;
  plan->tiles_gu = tile_bound(n, E, plan->mr_gu);
  plan->tiles_dn = tile_bound(n, E, plan->mr_dn);
  plan->slot_floats = (size_t)n * H;
  plan->n_counters = T * (H / (16 * plan->ns_dn)) + (T == 1 ? 2 * topk : 0);  // + the pairs' (decode kernel)
  return M3E_OK;
}

// The decode kernel's Params for one MoE launch (the decode path of m3e_w4a16_gemm, one slice).
// The shape fields of one MoE launch (either kernel: one K slice, no split-K).
static void moe_shape(Params& p, int N, int K, int gshift) {
  p.N = N;
  p.K = K;
  p.G = gshift == 31 ? 1 : K >> gshift;
  p.gshift = gshift;
  p.gmask = gshift == 31 ? 0x7fffffff : (1 << gshift) - 1;
  p.splits = 1;
}

static int moe_params(Params& p, int N, int K, int ns, int mr, int gshift, bool has_min, bool has_zp, bool norm,
                      int* smem) {
  moe_shape(p, N, K, gshift);
  const DecodeSmem L(mr, ns, K / 64, gshift, p.G, has_min, has_zp, norm);
  if (L.total > DECODE_SMEM_MAX) return M3E_ERR_SMEM;
  p.M = mr;
  p.cps = K / 64;
  decode_layout(p, L, ns, K / 64);
  *smem = L.total;
  return M3E_OK;
}

// Each launch's operands (both kernels): gate+up reads x and writes the intermediate; down reads it
// and writes the routing-weighted slots and out.
static void gate_up_io(Params& p, const m3e_moe_args& a) {
  p.x = static_cast<const uint16_t*>(a.x);
  p.w = reinterpret_cast<const uint4*>(a.w_gu);
  p.s = a.s_gu;
  p.mn = a.mn_gu;
  p.zp = a.zp_gu;
  p.out = static_cast<uint16_t*>(a.inter);
  p.out_f32 = 0;
}
static void down_io(Params& p, const m3e_moe_args& a) {
  p.x = static_cast<const uint16_t*>(a.inter);
  p.w = reinterpret_cast<const uint4*>(a.w_dn);
  p.s = a.s_dn;
  p.mn = a.mn_dn;
  p.zp = a.zp_dn;
  p.out = static_cast<uint16_t*>(a.out);
  p.out_f32 = a.out_f32;
  p.ws = a.slots;
  p.cnt = a.counters;
}

// The pair's two launches on the mma tile kernel (the grouping has run): grid (N tiles, token tiles),
// one K slice; gate+up's N is 2I (a multiple of 128: its CTAs hold whole gate/up slab pairs).
static int moe_tile_launches(const m3e_moe_args& a, Params& p, const m3e_moe_plan_t& plan, int gshift,
                             cudaStream_t s) {
  const int mt = plan.mma_rows / 8;
  const bool has_min = a.mn_gu != nullptr;
  auto launch = [&](int epi, int N, int K) {
    moe_shape(p, N, K, gshift);
    p.cps = (K + KC - 1) / KC;
    const dim3 grid((N + NT - 1) / NT, plan.tiles_gu);
    return a.act_bf16 ? launch_moe_tile_bf16(p, epi, mt, has_min, grid, s)
                      : launch_moe_tile_f16(p, epi, mt, has_min, grid, s);
  };
  gate_up_io(p, a);
  p.moe_tiles = reinterpret_cast<const int4*>(a.tiles);
  if (int rc = launch(EPI_GATE_UP, 2 * a.I, a.H); rc != M3E_OK) return rc;
  down_io(p, a);
  p.moe_tiles = reinterpret_cast<const int4*>(a.tiles) + plan.tiles_gu;
  return launch(EPI_DOWN, a.H, a.I);
}

extern "C" int m3e_moe_w4a16(const m3e_moe_args* a, void* stream) {
  if (!a || !a->x || !a->ids || !a->weights || !a->w_gu || !a->s_gu || !a->w_dn || !a->s_dn || !a->out ||
      !a->inter || !a->rows || !a->tiles || !a->slots || !a->counters)
    return M3E_ERR_ARG;
  for (int f : {a->act_bf16, a->scale_bf16, a->out_f32, a->ids_i64, a->weights_f32})
    if (f < 0 || f > 1) return M3E_ERR_ARG;
  const bool has_min = a->mn_gu != nullptr, has_zp = a->zp_gu != nullptr;
  if (has_min != (a->mn_dn != nullptr) || has_zp != (a->zp_dn != nullptr) || (has_min && has_zp)) return M3E_ERR_ARG;
  m3e_moe_plan_t plan;
  if (int rc = m3e_moe_plan(a->T, a->topk, a->E, a->H, a->I, a->group, has_min || has_zp, a->ns_gu, a->ns_dn,
                            a->mma_rows, &plan);
      rc != M3E_OK)
    return rc;
  for (const void* q : {a->x, (const void*)a->w_gu, (const void*)a->s_gu, (const void*)a->mn_gu, (const void*)a->zp_gu,
                        (const void*)a->w_dn, (const void*)a->s_dn, (const void*)a->mn_dn, (const void*)a->zp_dn,
                        (const void*)a->out, (const void*)a->inter, (const void*)a->tiles, a->residual})
    if (misaligned(q)) return M3E_ERR_ALIGN;
  const int gshift = group_shift(a->group), n = a->T * a->topk;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool tile = plan.mma_rows > 0;
  const int gy_gu = 2 * a->I / (16 * plan.ns_gu), gy_dn = tile ? (a->H + NT - 1) / NT : a->H / (16 * plan.ns_dn);

  // one token: every pair is its own tile of one row (what the grouping would make, in pair order),
  // so the decode kernel reads each CTA's expert from the ids and the grouping launch is skipped
  const bool direct = !tile && a->T == 1;
  if (a->norm_w && (!direct || misaligned(a->norm_w))) return M3E_ERR_ARG;
  if (a->pre_routed && (!direct || a->pre_id < 0 || a->pre_id >= a->E)) return M3E_ERR_ARG;
  if (a->early && !a->pre_routed) return M3E_ERR_ARG;
  const int staged = n <= GROUP_STAGE_MAX;  // with E <= 1024: at most 56 KB, under the 64 KB asked for once
  static bool group_opted[64] = {};
  if (int rc = opt_in_smem(moe_group_kernel, (6 * 1024 + GROUP_STAGE_MAX) * (int)sizeof(int), group_opted);
      rc != M3E_OK)
    return rc;
  if (!direct) {
    moe_group_kernel<<<1, GROUP_THREADS, (6 * a->E + (staged ? n : 0)) * sizeof(int), s>>>(
        a->ids, a->ids_i64, n, a->topk, a->E, plan.mr_gu, plan.tiles_gu, plan.mr_dn, plan.tiles_dn, a->H, gy_dn,
        a->rows, reinterpret_cast<int4*>(a->tiles), a->slots, a->counters, staged);
    if (cudaGetLastError() != cudaSuccess) return M3E_ERR_CUDA;
  }

  Params p = {};
  p.scale_bf16 = a->scale_bf16;
  p.moe_rows = a->rows;
  p.moe_rw = a->weights;
  p.rw_f32 = a->weights_f32;
  p.topk = a->topk;
  p.moe_res = static_cast<const uint16_t*>(a->residual);
  p.moe_ids = a->ids;
  p.ids_i64 = a->ids_i64;
  p.moe_E = a->E;
  p.moe_pre_id = a->pre_routed ? a->pre_id : -1;
  p.moe_early = a->early;
  if (tile) return moe_tile_launches(*a, p, plan, gshift, s);
  // sm_90: gate+up and down are programmatic dependents of the launch before them (the kernels' pdl_*
  // calls say what overlaps: launch latency, and down's weight stream with gate+up's tail)
  const int pdl = m3e::pdl_capable();
  if (pdl < 0) return M3E_ERR_CUDA;
  auto launch = [&](int epi, dim3 grid, int smem) {
    return a->act_bf16 ? launch_moe_bf16(p, epi, grid, smem, s, pdl) : launch_moe_f16(p, epi, grid, smem, s, pdl);
  };

  // gate+up: x rows gathered by token, silu(gate) * up into the intermediate
  int smem = 0;
  // (one token: a CTA's tile is one pair, so its shared memory is sized for one row)
  if (int rc = moe_params(p, 2 * a->I, a->H, plan.ns_gu, direct ? 1 : plan.mr_gu, gshift, has_min, has_zp,
                          a->norm_w != nullptr, &smem);
      rc != M3E_OK)
    return rc;
  gate_up_io(p, *a);
  p.moe_tiles = direct ? nullptr : reinterpret_cast<const int4*>(a->tiles);
  p.norm_w = static_cast<const uint16_t*>(a->norm_w);
  p.norm_eps = a->norm_eps;
  if (direct) {  // the pairs' counts after down's arrival counters (m3e_moe_plan)
    p.moe_ready = a->counters + gy_dn;
    p.moe_ready_target = gy_gu;
  }
  if (int rc = launch(EPI_GATE_UP, direct ? dim3(gy_gu, n) : dim3(plan.tiles_gu, gy_gu), smem); rc != M3E_OK)
    return rc;
  p.norm_w = nullptr;

  // down: the intermediate's rows, weighted slot outputs, summed per token by its last slot
  if (int rc = moe_params(p, a->H, a->I, plan.ns_dn, direct ? 1 : plan.mr_dn, gshift, has_min, has_zp, false, &smem);
      rc != M3E_OK)
    return rc;
  down_io(p, *a);
  p.moe_tiles = direct ? nullptr : reinterpret_cast<const int4*>(a->tiles) + plan.tiles_gu;
  return launch(EPI_DOWN, direct ? dim3(gy_dn, n) : dim3(plan.tiles_dn, gy_dn), smem);
}

// m3edge native kernels: the C interface the torch binder calls.
//
// Torch-free on purpose (STYLE.md 3): raw pointers, a stream passed as void* (cudaStream_t), an int
// error code back. This header includes no CUDA header either, so the binder's CPU-only build (the
// shape checks tested on machines without nvcc or a GPU) can include it.
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Error codes. The binder checks every tensor before calling, so a code here means either a caller
// that skipped the binder or a CUDA failure; m3e_error_string names it.
enum m3e_status {
  M3E_OK = 0,
  M3E_ERR_SHAPE = 1,      // M < 1, or K or N not a multiple of 64
  M3E_ERR_GROUP = 2,      // group not 32/64/128/0 (per channel), or G != K / group
  M3E_ERR_ALIGN = 3,      // a pointer is not 16-byte aligned (cp.async moves 16 B)
  M3E_ERR_WORKSPACE = 4,  // split-K needs a workspace and counters that the plan sized
  M3E_ERR_CUDA = 5,       // a CUDA call or the launch failed (cudaGetLastError)
  M3E_ERR_ARG = 6,        // a null pointer or a flag out of range
  M3E_ERR_SMEM = 7,       // MoE: one token row of K does not fit a CTA's shared memory (no split-K)
};

const char* m3e_error_string(int code);

// W4A16 GEMM: out[M, N] = x[M, K] @ W[N, K]^T, W int4 in the repacked layout (m3edge/runtime/native.py)
// (or int8 as two such planes, w_lo below):
//   w      uint32 [N/16][K/64][32][4]   one 16-byte vector per lane per 16x64 block (mma A fragments)
//   scales uint16 [N/16][G][16]         raw fp16 or bf16 bits (scale_bf16), G = K / group (1 per channel)
//   mins   uint16 [N/16][G][16] or NULL float minimum form (w = u * s + m), same 16-bit type as scales
//   zeros  uint8  [N/16][G][16] or NULL zero point plus 8 (w = (q - z) * s with z + 8 in [0, 15])
// x is fp16 (act_bf16 = 0) or bf16 (act_bf16 = 1), out the same or fp32 (out_f32); row-major.
typedef struct {
  const void* x;
  const uint32_t* w;
  const uint16_t* scales;
  const uint16_t* mins;
  const uint8_t* zeros;
  void* out;
  float* workspace;  // split-K partials, m3e_w4a16_plan's workspace_floats (NULL when splits == 1)
  int* counters;     // split-K arrival counters, plan's n_counters ints, zero before the first call
  int M, N, K;
  int group;  // 32, 64, 128, or 0 = per output channel
  int G;      // groups per row: K / group, or 1
  int act_bf16, scale_bf16;
  int out_f32;  // out is fp32 [M, N] (else the activations' type)
  int splits;   // from m3e_w4a16_plan
  int n_tile;   // from m3e_w4a16_plan: 128 = the mma tile kernel, 16/32/64 = the decode kernel
  // RMSNorm fused into the prologue (NULL: none): each row of x is used as x * rsqrt(mean(x^2) + eps) *
  // norm_w rounded once to the activations' type (m3e_rmsnorm's arithmetic, the sum in another order).
  // The decode kernel with one K slice only (the CTA must hold the whole row), else M3E_ERR_ARG.
  const uint16_t* norm_w;  // [K], the activations' type
  float norm_eps;
  // [M, N] in the activations' type added to the output (a layer's residual stream), or NULL: out =
  // residual + (x W^T rounded), rounded again. 16-bit outputs only (else M3E_ERR_ARG).
  const uint16_t* residual;
  // W8A16: a symmetric int8 W (w = q s, q in [-128, 127]) as two int4 planes in the layout above, read
  // in one pass: w the high plane (nibbles (q >> 4) + 8), w_lo the low one (nibbles q & 15), scales 16
  // times the int8 scales (the high plane's); mins and zeros NULL; the decode kernel only (M <= 8),
  // else M3E_ERR_ARG. NULL: int4.
  const uint32_t* w_lo;
} m3e_w4a16_args;

typedef struct {
  int m_tile;    // rows of x per CTA (8, 16, 32 or 64)
  int n_tile;    // rows of N per CTA: 128 for the tile kernel, 16/32/64 for the decode kernel (M <= 8)
  int splits;    // K is cut into this many slices (split-K), reduced by the last CTA of each tile
  int grid_x, grid_y;
  size_t workspace_floats;
  int n_counters;
} m3e_w4a16_plan_t;

// Pick kernel, tile and split-K for a shape and weight form (group 32/64/128 or 0 per channel;
// affine = zero points or float minimums) on a device with `sms` multiprocessors. splits_req > 0
// forces a split count and n_tile_req > 0 a kernel and N tile (the benchmark's sweep, the tests'
// coverage of every path); the split count is clamped so that every slice has work and the decode
// kernel's shared memory fits. n_tile_req < 128 needs M <= 8.
int m3e_w4a16_plan(int M, int N, int K, int group, int affine, int sms, int splits_req, int n_tile_req,
                   m3e_w4a16_plan_t* plan);

// Launch on `stream` (a cudaStream_t). args->splits must be the plan's.
int m3e_w4a16_gemm(const m3e_w4a16_args* args, void* stream);

// Fused int4 MoE, the routed experts of one layer (the shared expert is a plain GEMM):
//   out[t] = sum_j w[t, j] down_e(silu(gate_e(x[t])) * up_e(x[t])),  e = ids[t, j], j < topk
// in three launches on `stream`: the grouping of the T topk (token, slot) pairs by expert (a stable
// counting sort, one CTA), gate+up for every pair (SiLU-and-multiply fused, intermediate [T topk, I]
// in x's type), down with the routing weight applied and the slots summed in slot order. An id
// outside [0, E) is no expert: its slot adds nothing (expert parallelism marks remote experts so).
// Weights as m3e_w4a16_gemm's, stacked over experts, with gate and up interleaved by 16-row slabs
// (slab 2i = gate rows 16i..16i+15, slab 2i + 1 = the same rows of up):
//   w_gu uint32 [E][2I/16][H/64][32][4], s_gu / mn_gu uint16 [E][2I/16][H/group][16], zp_gu uint8 same
//   w_dn uint32 [E][H/16][I/64][32][4],  s_dn / mn_dn uint16 [E][H/16][I/group][16],  zp_dn uint8 same
// (G = 1 per channel). Both have the same form: scales only, zero points, or float minimums.
typedef struct {
  const void* x;             // [T, H] fp16 or bf16 (act_bf16)
  const void* ids;           // [T, topk] int32, or int64 (ids_i64)
  const void* weights;       // [T, topk] fp32 (weights_f32) or x's type
  const uint32_t* w_gu;
  const uint16_t* s_gu;
  const uint16_t* mn_gu;     // or NULL
  const uint8_t* zp_gu;      // or NULL
  const uint32_t* w_dn;
  const uint16_t* s_dn;
  const uint16_t* mn_dn;
  const uint8_t* zp_dn;
  void* out;                 // [T, H], x's type or fp32 (out_f32)
  void* inter;               // [T topk, I] x's type: silu(gate) * up per pair
  int* rows;                 // [T topk]: the pairs sorted by expert
  int* tiles;                // [plan tiles_gu + tiles_dn][4]
  float* slots;              // plan's slot_floats: the routing-weighted down output per pair
  int* counters;             // plan's n_counters, zero before the first call (left zero)
  int T, topk, E, H, I;
  int group;                 // 32, 64, 128, or 0 = per output channel
  int act_bf16, scale_bf16, out_f32, ids_i64, weights_f32;
  int ns_gu, ns_dn;          // slabs per CTA of each launch as given to m3e_moe_plan (0 = its choice)
  int mma_rows;              // kernel choice as given to m3e_moe_plan (0 = its choice)
  const void* residual;      // [T, H] x's type, added to out (a layer's residual stream), or NULL
  // RMSNorm of x before gate+up (as m3e_w4a16_args.norm_w), or NULL; one token (T = 1) on the decode
  // kernel only, else M3E_ERR_ARG. The residual, if any, is not normed.
  const void* norm_w;        // [H] x's type
  float norm_eps;
  // One token on the decode kernel: with pre_routed, the last slot's expert is pre_id whatever ids
  // says (the shared expert: known before routing); its CTAs run first, and with `early` ([2] int32,
  // zero before the first call, left zero; also given to m3e_route, which sets early[0] once the
  // launch before it has completed) its gate+up CTAs start on that flag instead of waiting for the
  // launch before this one, so they stream while routing runs. Else M3E_ERR_ARG.
  int pre_routed, pre_id;
  int* early;
} m3e_moe_args;

typedef struct {
  int mma_rows;              // 0: the decode kernel; 16, 32 or 64: the mma tile kernel, token rows per tile
  int ns_gu, mr_gu;          // gate+up: slabs (16 rows) per CTA, token rows per tile
  int ns_dn, mr_dn;          // down: likewise
  int tiles_gu, tiles_dn;    // token tiles each launch is sized for
  size_t slot_floats;        // T topk H
  int n_counters;            // T x the down launch's N tiles (+ 2 topk at T = 1: the pairs' ready counts)
} m3e_moe_plan_t;

// Kernel and tile choice for a shape and weight form (affine: zero points or minimums). The decode
// kernel (up to 8 rows per tile, each expert's weights read once per tile) for few pairs per expert,
// the mma tile kernel (16-64 rows, 8 slabs per CTA) for prefill-sized groups. mma_rows_req: 0 the
// plan's choice, -1 the decode kernel, 16 / 32 / 64 the tile kernel with that many rows. For the
// decode kernel, ns_gu_req / ns_dn_req > 0 force the slabs per CTA (even for gate+up; the
// benchmark's sweep, the tests' coverage; they imply it when mma_rows_req is 0), and the token rows
// per tile are the most (8, 4, 2, 1) whose shared memory fits.
int m3e_moe_plan(int T, int topk, int E, int H, int I, int group, int affine, int ns_gu_req, int ns_dn_req,
                 int mma_rows_req, m3e_moe_plan_t* plan);

int m3e_moe_w4a16(const m3e_moe_args* args, void* stream);

// MoE routing (native/cuda/decode_ops.cu) in one launch: the logits (a CTA per token and expert:
// the token's modality picks its router; x and the router's bf16/fp16 values, products summed in
// fp32; the fusion experts, the last n_fusion, masked where fusion_ok is 0), then the token's last
// CTA to finish picks the top k (each expert's rank counted by a thread; ties to the
// lower expert id) with softmax over those k (norm_topk) or over all E, times `scale`, rounded to the
// activations' type (as the reference's weights are) and stored as fp32. extra_id >= 0 appends one
// more slot per token, that id with weight 1 (the shared expert run as expert E of the stack).
typedef struct {
  const void* x;               // [T, H] fp16 / bf16 (act_bf16)
  const void* routers;         // [R, E, H] the activations' type
  const int64_t* modality;     // [T]; a modality >= R (no router) gives zero logits, as the reference
  const uint8_t* fusion_ok;    // [T]
  int* ids;                    // [T, k + (extra_id >= 0)] int32
  float* weights;              // same shape, fp32
  float* logits;               // [T, E] fp32 scratch
  int* counters;               // [T], zero before the call (left zero)
  int T, H, E, R, k, n_fusion, norm_topk, extra_id, act_bf16;  // H a multiple of 8, x and routers 16-byte aligned
  float scale;
  const void* norm_w;          // [H] or NULL: x is RMS-normed with it first (m3e_rmsnorm's arithmetic)
  float norm_eps;
  int* early;                  // or NULL: early[0] set to 1 once the launch before has completed (x is
                               // settled; the fused MoE's pre-routed slot starts on it, m3e_moe_args)
} m3e_route_args;

int m3e_route(const m3e_route_args* args, void* stream);

// RMSNorm of T rows of H (a multiple of 8; pointers 16-byte aligned), F.rms_norm's arithmetic: fp32
// throughout, out = x * rsqrt(mean(x^2) + eps) * w rounded once. x, res, w, out of one type (act_bf16).
// With res (else NULL), x is first replaced in place by x + res rounded to that type (a residual add),
// and the sum is normed.
int m3e_rmsnorm(void* x, const void* res, const void* w, void* out, int T, int H, float eps, int act_bf16,
                void* stream);

// The q/k/v epilogue of attention for batch 1 in one launch, one CTA per (head, token): q and k
// RMS-normed over head_dim (q_norm / k_norm weights, or none), rotated (NeoX rotate_half RoPE with
// the given cos / sin rows, each product and the sum rounded to the activations' type as the
// reference's bf16 ops round them), q written [nh, T, D] and k, v into the layer's cache [nkv, cap,
// D] at slots pos + t (pos read from the device when pos_dev is set, else pos0).
typedef struct {
  const void* qkv;             // [T, (nh + 2 nkv) D]: q heads, k heads, v heads
  const void* q_norm;          // [D] or NULL
  const void* k_norm;          // [D] or NULL
  const void* cos;             // [T, D]
  const void* sin;             // [T, D]
  void* q_out;                 // [nh, T, D]
  void* k_cache;               // [nkv, cap, D]
  void* v_cache;               // [nkv, cap, D]
  const int64_t* pos_dev;      // [1] or NULL
  int pos0, T, nh, nkv, D, cap, act_bf16;
  float eps;
} m3e_rope_args;

int m3e_rope_qkv(const m3e_rope_args* args, void* stream);

// Batch-1 decode attention in one launch: the new token's q / k RMS norm and RoPE as m3e_rope_qkv
// computes them, k and v written into the layer's cache at slot pos, and softmax(q k^T / sqrt(D)) v
// over the slots 0..pos (GQA: q head h reads kv head h / (nh / nkv)), out [nh, D] rounded once. The
// slots are cut into `splits` chunks of `chunk` (m3e_attn_plan); one CTA per (kv head, chunk), one warp
// per q head; with more than one chunk, each CTA leaves its softmax partial in the workspace and the
// kv head's last CTA merges them in chunk order (deterministic). D in {32, 64, 128, 256}, nh / nkv <= 8,
// keys <= M3E_ATTN_MAX_SPLITS x 8192 / D.
typedef struct {
  const void* qkv;             // [(nh + 2 nkv) D]: q heads, k heads, v heads
  const void* q_norm;          // [D] or NULL
  const void* k_norm;          // [D] or NULL
  const void* cos;             // [D]
  const void* sin;             // [D]
  void* out;                   // [nh, D]
  void* k_cache;               // [nkv, cap, D]
  void* v_cache;               // [nkv, cap, D]
  const int64_t* pos_dev;      // [1] or NULL (then pos0); the slot of the new token, < keys
  float* workspace;            // nh M3E_ATTN_MAX_SPLITS (D + 2) floats when splits > 1
  int* counters;               // [nkv], zero before the call (left zero)
  int pos0, keys, splits, chunk, nh, nkv, D, cap, act_bf16;
  float eps;
} m3e_attn_args;

// The chunking for `keys` slots (the largest position + 1 the launch may see); M3E_ERR_SHAPE past
// M3E_ATTN_MAX_SPLITS chunks.
#define M3E_ATTN_MAX_SPLITS 256
int m3e_attn_plan(int keys, int D, int* splits, int* chunk);
int m3e_attn_decode(const m3e_attn_args* args, void* stream);

#ifdef __cplusplus
}
#endif

"""The native CUDA int4 kernels (native/cuda, bound by native/binder.cpp): build, repack, call (int8 as
two int4 planes: `w8a16_gemm`).

`load()` JIT-builds the extension with ninja into a cache folder (one build per source hash, torch
and GPU arch); where it cannot build (no CUDA torch, no nvcc, no GPU) it raises one `NativeUnavailable`
sentence and the runtime falls back to ONNX Runtime.

The canonical checkpoint layout (compressed-tensors pack-quantized, m3edge/model/packing.py) is
repacked once at load into the kernels' layout (`repack`, torch, on any device):

    w      int32 [N/16, K/64, 32, 4]: block (s, kb) = rows 16s..16s+15, inputs 64kb..64kb+63; lane
           l = 4g + t holds word j (the k16 step 16j..16j+15 of the block) whose nibbles are the
           mma.m16n8k16 A fragment of that lane (PTX ISA "Matrix fragments for mma.m16n8k16"), with
           r = 16s + g, c = 64kb + 16j + 2t, u = q + 8:
               nibble 0 = u[r, c]      nibble 4 = u[r, c+1]       (a0: row g,   k 2t, 2t+1)
               nibble 1 = u[r+8, c]    nibble 5 = u[r+8, c+1]     (a1: row g+8)
               nibble 2 = u[r, c+8]    nibble 6 = u[r, c+9]       (a2: row g,   k 2t+8, 2t+9)
               nibble 3 = u[r+8, c+8]  nibble 7 = u[r+8, c+9]     (a3: row g+8, k 2t+8, 2t+9)
           so one lop3 on word >> 4i gives the fp16/bf16 pair of fragment register i.
    scales fp16/bf16 [N/16, G, 16] = scale[16s + i, grp] at [s, grp, i] (fp32 scales are stored
           as bf16 or fp16 when exact in one of them)
    mins   like scales (float-minimum form); zeros uint8 [N/16, G, 16] = zero point + 8.

`repack_numpy` is the bit-exact reference of the weight layout, written from the table above one
word at a time (tested against `repack` on the CPU).

The routed experts of an MoE layer (`repack_experts`, `moe_w4a16`) are the same layout stacked over
experts ([E, ...]), with each expert's gate and up rows interleaved by 16-row slabs (slab 2i = gate
rows 16i..16i+15, slab 2i + 1 = the same rows of up) so that one CTA holds both halves of the
outputs whose silu(gate) * up it writes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from m3edge.errors import M3Error
from m3edge.model.packing import _unpack_rows
from m3edge.model.scheme import Scheme

ROOT = Path(__file__).resolve().parents[2] / "native"
# The kernels' weight layout (module doc), as the repack cache (runtime/repack_cache.py) keys it: raise
# it with any change to what repack / repack_experts produce, so that no cache made before is read.
REPACK_VERSION = 1
SOURCES = ["binder.cpp", "cuda/w4a16.cu", "cuda/w4a16_f16.cu", "cuda/w4a16_bf16.cu", "cuda/moe.cu",
           "cuda/moe_f16.cu", "cuda/moe_bf16.cu", "cuda/decode_ops.cu"]
HEADERS = ["cuda/m3e_api.cuh", "cuda/ptx.cuh", "cuda/w4a16.cuh", "cuda/w4a16_decode.cuh", "cuda/moe.cuh"]
# No -std: torch picks the standard its headers need (a different one than torch was built with broke
# the ABI of c10's exceptions: the first error raised through the binder segfaulted, torch 2.11).
CUDA_FLAGS = ["-O3", "-lineinfo"]


class NativeUnavailable(M3Error):
    """The CUDA extension cannot be built or loaded here."""


_ext = None


def _cache_dir(tag: str) -> Path:
    h = hashlib.sha256()
    for f in SOURCES + HEADERS:
        h.update((ROOT / f).read_bytes())
    h.update(f"{torch.__version__} {torch.version.cuda} {tag}".encode())
    base = Path(os.environ.get("M3EDGE_HOME") or Path.home() / ".cache" / "m3edge")  # as the model cache
    d = base / "native" / h.hexdigest()[:16]
    d.mkdir(parents=True, exist_ok=True)
    return d


def load(verbose: bool = False):
    """The built extension (`w4a16_gemm`, `w4a16_plan`), JIT-compiled once per source hash."""
    global _ext
    if _ext is not None:
        return _ext
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        raise NativeUnavailable(f"the CUDA kernels need a CUDA build of torch, and this torch {torch.__version__} "
                                "is CPU-only")
    if not torch.cuda.is_available():
        raise NativeUnavailable("the CUDA kernels need a CUDA GPU, and torch sees none")
    if cpp_extension.CUDA_HOME is None or shutil.which("ninja") is None:
        raise NativeUnavailable("the CUDA kernels cannot be built: nvcc (CUDA_HOME) or ninja is missing")
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        raise NativeUnavailable(f"the CUDA kernels need sm_80 or newer (mma.sync bf16, cp.async), this GPU is "
                                f"sm_{major}{minor}")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    try:
        _ext = cpp_extension.load(
            name="m3edge_native", sources=[str(ROOT / s) for s in SOURCES],
            extra_cflags=["-O3"], extra_cuda_cflags=CUDA_FLAGS,
            extra_include_paths=[str(ROOT)], build_directory=str(_cache_dir(f"sm_{major}{minor}")),
            verbose=verbose)
    except Exception as e:  # a compiler error: say it in one sentence, keep the log in the chain
        raise NativeUnavailable(f"the CUDA kernels failed to build ({type(e).__name__}: "
                                f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''})") from e
    return _ext


def load_checks_only(verbose: bool = False):
    """The binder built without CUDA (-DM3E_NO_CUDA): its tensor checks, on CPU tensors (tests)."""
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:
        raise NativeUnavailable("building the binder needs ninja")
    return cpp_extension.load(
        name="m3edge_native_checks", sources=[str(ROOT / "binder.cpp")], extra_cflags=["-O0", "-DM3E_NO_CUDA"],
        extra_include_paths=[str(ROOT)], build_directory=str(_cache_dir("checks")), verbose=verbose)


# ---------------------------------------------------------------------------------------------- repack


@dataclass
class W4Weights:
    """One linear in the kernels' layout (see the module doc)."""

    w: torch.Tensor  # int32 [N/16, K/64, 32, 4]
    scales: torch.Tensor  # fp16 / bf16 [N/16, G, 16]
    mins: torch.Tensor | None  # like scales
    zeros: torch.Tensor | None  # uint8 [N/16, G, 16]
    n: int
    k: int
    group: int  # 32 / 64 / 128, or -1 per channel

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w, self.scales, self.mins, self.zeros) if t is not None)


def _check_nk(n: int, k: int) -> None:
    if n % 64 or k % 64 or n <= 0 or k <= 0:
        raise M3Error(f"the int4 kernels need out and in features that are multiples of 64, got weight "
                      f"[{n}, {k}]")


def _nibbles(packed: torch.Tensor, k: int) -> torch.Tensor:
    """int32 [N, K/8] -> u [N, K] int32 in [0, 16)."""
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device) * 4
    return ((packed.unsqueeze(-1) >> shifts) & 15).reshape(packed.shape[0], -1)[:, :k]


def repack_weight(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Canonical weight_packed int32 [N, K/8] -> int32 [N/16, K/64, 32, 4] (module doc)."""
    _check_nk(n, k)
    if packed.dtype != torch.int32 or tuple(packed.shape) != (n, k // 8):
        raise M3Error(f"weight_packed must be int32 [{n}, {k // 8}] for a [{n}, {k}] int4 weight, got "
                      f"{packed.dtype} {tuple(packed.shape)}")
    u = _nibbles(packed, k).to(torch.int64)  # [N, K]
    # row = 16s + 8rh + g; col = 64kb + 16j + 8kh + 2t + kp
    u = u.reshape(n // 16, 2, 8, k // 64, 4, 2, 4, 2)  # s, rh, g, kb, j, kh, t, kp
    u = u.permute(0, 3, 2, 6, 4, 7, 5, 1)  # s, kb, g, t, j, kp, kh, rh: nibble = 4kp + 2kh + rh
    u = u.reshape(n // 16, k // 64, 32, 4, 8)
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device) * 4
    word = (u << shifts).sum(-1)  # [N/16, K/64, 32, 4] in [0, 2^32)
    word = torch.where(word >= 1 << 31, word - (1 << 32), word)
    return word.to(torch.int32).contiguous()


def repack_numpy(packed: np.ndarray, n: int, k: int) -> np.ndarray:
    """Bit-exact reference of `repack_weight`, from the module doc's table, one word at a time."""
    p = packed.view(np.uint32)
    u = np.zeros((n, k), dtype=np.uint32)
    for i in range(8):  # canonical: element 8j + i in bits [4i, 4i + 4) of word j
        u[:, i::8] = (p >> np.uint32(4 * i)) & np.uint32(15)
    out = np.zeros((n // 16, k // 64, 32, 4), dtype=np.uint32)
    for s in range(n // 16):
        for kb in range(k // 64):
            for lane in range(32):
                g, t = lane // 4, lane % 4
                for j in range(4):
                    r, c = 16 * s + g, 64 * kb + 16 * j + 2 * t
                    nib = [u[r, c], u[r + 8, c], u[r, c + 8], u[r + 8, c + 8],
                           u[r, c + 1], u[r + 8, c + 1], u[r, c + 9], u[r + 8, c + 9]]
                    out[s, kb, lane, j] = sum(int(v) << (4 * i) for i, v in enumerate(nib))
    return out.view(np.int32)


def _by_slab(t: torch.Tensor) -> torch.Tensor:
    """[N, G] -> [N/16, G, 16]."""
    n, g = t.shape
    return t.reshape(n // 16, 16, g).transpose(1, 2).contiguous()


def _half_dtype(*ts: torch.Tensor) -> torch.dtype:
    """The 16-bit float type that holds every value of ts exactly (bf16 preferred for bf16 inputs)."""
    dts = {t.dtype for t in ts}
    for dt in ((torch.bfloat16, torch.float16) if torch.float16 not in dts else (torch.float16, torch.bfloat16)):
        if all(torch.equal(t.to(dt).to(t.dtype), t) for t in ts):
            return dt
    raise M3Error("the int4 kernels take fp16 or bf16 scales; these fp32 scales (or minimums) are exact in neither")


def repack(tensors: dict[str, torch.Tensor], scheme: Scheme) -> W4Weights:
    """One pack-quantized linear (packing.pack_linear's tensors) -> the kernels' layout, on the
    tensors' device."""
    if scheme.bits != 4:
        raise M3Error(f"the CUDA kernels run int4 weights only so far, this linear is int{scheme.bits}")
    n, k = (int(v) for v in tensors["weight_shape"].tolist())
    _check_nk(n, k)
    if scheme.group != -1 and k % scheme.group:
        raise M3Error(f"the int4 kernels need the group ({scheme.group}) to divide the {k} inputs")
    G = scheme.n_groups(k)
    scale = tensors["weight_scale"]
    if tuple(scale.shape) != (n, G):
        raise M3Error(f"weight_scale must be [{n}, {G}], got {tuple(scale.shape)}")
    mins = zeros = None
    if scheme.float_min:
        mn = tensors["weight_min"]
        dt = _half_dtype(scale, mn)
        mins = _by_slab(mn.to(dt))
    else:
        dt = _half_dtype(scale)
        if not scheme.symmetric:
            z = _unpack_rows(tensors["weight_zero_point"], 4, n).to(torch.int32)  # [N, G] in [-8, 7]
            zeros = _by_slab((z + 8).to(torch.uint8))
    return W4Weights(repack_weight(tensors["weight_packed"], n, k), _by_slab(scale.to(dt)), mins, zeros, n, k,
                     scheme.group)


# ---------------------------------------------------------------------------------------------- call


def w4a16_gemm(x: torch.Tensor, wt: W4Weights, out: torch.Tensor | None = None, splits: int = 0,
               n_tile: int = 0, norm: tuple[torch.Tensor, float] | None = None,
               residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] fp16/bf16 -> [..., N] = x @ W^T (fp32 accumulation, group scales applied in fp32).
    `out` may be given ([M, N], x's dtype or float32 for the unrounded result). splits and n_tile
    override the plan (0 = its choice): n_tile 16/32/64 is the decode kernel (M <= 8), 128 the tiles.
    norm (weight [K], eps): x's rows RMS-normed first in the kernel's prologue, as rmsnorm() would
    (where `fuses_norm` says the plan allows it). residual ([..., N], x's dtype): added to the rounded
    output and rounded again (a layer's `h + o_proj(x)`; 16-bit outputs only)."""
    return _gemm(x, wt, out, splits, n_tile, norm, residual)


def _gemm(x: torch.Tensor, wt: W4Weights, out: torch.Tensor | None, splits: int, n_tile: int,
          norm: tuple[torch.Tensor, float] | None = None, residual: torch.Tensor | None = None,
          w_lo: torch.Tensor | None = None) -> torch.Tensor:
    """The binder's w4a16_gemm over x's leading dimensions (w4a16_gemm, w8a16_gemm)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if out is None:
        out = torch.empty(x2.shape[0], wt.n, dtype=x.dtype, device=x.device)
    nw, eps = norm if norm is not None else (None, 1e-6)
    res = None if residual is None else residual.reshape(-1, wt.n)
    raise_for(load().w4a16_gemm(x2, wt.w, wt.scales, wt.mins, wt.zeros, out, wt.group, splits, n_tile, nw, eps, res,
                                w_lo))
    return out.reshape(*lead, wt.n)


def w8a16_gemm(x: torch.Tensor, hi: W4Weights, lo: W4Weights, out: torch.Tensor | None = None, splits: int = 0,
               n_tile: int = 0) -> torch.Tensor:
    """x [..., K] fp16/bf16 -> [..., N] = x @ W^T for a symmetric int8 W given as its two int4 planes
    (runtime/cuda.py split_int8: hi = q >> 4 at scale 16 s, lo = q & 15 stored as lo - 8 with zero
    point -8, at scale s), both read in one pass of the decode kernel (M <= 8, where `w8_one_pass`
    says the plan allows it). out, splits, n_tile as w4a16_gemm's."""
    return _gemm(x, hi, out, splits, n_tile, w_lo=lo.w)


def _plan(wt: W4Weights, M: int, device) -> tuple:
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return load().w4a16_plan(M, wt.n, wt.k, 0, sms, 0, wt.group, wt.mins is not None or wt.zeros is not None)


def fuses_norm(wt: W4Weights, M: int, device) -> bool:
    """Whether w4a16_gemm takes `norm` for M rows of this weight on `device` (the plan's decode kernel
    with one K slice: every CTA holds whole rows of x)."""
    plan = _plan(wt, M, device)
    return bool(plan) and plan[5] != 128 and plan[1] == 1


def w8_one_pass(hi: W4Weights, M: int, device) -> bool:
    """Whether w8a16_gemm takes M rows of this int8 weight (high plane `hi`) on `device`: the plan's
    decode kernel."""
    plan = _plan(hi, M, device)
    return bool(plan) and plan[5] != 128


@dataclass
class W4Experts:
    """The routed experts of one MoE layer in the kernels' layout: `W4Weights` whose tensors carry a
    leading expert dimension (n, k are one expert's): gate_up [2I, H] with gate and up interleaved by
    16-row slabs (module doc), down [H, I]."""

    gate_up: W4Weights
    down: W4Weights
    n_experts: int

    def expert_nbytes(self) -> int:
        """Bytes of one expert (weights, scales, mins / zero points): what a token's slot reads."""
        return (self.gate_up.nbytes() + self.down.nbytes()) // self.n_experts


def _stack(ws: list[W4Weights], what: str) -> W4Weights:
    f = ws[0]
    for w in ws:
        if (w.n, w.k, w.group, w.scales.dtype, w.mins is None, w.zeros is None) != \
                (f.n, f.k, f.group, f.scales.dtype, f.mins is None, f.zeros is None):
            raise M3Error(f"every expert's {what} must have one shape and form, got [{w.n}, {w.k}] group {w.group} "
                          f"and [{f.n}, {f.k}] group {f.group}")
    opt = (lambda ts: None if ts[0] is None else torch.stack(ts).contiguous())
    return W4Weights(torch.stack([w.w for w in ws]).contiguous(), torch.stack([w.scales for w in ws]).contiguous(),
                     opt([w.mins for w in ws]), opt([w.zeros for w in ws]), f.n, f.k, f.group)


def _interleave_slabs(g: torch.Tensor | None, u: torch.Tensor | None) -> torch.Tensor | None:
    """[N/16, ...] gate and up -> [2N/16, ...] with slab 2i = gate slab i, 2i + 1 = up slab i."""
    return None if g is None else torch.stack([g, u], 1).reshape(2 * g.shape[0], *g.shape[1:])


def repack_experts(gate: list[dict[str, torch.Tensor]], up: list[dict[str, torch.Tensor]],
                   down: list[dict[str, torch.Tensor]], scheme: Scheme) -> W4Experts:
    """Per-expert pack-quantized gate_proj, up_proj, down_proj (as stored on disk, one tensor set per
    expert) -> the MoE kernels' stacked layout. Every expert has the same shape and scheme."""
    if not (len(gate) == len(up) == len(down) >= 1):
        raise M3Error(f"need as many gate, up and down projections (>= 1), got {len(gate)}, {len(up)}, {len(down)}")
    gu = []
    for e, (tg, tu) in enumerate(zip(gate, up)):
        g, u = repack(tg, scheme), repack(tu, scheme)
        if (g.n, g.k) != (u.n, u.k) or g.scales.dtype != u.scales.dtype:
            raise M3Error(f"expert {e}: gate [{g.n}, {g.k}] {g.scales.dtype} and up [{u.n}, {u.k}] {u.scales.dtype} "
                          "must match")
        gu.append(W4Weights(_interleave_slabs(g.w, u.w), _interleave_slabs(g.scales, u.scales),
                            _interleave_slabs(g.mins, u.mins), _interleave_slabs(g.zeros, u.zeros), 2 * g.n, g.k,
                            g.group))
    ex = W4Experts(_stack(gu, "gate_up"), _stack([repack(t, scheme) for t in down], "down"), len(gate))
    if (ex.down.n, ex.down.k) != (ex.gate_up.k, ex.gate_up.n // 2) or ex.down.scales.dtype != ex.gate_up.scales.dtype:
        raise M3Error(f"down [{ex.down.n}, {ex.down.k}] must be [H, I] = [{ex.gate_up.k}, {ex.gate_up.n // 2}] with "
                      "the gate's scale dtype")
    return ex


def moe_w4a16(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, experts: W4Experts,
              out: torch.Tensor | None = None, ns_gu: int = 0, ns_dn: int = 0, mma_rows: int = 0,
              residual: torch.Tensor | None = None, norm: tuple[torch.Tensor, float] | None = None,
              pre_id: int = -1, early: torch.Tensor | None = None) -> torch.Tensor:
    """The routed experts of an MoE layer, fused (native/cuda/moe.cu): x [T, H] fp16/bf16, topk_ids
    [T, k] int32/int64, topk_weights [T, k] float32 or x's dtype -> [T, H] = sum_j topk_weights[t, j] *
    down_e(silu(gate_e(x[t])) * up_e(x[t])), e = topk_ids[t, j]; an id outside [0, E) adds nothing.
    The intermediate silu(gate) * up is rounded to x's dtype (as the model's bf16 expert does); the
    slots are summed in fp32 in slot order. `out` may be given ([T, H], x's dtype or float32). With a
    `residual` (like x) the output is residual + that sum, rounded once (a layer's residual add).
    The plan picks the kernel by pairs per expert: the decode kernel (tiles of up to 8 pairs) or the
    mma tile kernel (tiles of 16-64 pairs, prefill). mma_rows forces it: -1 the decode kernel, 16 / 32 /
    64 the tile kernel with that many pairs per tile (0 = the plan's); ns_gu / ns_dn force the decode
    kernel's slabs per CTA of the two launches (0 = the plan's). norm (weight [H], eps), one token on
    the decode kernel: gate+up reads x RMS-normed as rmsnorm() would (the residual is not normed).
    pre_id, one token on the decode kernel: the last slot's expert, known before routing (the shared
    expert; the ids' last column is not read for it); its CTAs run first, and with `early` (int32 [2],
    zeros, also given to the route_topk call before) its gate+up CTAs start once routing's input is
    settled instead of after routing, so they stream while routing runs."""
    if out is None:
        out = torch.empty(x.shape[0], experts.gate_up.k, dtype=x.dtype, device=x.device)
    gu, dn = experts.gate_up, experts.down
    nw, eps = norm if norm is not None else (None, 1e-6)
    raise_for(load().moe_w4a16(x, topk_ids, topk_weights, gu.w, gu.scales, gu.mins, gu.zeros, dn.w, dn.scales,
                               dn.mins, dn.zeros, out, gu.group, ns_gu, ns_dn, mma_rows, residual, nw, eps, pre_id,
                               early))
    return out


def route_topk(x: torch.Tensor, routers: torch.Tensor, modality: torch.Tensor, fusion_ok: torch.Tensor, k: int,
               n_fusion: int, norm_topk: bool, scale: float, extra_id: int = -1,
               norm: tuple[torch.Tensor, float] | None = None,
               early: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MoE routing in one launch (native/cuda/decode_ops.cu): x [T, H], routers [R, E, H] (x's dtype),
    modality int64 [T], fusion_ok bool [T] -> ids int32, weights fp32 [T, k (+1 with extra_id >= 0:
    that id, weight 1)]; the reference's `route` choice (m3lite.py). norm (weight [H], eps): the
    logits of x RMS-normed as rmsnorm() would. early (int32 [2]): its first entry set once x is settled,
    for the moe_w4a16 call that follows (its `early`)."""
    width = k + (extra_id >= 0)
    ids = torch.empty(x.shape[0], width, dtype=torch.int32, device=x.device)
    w = torch.empty(x.shape[0], width, dtype=torch.float32, device=x.device)
    nw, eps = norm if norm is not None else (None, 1e-6)
    raise_for(load().route_topk(x, routers, modality, fusion_ok, ids, w, k, n_fusion, norm_topk, extra_id, scale,
                                nw, eps, early))
    return ids, w


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """F.rms_norm(x, (H,), w, eps) in one launch (native/cuda/decode_ops.cu): x [..., H], H % 8 == 0.
    With a `residual` (like x), x first becomes x + residual in place (rounded to x's dtype, as
    torch's add), and that sum is normed: the add before a layer's second norm, in the same launch."""
    x2 = x.view(-1, x.shape[-1])
    out = torch.empty_like(x2)
    raise_for(load().rmsnorm(x2, w, out, eps, None if residual is None else residual.view(-1, x.shape[-1])))
    return out.view(x.shape)


def rope_qkv(qkv: torch.Tensor, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, cos: torch.Tensor,
             sin: torch.Tensor, q_out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             pos: torch.Tensor | None, pos0: int, nh: int, nkv: int, eps: float) -> None:
    """Batch-1 q/k/v epilogue (native/cuda/decode_ops.cu): q/k RMS norm, RoPE, q into q_out [nh, T, D],
    k and v into the caches [nkv, cap, D] at slot pos (device int64 [1]) or pos0, plus t."""
    raise_for(load().rope_qkv(qkv, q_norm, k_norm, cos, sin, q_out, k_cache, v_cache, pos, pos0, nh, nkv, eps))


ATTN_MAX_SPLITS = 256  # M3E_ATTN_MAX_SPLITS (native/cuda/m3e_api.cuh): chunks of one decode attention
# (of at most 8192 / head_dim slots each: attn_decode refuses more than ATTN_MAX_SPLITS x that)


def attn_workspace(nh: int, nkv: int, head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """attn_decode's workspace (fp32 partials) and counters (zero, left zero): made once and kept (a
    captured graph holds their addresses)."""
    return (torch.empty(nh * ATTN_MAX_SPLITS * (head_dim + 2), dtype=torch.float32, device=device),
            torch.zeros(nkv, dtype=torch.int32, device=device))


def attn_decode(qkv: torch.Tensor, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor | None, pos0: int,
                keys: int, nh: int, nkv: int, eps: float, workspace: tuple[torch.Tensor, torch.Tensor],
                out: torch.Tensor | None = None) -> torch.Tensor:
    """One token's attention in one launch (native/cuda/decode_ops.cu): rope_qkv's q/k norm, RoPE and
    cache write of qkv [1, (nh + 2 nkv) D], then softmax(q k^T / sqrt(D)) v over cache slots 0..pos
    (pos: device int64 [1], or pos0), GQA -> [nh, D] in qkv's dtype. keys: the slots the launch may
    see (a graph's bucket, > pos), which sets its chunking; workspace from attn_workspace."""
    D = qkv.shape[1] // (nh + 2 * nkv)
    if out is None:
        out = torch.empty(nh, D, dtype=qkv.dtype, device=qkv.device)
    raise_for(load().attn_decode(qkv, q_norm, k_norm, cos, sin, out, k_cache, v_cache, pos, pos0, keys, nh, nkv, eps,
                                 workspace[0], workspace[1]))
    return out


def raise_for(msg: str) -> None:
    """The binder's returned error ("value: ..." / "cuda: ...", "" = none) as ValueError / RuntimeError."""
    if msg:
        kind, _, text = msg.partition(": ")
        raise (ValueError if kind == "value" else RuntimeError)(text)

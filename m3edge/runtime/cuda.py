"""The `cuda` backend: a quantized M3 checkpoint on one NVIDIA GPU, through the native int4 kernels.

Load (once). The reference model (m3lite.py) is built on the meta device and its modules swapped for
the kernels' ones, each weight read once from the checkpoint (or any `TensorSource`) and repacked on
the GPU (runtime/native.py) as the weights arrive, and kept on disk for the next load of the same
checkpoint (runtime/repack_cache.py: that load reads the kernels' layout and skips the repack):
q, k and v become one int4 GEMM over their stacked rows (`FusedQKVAttention`), o one `W4Linear`;
the routed experts of an MoE layer one `W4Experts` for the fused MoE kernel pair, with the shared
expert appended as one more expert when it has their shape (`NativeMoE`: one launch pair for all
nine slots); a dense layer's SwiGLU a one-expert `NativeDense`; a symmetric int8 linear (the lm_head,
fp32 logits; attention and dense / shared-expert projections) two int4 planes (`W8Linear`, exact; one
pass at decode). Every RMSNorm becomes one kernel (`FastRMSNorm`). What the kernels do not take
(embeddings, routers, embedders, int8 routed experts, partial groups) is dequantized into the
activation dtype; a model whose routed experts are not int4 decodes without CUDA graphs (the
reference MoE syncs with the host). Before anything is
allocated a `MemoryPlan` (weights as they will sit on the GPU + the KV cache for the context +
scratch) is checked against the GPU's free memory: a context that does not fit is refused, naming
the largest that does.

Run. Prefill, and anything with an image or audio, runs the reference model's own forward over these
modules and a static KV cache (preallocated for the context), in chunks of PREFILL_CHUNK tokens. A
decode step (one text token) replays a CUDA graph: one per power-of-two attention length (from
128), captured on a cache's first step in that range, attending to that many keys with those past
the cache masked, so nothing is launched from Python. Per layer (`NativeLayer`): RMSNorm, the q/k/v
GEMM, q/k norm + RoPE + the cache write in one kernel (native.rope_qkv), torch's
scaled_dot_product_attention, o, the residual add and RMSNorm in one kernel, the routing kernel (fp32
logits per modality, fusion mask, top-k, softmax in one launch: native.route_topk), the MoE pair
(its down launch adds the residual; one token needs no grouping launch): about 9 launches where the
reference's ops made about 100 (NOTES.md, "CUDA runtime"). On sm_90 our kernels are launched as
programmatic dependents, so each starts while the one before ends.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from m3edge.errors import M3Error
from m3edge.model.m3lite import (MODALITY_TEXT, Attention, KVCache, M3Config, M3Lite, MoE, RMSNorm, expected_tensors,
                                 kv_bytes_per_token, param_for, rope_cos_sin, rope_inv_freq, select_experts)
from m3edge.model.scheme import Scheme
from m3edge.runtime import native
from m3edge.runtime.repack_cache import RepackCache

# One token's attention through native.attn_decode up to this many K and V bytes a layer, rope_qkv + SDPA
# past it: bench/attn_decode.py on the H100, M3-Lite heads, us a launch (ours / before): 256 keys 8.3 /
# 13.5, 1024 keys (2.1 MB) 13.8 / 14.0, 4096 keys (8.4 MB) 28.5 / 17.9 (native/cuda/NOTES.md, A3)
ATTN_KERNEL_MAX_KV_BYTES = 4 << 20
PREFILL_CHUNK = 512  # tokens per prefill forward: bounds the attention scratch at long contexts
SCRATCH_FIXED = 512 * 2**20  # CUDA context extras, cuBLAS and kernel workspaces, graph pools (measured, see bench)
MIN_BUCKET = 128


class ContextTooLarge(M3Error):
    """The requested context does not fit the GPU's memory."""


class TensorSource(Protocol):
    """Where the weights come from: a checkpoint (`checkpoint.TensorFiles`) or generated tensors."""

    def names(self) -> list[str]: ...

    def get(self, name: str) -> torch.Tensor: ...


# ---------------------------------------------------------------------------------------------- memory plan


@dataclass
class MemoryPlan:
    """Bytes on the GPU: weights (as loaded), the KV cache for `context` tokens, scratch."""

    weights: int
    kv_per_token: int
    context: int
    scratch_per_token: int  # prefill activations, per token of a chunk
    free: int  # what the GPU has free now

    @property
    def scratch(self) -> int:
        return SCRATCH_FIXED + self.scratch_per_token * min(self.context, PREFILL_CHUNK)

    @property
    def total(self) -> int:
        return self.weights + self.kv_per_token * self.context + self.scratch

    def largest_context(self) -> int:
        room = self.free - self.weights - SCRATCH_FIXED - self.scratch_per_token * PREFILL_CHUNK
        return max(0, room // self.kv_per_token)

    def check(self) -> None:
        if self.total > self.free:
            n = self.largest_context()
            gib = 2**30
            hint = (f"the largest context that fits is {n} tokens (--max-context {n})" if n >= 1 else
                    "not even the weights and scratch fit; use a smaller variant (fewer experts) or a card "
                    "with more memory")
            raise ContextTooLarge(
                f"a {self.context}-token context needs {self.total / gib:.2f} GiB on the GPU (weights "
                f"{self.weights / gib:.2f} GiB, KV cache {self.kv_per_token * self.context / gib:.2f} GiB, scratch "
                f"{self.scratch / gib:.2f} GiB) and {self.free / gib:.2f} GiB is free; {hint}")


def plan_memory(cfg: M3Config, packed: dict[str, tuple[str, Scheme]], context: int, free: int,
                dtype_bytes: int = 2) -> MemoryPlan:
    """The plan for `cfg` with the packed linears `packed` (checkpoint_tensors' second half) from the
    shapes alone: nothing is read or allocated."""
    weights = 0
    for name, shape in expected_tensors(cfg).items():
        n_el = math.prod(shape)
        entry = packed.get(name)
        if entry is not None and _kernel_takes(entry[1], shape):
            s = entry[1]
            groups = shape[0] * s.n_groups(shape[1])
            weights += n_el // 2 + groups * (2 + (2 if s.float_min else 1 if not s.symmetric else 0))
        elif entry is not None and _runs_w8(name, entry[1], shape):  # two int4 planes (W8Linear)
            weights += n_el + shape[0] * entry[1].n_groups(shape[1]) * (2 + 2 + 1)
        else:
            weights += n_el * dtype_bytes
    H, k = cfg.hidden_size, max(cfg.num_experts_per_tok, 1)
    inter = max(cfg.moe_intermediate_size * k * 3, cfg.dense_intermediate_size * 3,
                cfg.num_shared_experts * cfg.shared_expert_intermediate_size * 3)
    # per chunk token: a dozen hidden-sized tensors, the MLP intermediates, fp32 attention scores
    per_token = dtype_bytes * (12 * H + inter) + 4 * cfg.num_attention_heads * PREFILL_CHUNK
    return MemoryPlan(weights, kv_bytes_per_token(cfg, dtype_bytes), context, per_token, free)


def _kernel_takes(s: Scheme, shape: tuple[int, ...]) -> bool:
    """Whether the int4 kernels run this packed linear (else it is dequantized)."""
    n, k = shape
    return s.bits == 4 and n % 64 == 0 and k % 64 == 0 and (s.group == -1 or (s.group in (32, 64, 128)
                                                                               and k % s.group == 0))


def _w8_takes(s: Scheme, shape: tuple[int, ...]) -> bool:
    """Whether a packed int8 linear runs as two int4 ones (W8Linear): symmetric, shapes the int4 kernels take."""
    return s.bits == 8 and s.symmetric and _kernel_takes(Scheme(4, s.group, True), shape)


def _runs_w8(name: str, s: Scheme, shape: tuple[int, ...]) -> bool:
    """Whether build_model makes this packed tensor a W8Linear: the lm_head and the layers' attention
    and dense / shared-expert projections when _w8_takes; not the embeddings (a table, dequantized) nor
    the routed experts (the fused MoE kernels are int4: int8 experts are dequantized)."""
    return (name == "lm_head.weight" or (".layers." in name and ".mlp.experts." not in name)) and _w8_takes(s, shape)


# ---------------------------------------------------------------------------------------------- modules


class W4Linear(nn.Module):
    """y = x W^T (+ b) through the W4A16 kernel; W in the kernels' layout."""

    def __init__(self, wt: native.W4Weights, bias: torch.Tensor | None):
        super().__init__()
        self.wt, self.bias = wt, bias  # plain attributes: to_empty / .to(dtype) leave them alone
        self.norm_at_one = False  # build_model: whether one token's GEMM can run its input's RMSNorm

    def forward(self, x: torch.Tensor, norm: "FastRMSNorm | None" = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """With `norm` (one token, norm_at_one): y = norm(x) W^T (+ b), the norm in the GEMM's prologue.
        With a `residual` (like y): residual + y, the add in the GEMM's epilogue when there is no bias."""
        nw = None if norm is None else (norm.weight, norm.eps)
        if residual is not None and self.bias is None:
            return native.w4a16_gemm(x.contiguous(), self.wt, norm=nw, residual=residual.contiguous())
        y = native.w4a16_gemm(x.contiguous(), self.wt, norm=nw)
        y = y if self.bias is None else y + self.bias
        return y if residual is None else residual + y


class W8Linear(nn.Module):
    """y = x W^T (+ b) for a symmetric int8 W as two int4 planes, exactly: q = 16 hi + lo with
    hi = q >> 4 in [-8, 7] at scale 16 s and lo = q & 15 in [0, 15] (stored as lo - 8 with zero point
    -8) at scale s. Up to 8 rows (decode) both planes are read in one pass of the decode kernel
    (native.w8a16_gemm); more rows run the int4 kernel on each plane, the partial products summed in
    fp32. The output is out_dtype: fp32 for the lm_head's logits, the activations' type (rounded
    once, then the bias added, as W4Linear) for a layer's linear. Half the bytes of the bf16 matrix it
    replaces (the lm_head: 0.62 of 1.24 GB for M3-Lite)."""

    def __init__(self, hi: native.W4Weights, lo: native.W4Weights, bias: torch.Tensor | None = None,
                 out_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.hi, self.lo, self.n, self.bias, self.out_dtype = hi, lo, hi.n, bias, out_dtype
        self._one_pass: dict[int, bool] = {}  # rows -> whether the plan takes them in one pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        M = x2.shape[0]
        if M not in self._one_pass:
            self._one_pass[M] = native.w8_one_pass(self.hi, M, x.device)
        if self._one_pass[M]:
            y = native.w8a16_gemm(x2, self.hi, self.lo, out=torch.empty(M, self.n, dtype=self.out_dtype,
                                                                         device=x.device))
        else:
            a = torch.empty(M, self.n, dtype=torch.float32, device=x.device)
            b = torch.empty_like(a)
            native.w4a16_gemm(x2, self.hi, out=a)
            native.w4a16_gemm(x2, self.lo, out=b)
            y = a.add_(b).to(self.out_dtype)
        y = y if self.bias is None else y + self.bias
        return y.view(*x.shape[:-1], self.n)


def split_int8(t: dict[str, torch.Tensor], scheme: Scheme) -> tuple[dict, dict, Scheme, Scheme]:
    """A symmetric int8 pack-quantized linear as the two int4 ones of W8Linear (its docstring): their
    dequantized sum is the int8 one's, exactly (each term is a small integer times a bf16/fp16 scale,
    or 16 times one)."""
    from m3edge.model.packing import pack_linear, unpack_linear

    u = unpack_linear(t, scheme)
    dt = t["weight_scale"].dtype
    hi, lo = u.q >> 4, (u.q & 15) - 8  # int8 arithmetic shift; two's complement and
    s_hi, s_lo = Scheme(4, scheme.group, True), Scheme(4, scheme.group, False)
    return (pack_linear(hi.to(torch.int8), u.scale * 16, None, s_hi, dt),
            pack_linear(lo.to(torch.int8), u.scale, torch.full_like(u.scale, -8, dtype=torch.int32), s_lo, dt),
            s_hi, s_lo)


def _row_blocks(t: dict[str, torch.Tensor], scheme: Scheme, rows: int):
    """A pack-quantized linear's tensors a block of `rows` output rows at a time: (first row, tensors),
    the zero points' packed words sliced to match (rows a multiple of the rows a word packs)."""
    n, k = (int(v) for v in t["weight_shape"].tolist())
    per_word = 32 // scheme.bits
    for a in range(0, n, rows):
        b = min(a + rows, n)
        part = {key: t[key][a:b] for key in ("weight_packed", "weight_scale", "weight_min") if key in t}
        if "weight_zero_point" in t:
            part["weight_zero_point"] = t["weight_zero_point"][a // per_word:-(-b // per_word)]
        part["weight_shape"] = torch.tensor([b - a, k])
        yield a, part


def _w8_linear(t: dict[str, torch.Tensor], scheme: Scheme, rows: int = 16384) -> W8Linear:
    """W8Linear of a packed int8 linear (N a multiple of 64), split and repacked a block of rows (a
    multiple of 64: whole 16-row slabs) at a time: an int64 intermediate of a whole 151936 x 4096
    table would be 5 GB."""
    n, k = (int(v) for v in t["weight_shape"].tolist())
    his, los = [], []
    for _, part in _row_blocks(t, scheme, rows):
        t_hi, t_lo, s_hi, s_lo = split_int8(part, scheme)
        his.append(native.repack(t_hi, s_hi))
        los.append(native.repack(t_lo, s_lo))

    def cat(ws: list[native.W4Weights]) -> native.W4Weights:
        z = None if ws[0].zeros is None else torch.cat([w.zeros for w in ws])
        return native.W4Weights(torch.cat([w.w for w in ws]), torch.cat([w.scales for w in ws]), None, z, n, k,
                                ws[0].group)

    return W8Linear(cat(his), cat(los))


class FastRMSNorm(nn.Module):
    """RMSNorm in one kernel (native.rmsnorm, F.rms_norm's arithmetic: fp32 inside, one rounding)
    instead of the reference's seven elementwise ones."""

    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps

    @staticmethod
    def takes(x: torch.Tensor) -> bool:
        """Whether the kernel takes x (else F.rms_norm runs)."""
        return x.is_cuda and x.is_contiguous() and x.shape[-1] % 8 == 0 and x.data_ptr() % 16 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.takes(x):
            return native.rmsnorm(x, self.weight, self.eps)  # ours: ~2 us a row where F.rms_norm took 6
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class FusedQKVAttention(Attention):
    """Attention whose q, k and v come from one int4 GEMM over their stacked rows."""

    def __init__(self, attn: Attention, qkv: W4Linear):
        nn.Module.__init__(self)
        self.layer, self.nh, self.nkv, self.hd, self.use_qk_norm = attn.layer, attn.nh, attn.nkv, attn.hd, attn.use_qk_norm
        self.o_proj = attn.o_proj
        if attn.use_qk_norm:
            self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.qkv = qkv
        self.sizes = (self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd)
        # native.attn_workspace, shared by the layers (build_model): one token's attention in one launch
        # (native.attn_decode) where it takes the heads; None or `attn_kernel` off: rope_qkv + SDPA
        self.workspace: tuple[torch.Tensor, torch.Tensor] | None = None
        self.attn_kernel = self.hd in (32, 64, 128, 256) and self.nh // self.nkv <= 8

    def project(self, x: torch.Tensor):
        return self.qkv(x).split(self.sizes, dim=-1)

    def fuses_residual(self) -> bool:
        """Whether a residual given to forward is added in the o GEMM's epilogue."""
        return isinstance(self.o_proj, W4Linear) and self.o_proj.bias is None

    def forward(self, x, cos, sin, mask, cache, norm: FastRMSNorm | None = None, residual: torch.Tensor | None = None):
        """With the backend's cache: one token in one kernel (native.attn_decode: q/k norm, RoPE, cache
        write and attention), several through native.rope_qkv (the q/k/v epilogue, writing the cache)
        and SDPA; otherwise the reference's forward over `project`. With `norm` (one token, the qkv
        GEMM's norm_at_one), x is the layer's input before its norm, which runs in the GEMM; with a
        `residual`, the output is residual + attention (in the o GEMM where fuses_residual)."""
        if not isinstance(cache, StaticKVCache) or self.hd % 32:
            a = super().forward(x if norm is None else norm(x), cos, sin, mask, cache)
            return a if residual is None else residual + a
        B, S, _ = x.shape
        y = self.qkv(x, norm).view(S, -1)
        kb, vb = cache.kbuf[self.layer, 0], cache.vbuf[self.layer, 0]  # [nkv, cap, D]
        graph = cache.graph_keys is not None
        keys = cache.graph_keys if graph else cache.n + S
        norms = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.use_qk_norm else (None, None, 0.0)
        pos = cache.step.pos if graph else None
        kv_bytes = keys * self.nkv * self.hd * 2 * x.element_size()
        if S == 1 and self.attn_kernel and self.workspace is not None and kv_bytes <= ATTN_KERNEL_MAX_KV_BYTES:
            out = native.attn_decode(y, norms[0], norms[1], cos.reshape(S, self.hd), sin.reshape(S, self.hd), kb, vb,
                                     pos, cache.n, keys, self.nh, self.nkv, norms[2], self.workspace)
            return self._out(out.view(B, S, self.nh * self.hd), residual)
        q = torch.empty(self.nh, S, self.hd, dtype=x.dtype, device=x.device)
        native.rope_qkv(y, norms[0], norms[1], cos.reshape(S, self.hd), sin.reshape(S, self.hd), q, kb, vb,
                        pos, cache.n, self.nh, self.nkv, norms[2])
        out = F.scaled_dot_product_attention(q[None], kb[None, :, :keys], vb[None, :, :keys], attn_mask=mask,
                                             enable_gqa=self.nh != self.nkv)
        return self._out(out.transpose(1, 2).reshape(B, S, self.nh * self.hd), residual)

    def _out(self, y: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        if residual is None:
            return self.o_proj(y)
        return self.o_proj(y, residual=residual) if self.fuses_residual() else residual + self.o_proj(y)


class NativeMoE(MoE):
    """The reference MoE with the routed experts in the fused int4 kernel pair (the shared expert too,
    as one more slot of weight 1, when it has the routed experts' shape), and routing that never waits
    for the host (every router on every token, each token keeping its own modality's logits), so the
    decode step can be captured in a graph. Same expert choice as `route`."""

    def __init__(self, moe: MoE, experts: native.W4Experts, shared_slot: bool = False):
        nn.Module.__init__(self)
        self.cfg, self.routers, self.routing_log = moe.cfg, moe.routers, None
        self.shared_experts = None if shared_slot else moe.shared_experts
        self.native, self.shared_slot = experts, shared_slot
        self._w: torch.Tensor | None = None  # [R, E, H] fp32 routers for `route` (no routing kernel)
        self._r: torch.Tensor | None = None  # [R, E, H] in the activations' dtype, for the routing kernel
        # one token with the shared slot: routing's flag that x is settled, on which the shared expert's
        # gate+up CTAs start (they stream while routing runs; native.moe_w4a16 `early`); a switch for
        # the benchmark's A/B
        self._early: torch.Tensor | None = None
        self.shared_early = True
        self.slabs = (0, 0)  # the one-token pair's slabs per CTA (gate+up, down); 0 = the plan's (benchmark sweeps)

    def prepare(self) -> None:
        """Stack the routers once the weights are in, for whichever routing runs (the kernel on a GPU
        within its limits: E <= 256, k <= 16, H a multiple of 8)."""
        w = torch.stack([r.weight for r in self.routers]).contiguous()
        if w.is_cuda and w.shape[1] <= 256 and self.cfg.num_experts_per_tok <= 16 and w.shape[2] % 8 == 0:
            self._r = w
            if self.shared_slot:
                self._early = torch.zeros(2, dtype=torch.int32, device=w.device)
        else:
            self._w = w.float()

    def fuses_norm(self) -> bool:
        """Whether forward takes the layer's norm at one token (routing and gate+up norm x themselves)."""
        return self._r is not None and self.shared_experts is None

    def forward(self, x: torch.Tensor, modality: torch.Tensor, fusion_ok: torch.Tensor,
                residual: torch.Tensor | None = None, norm: FastRMSNorm | None = None) -> torch.Tensor:
        """On the GPU: routing (shared slot included) in one kernel, then the fused expert pair, which
        adds `residual` (the layer's residual stream, like x) to its output when given. With `norm`, x
        is the stream before the layer's second norm: at one token (fuses_norm) the routing and gate+up
        kernels norm it themselves, else it is normed first."""
        B, S, H = x.shape
        if norm is not None and not (self.fuses_norm() and B * S == 1):
            x, norm = norm(x), None
        if self._r is None:
            y = super().forward(x, modality, fusion_ok)
            return y if residual is None else residual + y
        xt = x.reshape(-1, H).contiguous()
        c = self.cfg
        nw = None if norm is None else (norm.weight, norm.eps)
        shared = self.native.n_experts - 1 if self.shared_slot else -1
        early = self._early if self.shared_early and xt.shape[0] == 1 else None
        ids, w = native.route_topk(xt, self._r, modality.reshape(-1).contiguous(), fusion_ok.reshape(-1).contiguous(),
                                   c.num_experts_per_tok, c.num_fusion_experts, c.norm_topk_prob,
                                   c.routed_scaling_factor, shared, norm=nw, early=early)
        if self.shared_experts is not None:
            y = native.moe_w4a16(xt, ids, w, self.native) + self.shared_experts(xt)
            return (y if residual is None else residual.reshape(-1, H) + y).view(B, S, H)
        res = None if residual is None else residual.reshape(-1, H).contiguous()
        ns = self.slabs if xt.shape[0] == 1 else (0, 0)
        try:
            out = native.moe_w4a16(xt, ids, w, self.native, residual=res, norm=nw,
                                   pre_id=shared if early is not None else -1, early=early, ns_gu=ns[0], ns_dn=ns[1])
        except Exception:
            if early is not None:  # routing has raised the flag (in stream order): the next call must not see it
                early.zero_()
            raise
        return out.view(B, S, H)

    def route(self, x: torch.Tensor, modality: torch.Tensor, fusion_ok: torch.Tensor):
        logits = torch.einsum("th,reh->rte", x.float(), self._w)  # [R, T, E]
        R, T, E = logits.shape
        picked = logits.gather(0, modality.clamp(max=R - 1)[None, :, None].expand(1, T, E))[0]
        picked = torch.where((modality < R)[:, None], picked, 0.0)  # no router for that modality: zeros, as route()
        return select_experts(self.cfg, picked, fusion_ok, x.dtype)

    def experts(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if self.shared_slot:  # the shared expert is expert E of the stack, weight 1 for every token
            idx = torch.cat([idx, torch.full_like(idx[:, :1], self.native.n_experts - 1)], 1)
            w = torch.cat([w, torch.ones_like(w[:, :1])], 1)
        return native.moe_w4a16(x.contiguous(), idx, w, self.native)


class NativeDense(nn.Module):
    """A dense layer's SwiGLU as a one-expert MoE: gate+up+SiLU*up and down in the fused pair."""

    def __init__(self, experts: native.W4Experts):
        super().__init__()
        self.native = experts
        self._slots: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # T -> (ids, weights), made once

    def fuses_norm(self) -> bool:
        return True

    def forward(self, x: torch.Tensor, modality=None, fusion_ok=None, residual: torch.Tensor | None = None,
                norm: FastRMSNorm | None = None):
        """With `norm`, x is the stream before the layer's second norm (gate+up norms one token itself)."""
        if norm is not None and x.shape[0] * x.shape[1] != 1:
            x, norm = norm(x), None
        xt = x.reshape(-1, x.shape[-1]).contiguous()
        T = xt.shape[0]
        if T not in self._slots:
            self._slots[T] = (torch.zeros(T, 1, dtype=torch.int32, device=x.device),
                              torch.ones(T, 1, dtype=torch.float32, device=x.device))
        ids, w = self._slots[T]
        res = None if residual is None else residual.reshape(-1, x.shape[-1]).contiguous()
        nw = None if norm is None else (norm.weight, norm.eps)
        return native.moe_w4a16(xt, ids, w, self.native, residual=res, norm=nw).view(x.shape)


class NativeLayer(nn.Module):
    """A decoder layer whose residual adds and norms ride in other launches. Any number of tokens:
    attention's output is added to the stream by the second norm's kernel (native.rmsnorm with a
    residual), and the MLP's by the fused MoE pair's down epilogue (the reference's arithmetic, each
    sum rounded to the activation dtype). One token, where the kernels take it: the input norm in the
    qkv GEMM's prologue (W4Linear.norm_at_one), attention's residual add in the o GEMM's epilogue and
    the second norm in the routing and gate+up kernels (`fuse_post`): a decode step's layer has no
    launch of its own for a norm or an add."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.input_layernorm, self.self_attn = layer.input_layernorm, layer.self_attn
        self.post_attention_layernorm, self.mlp = layer.post_attention_layernorm, layer.mlp
        attn, mlp = self.self_attn, self.mlp
        self.fuse_post = (isinstance(attn, FusedQKVAttention) and attn.fuses_residual()
                          and isinstance(mlp, (NativeMoE, NativeDense)) and mlp.fuses_norm()
                          and isinstance(self.post_attention_layernorm, FastRMSNorm))

    def forward(self, h, cos, sin, mask, cache, modality, fusion_ok):
        attn, norm = self.self_attn, self.input_layernorm
        one = h.shape[0] * h.shape[1] == 1 and isinstance(norm, FastRMSNorm) and norm.takes(h)
        in_norm = one and isinstance(attn, FusedQKVAttention) and attn.qkv.norm_at_one
        x = h if in_norm else norm(h)
        if one and self.fuse_post:
            h = attn(x, cos, sin, mask, cache, norm=norm if in_norm else None, residual=h)  # h + attention
            return self.mlp(h, modality, fusion_ok, residual=h, norm=self.post_attention_layernorm)
        # the reference Attention (q/k/v not one int4 GEMM) takes no norm: x is normed above
        a = attn(x, cos, sin, mask, cache, norm=norm) if in_norm else attn(x, cos, sin, mask, cache)
        norm = self.post_attention_layernorm
        if isinstance(norm, FastRMSNorm) and norm.takes(a) and norm.takes(h):
            x2 = native.rmsnorm(a, norm.weight, norm.eps, residual=h)  # a becomes h + a
            h = a
        else:
            h = h + a
            x2 = norm(h)
        if isinstance(self.mlp, (NativeMoE, NativeDense)):
            return self.mlp(x2, modality, fusion_ok, residual=h)
        return h + self.mlp(x2, modality, fusion_ok)


@dataclass
class _DecodeInputs:
    """Static tensors a decode graph reads (copied in before each replay) and writes."""

    ids: torch.Tensor  # [1, 1] long
    position: torch.Tensor  # [3, 1, 1] long
    pos: torch.Tensor  # [1] long: the cache slot the token's K/V go to
    seen: torch.Tensor  # [1] bool: fusion rule bit
    logits: torch.Tensor  # [V] fp32


@dataclass
class _Slot:
    """A cache's device memory and the decode graphs captured on it: when its cache is dropped it goes
    back to the backend's free list, and the next cache reuses the buffers and the graphs (no new
    allocation, no new capture for a conversation after the first)."""

    kbuf: torch.Tensor  # [layers, 1, kv heads, capacity, head_dim]
    vbuf: torch.Tensor
    ones: torch.Tensor  # [1, capacity] bool
    step: _DecodeInputs | None = None  # made on the first decode step
    graphs: dict[int, torch.cuda.CUDAGraph] = field(default_factory=dict)  # attention length -> graph

    @classmethod
    def make(cls, cfg: M3Config, capacity: int, device: torch.device, dtype: torch.dtype) -> "_Slot":
        shape = (cfg.num_hidden_layers, 1, cfg.num_key_value_heads, capacity, cfg.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                   torch.ones(1, capacity, dtype=torch.bool, device=device))


class StaticKVCache(KVCache):
    """A KV cache preallocated for `capacity` tokens (batch 1), on a `_Slot`. Eager forwards append at
    `length`; inside a decode graph (`graph_keys` set) one token goes to the device position
    `step.pos` and attention reads the first `graph_keys` positions."""

    def __init__(self, cfg: M3Config, slot: _Slot, release=None):
        super().__init__(cfg.num_hidden_layers)
        self._slot, self._release = slot, release
        self.kbuf, self.vbuf, self._ones = slot.kbuf, slot.vbuf, slot.ones
        self.capacity, self.n = slot.kbuf.shape[3], 0
        self.seen_nontext = torch.zeros(1, dtype=torch.bool, device=slot.kbuf.device)
        self.graph_keys: int | None = None

    def __del__(self):
        if self._release is not None:
            self._release(self._slot)

    @property
    def step(self) -> _DecodeInputs | None:
        return self._slot.step

    @step.setter
    def step(self, value: _DecodeInputs) -> None:
        self._slot.step = value

    @property
    def graphs(self) -> dict[int, torch.cuda.CUDAGraph]:
        return self._slot.graphs

    @property
    def length(self) -> int:
        return self.n

    @property
    def mask(self) -> torch.Tensor:  # batch 1, no padding: every cached position is a key
        return self._ones[:, :self.n]

    @mask.setter
    def mask(self, value) -> None:  # the reference forward writes it back; nothing to keep
        pass

    def truncate(self, n: int, seen_nontext: torch.Tensor) -> None:
        self.n = n
        self.seen_nontext = seen_nontext.to(self.kbuf.device, torch.bool).reshape(1)

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.graph_keys is not None:
            self.kbuf[i].index_copy_(2, self.step.pos, k)
            self.vbuf[i].index_copy_(2, self.step.pos, v)
            return self.kbuf[i][:, :, :self.graph_keys], self.vbuf[i][:, :, :self.graph_keys]
        end = self.n + k.shape[2]
        self.kbuf[i][:, :, self.n:end] = k
        self.vbuf[i][:, :, self.n:end] = v
        return self.kbuf[i][:, :, :end], self.vbuf[i][:, :, :end]


# ---------------------------------------------------------------------------------------------- build


def build_model(cfg: M3Config, source: TensorSource, packed: dict[str, tuple[str, Scheme]], device: torch.device,
                dtype: torch.dtype, progress=None, cache: RepackCache | None = None) -> M3Lite:
    """The reference model with the kernels' modules in place, weights on `device` (see module doc).
    With a `cache`, every repacked weight comes from its file when it is there, and is written to
    it when it is not (one file per layer, written when the layer is done)."""
    with torch.device("meta"):
        model = M3Lite(cfg)
    names = set(source.names())
    done: set[str] = set()
    part = None  # the current file of the cache

    def cached(entry: str, make) -> list[native.W4Weights]:
        """The entry's repacked weights: from the cache, or make() (reading the checkpoint)."""
        return make() if part is None else part.get(entry, make)

    def linear(entry: str, mods: list[str], scheme: Scheme, bias: bool = True) -> W4Linear:
        """One W4Linear over the stacked rows of these modules (same inputs and scheme)."""
        wt = cached(entry, lambda: [native.repack(_stacked([parts(m) for m in mods]), scheme)])[0]
        biases = [_bias(source, names, m, device, dtype, done) if bias else None for m in mods]
        return W4Linear(wt, _cat_bias(biases, [expected[f"{m}.weight"][0] for m in mods]))

    def parts(module: str) -> dict[str, torch.Tensor]:
        got = {k: source.get(f"{module}.{k}").to(device) for k in
               ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_min")
               if f"{module}.{k}" in names}
        done.update(f"{module}.{k}" for k in got)
        return got

    def takes(name: str) -> bool:
        return name in packed and _kernel_takes(packed[name][1], tuple(expected[name]))

    def w8(name: str) -> bool:
        return name in packed and _runs_w8(name, packed[name][1], tuple(expected[name]))

    def int8_linear(entry: str, module: str, out_dtype: torch.dtype, bias: bool = True) -> W8Linear:
        """A symmetric int8 linear as W8Linear (its two planes repacked, or from the cache)."""
        hi, lo = cached(entry, lambda: (lambda w: [w.hi, w.lo])(_w8_linear(parts(module), packed[f"{module}.weight"][1])))
        return W8Linear(hi, lo, _bias(source, names, module, device, dtype, done) if bias else None, out_dtype)

    def experts(entry: str, mods: list[str], scheme: Scheme) -> native.W4Experts:
        """The MoE kernels' stack of these experts' gate, up and down projections."""
        def make():
            ex = native.repack_experts(*[[parts(f"{m}.{x}_proj") for m in mods] for x in ("gate", "up", "down")],
                                       scheme)
            return [ex.gate_up, ex.down]
        gu, dn = cached(entry, make)
        return native.W4Experts(gu, dn, len(mods))

    expected = expected_tensors(cfg)
    n_layers = cfg.num_hidden_layers
    for i, layer in enumerate(model.layers):
        part = cache.part(f"layer-{i:04d}") if cache is not None else None
        p = f"model.layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [f"{p}.self_attn.{x}_proj" for x in "qkv"]
        if all(takes(f"{m}.weight") for m in qkv) and len({packed[f"{m}.weight"][1] for m in qkv}) == 1:
            layer.self_attn = FusedQKVAttention(attn, linear("qkv", qkv, packed[f"{qkv[0]}.weight"][1]))
            attn = layer.self_attn
        else:
            for x in "qkv":
                m = f"{p}.self_attn.{x}_proj"
                if takes(f"{m}.weight"):
                    setattr(attn, f"{x}_proj", linear(f"{x}_proj", [m], packed[f"{m}.weight"][1]))
                elif w8(f"{m}.weight"):
                    setattr(attn, f"{x}_proj", int8_linear(f"{x}_proj.w8", m, dtype))
        m = f"{p}.self_attn.o_proj"
        if takes(f"{m}.weight"):
            attn.o_proj = linear("o_proj", [m], packed[f"{m}.weight"][1])
        elif w8(f"{m}.weight"):
            attn.o_proj = int8_linear("o_proj.w8", m, dtype)

        sh = f"{p}.mlp.shared_experts"
        has_shared = getattr(mlp, "shared_experts", None) is not None
        shared_ok = has_shared and all(takes(f"{sh}.{x}_proj.weight") for x in ("gate", "up", "down"))
        if isinstance(mlp, MoE):
            ex = [f"{p}.mlp.experts.{e}" for e in range(cfg.num_experts)]
            mods = [f"{m}.{x}_proj" for m in ex for x in ("gate", "up", "down")]
            schemes = {packed[f"{m}.weight"][1] for m in mods if m + ".weight" in packed}
            if all(takes(f"{m}.weight") for m in mods) and len(schemes) == 1:
                fold = shared_ok and {packed[f"{sh}.{x}_proj.weight"][1] for x in ("gate", "up", "down")} == schemes \
                    and expected[f"{sh}.gate_proj.weight"] == expected[f"{ex[0]}.gate_proj.weight"]
                ex = ex + [sh] if fold else ex
                layer.mlp = mlp = NativeMoE(mlp, experts("experts+shared" if fold else "experts", ex, schemes.pop()),
                                            shared_slot=fold)
        elif shared_ok and len({packed[f"{sh}.{x}_proj.weight"][1] for x in ("gate", "up", "down")}) == 1:
            layer.mlp = mlp = NativeDense(experts("dense", [sh], packed[f"{sh}.gate_proj.weight"][1]))
        if getattr(mlp, "shared_experts", None) is not None:  # not folded: its own GEMMs
            for x in ("gate", "up", "down"):
                m = f"{sh}.{x}_proj"
                if takes(f"{m}.weight"):
                    setattr(mlp.shared_experts, f"{x}_proj", linear(f"shared.{x}_proj", [m], packed[f"{m}.weight"][1],
                                                                    bias=False))
                elif w8(f"{m}.weight"):
                    setattr(mlp.shared_experts, f"{x}_proj", int8_linear(f"shared.{x}_proj.w8", m, dtype, bias=False))
        if part is not None:
            part.save()
        if progress:
            progress("repack", i + 1, n_layers)
    if w8("lm_head.weight"):
        part = cache.part("lm_head") if cache is not None else None
        model.lm_head = int8_linear("lm_head", "lm_head", torch.float32, bias=False)
        if part is not None:
            part.save()
    part = None
    # everything else: materialise the meta parameters left, then load them (dequantized if packed)
    model = model.to(dtype).to_empty(device=device)  # cast on meta: no fp32 copy of the tables on the GPU

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in expected:
            if name in done:
                continue
            dst, sl = param_for(cfg, name)
            if dst not in params or (name in packed and takes(name)):
                continue  # repacked above (a NativeMoE layer's stacked experts have no parameter)
            p_ = params[dst] if sl is None else params[dst][sl]
            if name in packed:
                _dequantize_into(p_, parts(packed[name][0]), packed[name][1])
            elif name in names:
                p_.copy_(source.get(name))  # straight from the source's device: no second copy on the GPU
    for name, mod in list(model.named_modules()):  # fused norms, and the routers' fp32 stack
        for child, sub in list(mod.named_children()):
            if isinstance(sub, RMSNorm):
                setattr(mod, child, FastRMSNorm(sub))
        if isinstance(mod, NativeMoE):
            mod.prepare()
    ws = None
    for i, layer in enumerate(model.layers):
        if isinstance(layer.self_attn, FusedQKVAttention):
            a = layer.self_attn
            a.qkv.norm_at_one = torch.device(device).type == "cuda" and native.fuses_norm(a.qkv.wt, 1, device)
            if a.attn_kernel:
                ws = ws or native.attn_workspace(a.nh, a.nkv, a.hd, device)
                a.workspace = ws
        model.layers[i] = NativeLayer(layer)
    return model.eval()


def _dequantize_into(dst: torch.Tensor, t: dict[str, torch.Tensor], scheme: Scheme, rows: int = 8192) -> None:
    """dst [N, K] = the dequantized pack-quantized linear, a block of rows at a time (an fp32 copy of
    a whole int8 lm_head would be 2.5 GB more on the GPU at load than the plan counts)."""
    from m3edge.model.packing import dequantize_linear

    for a, part in _row_blocks(t, scheme, rows):
        dst[a:a + int(part["weight_shape"][0])].copy_(dequantize_linear(part, scheme))


def _bias(source: TensorSource, names: set[str], module: str, device, dtype, done: set[str]) -> torch.Tensor | None:
    if f"{module}.bias" not in names:
        return None
    done.add(f"{module}.bias")
    return source.get(f"{module}.bias").to(device, dtype)


def _stacked(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One pack-quantized linear over the stacked rows of these (same inputs and scheme)."""
    if len(parts) == 1:
        return parts[0]
    k = {int(x["weight_shape"][1]) for x in parts}
    if len(k) != 1:
        raise M3Error(f"only linears with the same inputs stack, got in_features {sorted(k)}")
    t = {key: torch.cat([x[key] for x in parts]) for key in parts[0] if key != "weight_shape"}
    t["weight_shape"] = torch.tensor([sum(int(x["weight_shape"][0]) for x in parts), k.pop()])
    return t


def _cat_bias(biases: list[torch.Tensor | None], rows: list[int]) -> torch.Tensor | None:
    """The stacked linears' bias (zeros for those without one), or None when none has one."""
    some = next((b for b in biases if b is not None), None)
    return None if some is None else torch.cat([b if b is not None else some.new_zeros(n) for b, n in zip(biases, rows)])


# ---------------------------------------------------------------------------------------------- backend


def cuda_unavailable() -> str | None:
    """Why the cuda backend cannot run here (one sentence), or None when it can (builds the extension)."""
    try:
        native.load()
    except native.NativeUnavailable as e:
        return str(e)
    return None


def _grow_in_place() -> None:
    """Expandable segments for torch's caching allocator, unless the user configured it: a pool
    grows by mapping pages onto one address range instead of adding fixed-size segments, so
    memory reserved from the card stays close to what is allocated (the load's repack and the
    prefill's transient buffers otherwise leave segments a later, larger request cannot reuse).
    Graph capture pools that cannot use it fall back to ordinary segments inside torch. Measured
    (bench/e2e_gpu.py, H200, 8K cache): peak reserved lite-16g 14.57 -> 13.22 GiB, lite-24g
    18.37 -> 18.12 GiB; allocated, decode tok/s and TTFT unchanged."""
    if os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF"):
        return
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)  # torch >= 2.11; the older name warns
    setter = setter or getattr(torch.cuda.memory, "_set_allocator_settings", None)
    try:
        if setter is not None:
            setter("expandable_segments:True")
    except RuntimeError:  # another allocator backend: keep its default
        pass


class CudaBackend:
    name = "cuda"

    def __init__(self, model_dir: str | Path | None = None, max_context: int | None = None,
                 dtype: torch.dtype = torch.bfloat16, graphs: bool = True, *, cfg: M3Config | None = None,
                 source: TensorSource | None = None, progress=None, repack_cache: bool = True):
        """A checkpoint directory, or (cfg, source) for weights made elsewhere (the benchmark's
        random full-size model). max_context None: the model's, or the largest that fits.
        repack_cache: a checkpoint directory's repacked weights are kept on disk and read back on
        the next load (runtime/repack_cache.py; M3EDGE_CACHE_DIR=off turns it off everywhere)."""
        from m3edge.model.checkpoint import TensorFiles, checkpoint_tensors, read_config, validate

        why = cuda_unavailable()
        if why:
            raise native.NativeUnavailable(why)
        if model_dir is not None:
            cfg = read_config(model_dir)
            source = TensorFiles(model_dir)
            validate(cfg, source)
        if not cfg.quantization_config:
            raise M3Error("the cuda backend runs int4 checkpoints: run `m3edge quantize` first (or use --backend torch)")
        packed = checkpoint_tensors(cfg)[1]
        _grow_in_place()
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device("cuda", torch.cuda.current_device())
        free = torch.cuda.mem_get_info(self.device)[0]
        want = max_context or cfg.max_position_embeddings
        self.plan = plan_memory(cfg, packed, want, free, torch.finfo(dtype).bits // 8)
        if max_context is None and self.plan.total > free:  # nothing asked: take what fits
            self.plan.context = min(want, self.plan.largest_context())
        self.plan.check()
        self.max_context = self.plan.context
        cache = RepackCache(model_dir, self.device, self.plan.weights) if model_dir is not None and repack_cache \
            else None
        self.model = build_model(cfg, source, packed, self.device, dtype, progress, cache)
        self.inv_freq = rope_inv_freq(cfg).to(self.device)
        # the reference MoE (routed experts not int4: dequantized) counts its tokens per expert on the host,
        # which a captured graph cannot: such a model decodes eagerly
        eager = sum(type(layer.mlp) is MoE for layer in self.model.layers)
        self.use_graphs = graphs and not eager
        if graphs and eager:
            print(f"m3edge: decoding without CUDA graphs: the routed experts of {eager} layers are not int4, the fused "
                  "MoE kernels' form (they run dequantized, through the reference MoE)", file=sys.stderr)
        self._free: list[_Slot] = []  # slots of dropped caches
        self._slots = 0  # slots made
        self._keys = torch.arange(self.max_context, device=self.device)
        if self.use_graphs:  # capture the first length's graph now, so a first reply does not pause at its second token
            warm = self.new_cache()
            self.forward(torch.zeros(1, 1, dtype=torch.long), torch.zeros(3, 1, 1, dtype=torch.long), None, None, warm)
            del warm  # its slot, graph included, is the next cache's

    def new_cache(self) -> StaticKVCache:
        """A cache on a free slot (its buffers and graphs reused), or on a new one: the memory plan
        counts one; each conversation held open at once takes one more."""
        if self._free:
            slot = self._free.pop()
        else:
            try:
                slot = _Slot.make(self.cfg, self.max_context, self.device, self.dtype)
            except torch.OutOfMemoryError:
                need = kv_bytes_per_token(self.cfg, self.dtype.itemsize) * self.max_context / 2**30
                raise M3Error(f"no GPU memory for one more conversation's KV cache ({need:.2f} GiB for "
                              f"{self.max_context} tokens) while {self._slots} are open; close one, or load "
                              "with a smaller --max-context") from None
            self._slots += 1
        return StaticKVCache(self.cfg, slot, self._free.append)

    @torch.inference_mode()
    def forward(self, input_ids, position_ids, image_patches, audio_features, cache: StaticKVCache):
        S = input_ids.shape[1]
        if cache.n + S > cache.capacity:
            raise M3Error(f"the cache holds {cache.capacity} tokens and {cache.n} are used; {S} more do not fit")
        if S == 1 and image_patches is None and audio_features is None and self.use_graphs:
            return self._decode(input_ids, position_ids, cache)
        ids, pos = input_ids.to(self.device), position_ids.to(self.device)
        img = None if image_patches is None else image_patches.to(self.device)
        aud = None if audio_features is None else audio_features.to(self.device)
        n_img = n_aud = 0
        for a in range(0, S, PREFILL_CHUNK):  # chunks: each one's media rows follow its placeholders
            b = min(a + PREFILL_CHUNK, S)
            chunk = ids[:, a:b]
            ci = _rows(img, chunk, self.cfg.image_token_id, n_img)
            ca = _rows(aud, chunk, self.cfg.audio_token_id, n_aud)
            n_img += 0 if ci is None else ci.shape[0]
            n_aud += 0 if ca is None else ca.shape[0]
            logits = self.model(chunk, pos[:, :, a:b], ci, ca, cache=cache, last_only=True)
            cache.n += b - a
        return logits[0, -1].float().cpu()

    def _decode(self, input_ids, position_ids, cache: StaticKVCache) -> torch.Tensor:
        keys = min(max(MIN_BUCKET, 1 << (cache.n).bit_length()), cache.capacity)  # >= n + 1 keys
        if cache.step is None:
            d = self.device
            cache.step = _DecodeInputs(torch.zeros(1, 1, dtype=torch.long, device=d),
                                       torch.zeros(3, 1, 1, dtype=torch.long, device=d),
                                       torch.zeros(1, dtype=torch.long, device=d),
                                       torch.zeros(1, dtype=torch.bool, device=d),
                                       torch.zeros(self.cfg.vocab_size, dtype=torch.float32, device=d))
        st = cache.step
        st.ids.copy_(input_ids.reshape(1, 1))
        st.position.copy_(position_ids.reshape(3, 1, 1))
        st.pos.fill_(cache.n)
        st.seen.copy_(cache.seen_nontext.reshape(1))
        g = cache.graphs.get(keys)
        if g is None:
            g = cache.graphs[keys] = self._capture(cache, keys)
        g.replay()
        cache.n += 1
        return st.logits.cpu()

    def _capture(self, cache: StaticKVCache, keys: int) -> torch.cuda.CUDAGraph:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm up off the capture (kernel workspaces, cuBLAS handles)
            self._step(cache, keys)
        torch.cuda.current_stream(self.device).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):  # its own pool: a pool shared with a dead cache's graphs broke the next capture
            self._step(cache, keys)
        return g

    def _step(self, cache: StaticKVCache, keys: int) -> None:
        """One text token through every layer from the static inputs (what a decode graph holds)."""
        m, st = self.model, cache.step
        h = m.embed_tokens(st.ids)  # [1, 1, H]
        cos, sin = rope_cos_sin(self.cfg, self.inv_freq, st.position, h.dtype)
        mask = (self._keys[:keys] <= st.pos)[None, None, None]  # [1, 1, 1, keys]
        modality = torch.full((1, 1), MODALITY_TEXT, dtype=torch.long, device=self.device)
        fusion_ok = st.seen.view(1, 1)
        cache.graph_keys = keys
        try:
            for layer in m.layers:
                h = layer(h, cos, sin, mask, cache, modality, fusion_ok)
        finally:
            cache.graph_keys = None
        st.logits.copy_(m.logits(h)[0, -1].float())


def _rows(feats: torch.Tensor | None, chunk: torch.Tensor, token: int | None, start: int) -> torch.Tensor | None:
    """The feature rows of a chunk's placeholders, which follow the `start` rows used before it."""
    if feats is None or token is None:
        return None
    n = int((chunk == token).sum())
    return feats[start:start + n] if n else None

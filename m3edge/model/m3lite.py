"""M3-Lite in PyTorch: the reference model every backend, kernel and quantizer is checked against.

Spec: shared/M3LITE_SPEC.md. One file: the config dataclass, the modules, the KV cache.

Degenerate cases run through the same code (spec section 1):
  * dense (`num_experts == 0`): the MLP is `mlp.shared_experts` (a Llama such as SmolLM2);
  * text MoE without shared expert (`num_shared_experts == 0`): Qwen3-MoE, Mixtral.

Shapes: B batch, S new tokens, P cached tokens, H hidden, E experts, k experts per token.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from m3edge.errors import ConfigError

MODALITY_TEXT, MODALITY_IMAGE, MODALITY_AUDIO = 0, 1, 2
ROUTER_NAMES = ("gate", "image_gate", "audio_gate")  # checkpoint names of the per-modality routers
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------- config


@dataclass
class EmbedderConfig:
    """A 2-layer MLP from raw patch / stacked-mel features into the residual stream."""

    embed_in_dim: int
    embed_depth: int = 2
    hidden_act: str = "gelu"
    patch_size: int = 32  # vision only
    in_channels: int = 3  # vision only
    num_mel_bins: int = 128  # audio only
    frames_per_token: int = 8  # audio only

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EmbedderConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class M3Config:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    attention_bias: bool = False
    use_qk_norm: bool = True
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rope_scaling: dict[str, Any] | None = None
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    num_experts: int = 0
    num_fusion_experts: int = 0
    fusion_expert_rule: str = "prefix_has_nontext"
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    num_shared_experts: int = 1
    shared_expert_intermediate_size: int = 0
    intermediate_size: int | None = None  # dense (non-MoE) layers; default: the shared width
    router_modalities: list[str] = field(default_factory=lambda: ["text"])
    router_scoring_func: str = "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    router_bias: bool = False
    vision_config: EmbedderConfig | None = None
    audio_config: EmbedderConfig | None = None
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None
    image_token_id: int | None = None
    audio_start_token_id: int | None = None
    audio_token_id: int | None = None
    audio_end_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    quantization_config: dict[str, Any] | None = None  # compressed-tensors, when quantized
    architectures: list[str] = field(default_factory=lambda: ["M3LiteForConditionalGeneration"])
    model_type: str = "m3lite"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "M3Config":
        """Build from a config.json dict: unknown keys are ignored, bad values raise ConfigError."""
        d = dict(d)
        if "dtype" in d and "torch_dtype" not in d:
            d["torch_dtype"] = d["dtype"]
        names = {f.name for f in dataclasses.fields(cls)}
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [n for n in required if n not in d]
        if missing:
            raise ConfigError(f"config.json lacks required key(s): {', '.join(missing)}")
        kw = {k: v for k, v in d.items() if k in names}
        for key in ("vision_config", "audio_config"):
            if isinstance(kw.get(key), dict):
                kw[key] = EmbedderConfig.from_dict(kw[key])
        if isinstance(kw.get("eos_token_id"), int):
            kw["eos_token_id"] = [kw["eos_token_id"]]
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(f"config.json: {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0,
                 f"{name} must be a positive integer, got {v!r}")
        for name in ("num_experts", "num_fusion_experts", "num_experts_per_tok", "moe_intermediate_size",
                     "num_shared_experts", "shared_expert_intermediate_size"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                 f"{name} must be a non-negative integer, got {v!r}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
             f"num_key_value_heads ({self.num_key_value_heads})")
        need(self.head_dim % 2 == 0, f"head_dim must be even, got {self.head_dim}")
        need(self.rms_norm_eps > 0, f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        need(self.rope_theta > 0, f"rope_theta must be positive, got {self.rope_theta}")
        need(self.hidden_act == "silu", f"hidden_act must be 'silu', got {self.hidden_act!r}")
        need(self.torch_dtype in _DTYPES, f"torch_dtype must be one of {sorted(_DTYPES)}, got {self.torch_dtype!r}")
        need(self.router_scoring_func == "softmax",
             f"router_scoring_func {self.router_scoring_func!r} is not supported (only 'softmax')")
        need(not self.router_bias, "router_bias: true is not supported")
        need(self.fusion_expert_rule == "prefix_has_nontext",
             f"fusion_expert_rule {self.fusion_expert_rule!r} is not supported")
        need(self.decoder_sparse_step >= 1, f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
        if self.num_experts:
            need(1 <= self.num_experts_per_tok <= self.num_experts - self.num_fusion_experts,
                 f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..num_experts - "
                 f"num_fusion_experts ({self.num_experts - self.num_fusion_experts})")
            need(self.moe_intermediate_size > 0, "moe_intermediate_size must be positive when num_experts > 0")
            unknown = set(self.router_modalities) - {"text", "image", "audio"}
            need(self.router_modalities[:1] == ["text"] and not unknown,
                 f"router_modalities must start with 'text' and use text/image/audio, got {self.router_modalities}")
        else:
            need(self.num_shared_experts >= 1 and self.dense_intermediate_size > 0,
                 "a dense model (num_experts: 0) needs num_shared_experts >= 1 and a positive MLP width")
        if self.num_shared_experts:
            need(self.shared_expert_intermediate_size > 0 or not self.num_experts,
                 "shared_expert_intermediate_size must be positive when num_shared_experts > 0")
        rs = self.rope_scaling or {}
        need(rs.get("rope_type", rs.get("type", "default")) in ("default", "linear", "llama3"),
             f"rope_scaling type {rs.get('rope_type', rs.get('type'))!r} is not supported "
             "(default, linear, llama3)")
        sec = rs.get("mrope_section")
        if sec is not None:
            need(sum(sec) == self.head_dim // 2,
                 f"mrope_section {sec} must sum to head_dim/2 = {self.head_dim // 2}")
        for name, sub, tok in (("vision_config", self.vision_config, self.image_token_id),
                               ("audio_config", self.audio_config, self.audio_token_id)):
            if sub is not None:
                need(sub.embed_in_dim > 0, f"{name}.embed_in_dim must be positive")
                need(tok is not None and 0 <= tok < self.vocab_size,
                     f"{name} is set, so its placeholder token id must be in [0, vocab_size)")

    # -- derived sizes
    @property
    def dense_intermediate_size(self) -> int:
        return self.intermediate_size or self.num_shared_experts * self.shared_expert_intermediate_size

    def is_moe_layer(self, i: int) -> bool:
        """Qwen3-MoE's rule: sparse unless listed in mlp_only_layers or off the sparse step."""
        return (self.num_experts > 0 and i not in self.mlp_only_layers
                and (i + 1) % self.decoder_sparse_step == 0)

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.torch_dtype]


# --------------------------------------------------------------------------- cache


class KVCache:
    """Per-layer K/V for a batch, plus the per-sequence state decode needs.

    `seen_nontext[b]` is the fusion-rule bit (spec 4): once an image/audio token is in the prefix,
    fusion experts stay eligible. `rope_delta[b]` maps cache length to the next M-RoPE position.
    `mask[b, p]` is False for left-padding positions.
    """

    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers  # [B, Hkv, P, D]
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.seen_nontext: torch.Tensor | None = None  # [B] bool
        self.rope_delta: torch.Tensor | None = None  # [B] long
        self.mask: torch.Tensor | None = None  # [B, P] bool

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def truncate(self, n: int, seen_nontext: torch.Tensor) -> None:
        """Keep the first n positions (prefix reuse); the caller supplies the prefix's fusion bit."""
        for i in range(len(self.k)):
            if self.k[i] is not None:
                self.k[i], self.v[i] = self.k[i][:, :, :n], self.v[i][:, :, :n]
        if self.mask is not None:
            self.mask = self.mask[:, :n]
        self.seen_nontext = seen_nontext

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[i] is not None:
            k = torch.cat([self.k[i], k], dim=2)
            v = torch.cat([self.v[i], v], dim=2)
        self.k[i], self.v[i] = k, v
        return k, v


# --------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the shared expert, and the MLP of dense layers."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Embedder(nn.Module):
    """Fuyu-style projection of raw features into the residual stream: Linear -> GELU -> Linear."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.proj_in = nn.Linear(in_dim, hidden, bias=True)
        self.proj_out = nn.Linear(hidden, hidden, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(F.gelu(self.proj_in(x)))


def rope_inv_freq(cfg: M3Config) -> torch.Tensor:
    """[D/2] inverse frequencies, with the linear / llama3 scalings of imported checkpoints."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).double() / d))
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "linear":
        inv = inv / rs["factor"]
    elif kind == "llama3":  # transformers' _compute_llama3_parameters
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = torch.where(is_mid, mid, scaled)
    return inv.float()


def rope_cos_sin(cfg: M3Config, inv_freq: torch.Tensor, pos: torch.Tensor, dtype: torch.dtype):
    """Interleaved M-RoPE (Qwen3-VL). pos [3, B, S] (t, h, w) -> cos, sin [B, S, D].

    Frequency slot j takes its position from H if j % 3 == 1 and j < 3*sec[1], from W if
    j % 3 == 2 and j < 3*sec[2], else from T. For text t == h == w, so this is 1D RoPE.
    """
    freqs = pos[..., None].float() * inv_freq  # [3, B, S, D/2]
    f = freqs[0].clone()
    sec = (cfg.rope_scaling or {}).get("mrope_section")
    if sec is not None:
        for axis in (1, 2):
            idx = slice(axis, 3 * sec[axis], 3)
            f[..., idx] = freqs[axis, ..., idx]
    emb = torch.cat([f, f], dim=-1)  # [B, S, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX rotate_half. x [B, heads, S, D], cos/sin [B, S, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    rot = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, None] + rot * sin[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: M3Config, layer: int):
        super().__init__()
        self.layer, self.nh, self.nkv, self.hd = layer, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        b = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=b)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=b)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=b)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=b)
        if cfg.use_qk_norm:
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
        self.use_qk_norm = cfg.use_qk_norm

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [B, S, heads * D] (a backend may fuse the three)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        B, S, _ = x.shape
        q, k, v = self.project(x)
        q = q.view(B, S, self.nh, self.hd)  # [B, S, nh, D]
        k = k.view(B, S, self.nkv, self.hd)
        v = v.view(B, S, self.nkv, self.hd).transpose(1, 2)  # [B, nkv, S, D]
        if self.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # [B, nkv, P+S, D]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.nh != self.nkv)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, self.nh * self.hd))


def modality_of(cfg: M3Config, input_ids: torch.Tensor) -> torch.Tensor:
    """Token ids -> modality ids of the same shape, {0 text, 1 image, 2 audio}; boundary tokens
    count as text (spec section 3)."""
    m = torch.zeros_like(input_ids)
    if cfg.image_token_id is not None:
        m[input_ids == cfg.image_token_id] = MODALITY_IMAGE
    if cfg.audio_token_id is not None:
        m[input_ids == cfg.audio_token_id] = MODALITY_AUDIO
    return m


def route(cfg: M3Config, routers: list[torch.Tensor], x: torch.Tensor, modality: torch.Tensor,
          fusion_ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Spec section 4. x [T, H], routers [E, H] per modality, modality / fusion_ok [T]
    -> weights [T, k] (x.dtype), experts [T, k]."""
    logits = torch.zeros(x.shape[0], routers[0].shape[0], dtype=torch.float32, device=x.device)
    for m, w in enumerate(routers):  # per-modality router (Ming multi_gate)
        sel = modality == m
        if sel.any():
            logits[sel] = x[sel].float() @ w.float().T  # [t, E], fp32
    return select_experts(cfg, logits, fusion_ok, x.dtype)


def select_experts(cfg: M3Config, logits: torch.Tensor, fusion_ok: torch.Tensor,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] fp32 -> weights [T, k] (dtype), experts [T, k]: fusion experts masked
    where the prefix has no image/audio token, then top-k and softmax (spec section 4)."""
    F = cfg.num_fusion_experts
    if F:
        logits = logits.masked_fill(~fusion_ok[:, None] & (torch.arange(logits.shape[1], device=logits.device)
                                                           >= logits.shape[1] - F), float("-inf"))  # before top-k
    if cfg.norm_topk_prob:
        vals, idx = logits.topk(cfg.num_experts_per_tok, dim=-1)
        w = vals.softmax(-1)  # == softmax over all, top-k, renormalise
    else:
        w, idx = logits.softmax(-1).topk(cfg.num_experts_per_tok, dim=-1)
    return (w * cfg.routed_scaling_factor).to(dtype), idx


class MoE(nn.Module):
    """Routed experts (stacked [E, out, in]) + optional always-on shared expert (spec section 4)."""

    def __init__(self, cfg: M3Config):
        super().__init__()
        E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.cfg = cfg
        self.routers = nn.ModuleList(nn.Linear(H, E, bias=False) for _ in cfg.router_modalities)
        self.gate_up = nn.Parameter(torch.empty(E, 2 * I, H))  # experts.{e}.{gate_proj; up_proj}
        self.down = nn.Parameter(torch.empty(E, H, I))  # experts.{e}.down_proj
        shared = cfg.num_shared_experts * cfg.shared_expert_intermediate_size
        self.shared_experts = SwiGLU(H, shared) if shared else None
        self.routing_log: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # set to [] to record (experts, modality)

    def route(self, x: torch.Tensor, modality: torch.Tensor, fusion_ok: torch.Tensor):
        return route(self.cfg, [r.weight for r in self.routers], x, modality, fusion_ok)

    def experts(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Σ_j w_j · expert_{idx_j}(x). x [T, H], w/idx [T, k]."""
        T, k = idx.shape
        I = self.down.shape[2]
        if T * k <= self.gate_up.shape[0]:  # decode: gather only the selected experts' weights
            gu = torch.einsum("th,tkoh->tko", x, self.gate_up[idx])  # [T, k, 2I]
            h = F.silu(gu[..., :I]) * gu[..., I:]
            y = torch.einsum("tki,tkhi->tkh", h, self.down[idx])  # [T, k, H]
            return (y * w[..., None]).sum(1)
        # prefill: group (token, slot) pairs by expert, one matmul per active expert
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.gate_up.shape[0]).tolist()
        tok = order // k
        xs = x[tok]  # [T*k, H], sorted by expert
        out = torch.empty(T * k, x.shape[1], dtype=x.dtype, device=x.device)
        start = 0
        for e, n in enumerate(counts):
            if n:
                seg = slice(start, start + n)
                gu = xs[seg] @ self.gate_up[e].T  # [n, 2I]
                out[seg] = (F.silu(gu[:, :I]) * gu[:, I:]) @ self.down[e].T
                start += n
        out = out * w.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, tok, out)

    def forward(self, x: torch.Tensor, modality: torch.Tensor, fusion_ok: torch.Tensor) -> torch.Tensor:
        B, S, H = x.shape
        xt = x.reshape(-1, H)
        w, idx = self.route(xt, modality.reshape(-1), fusion_ok.reshape(-1))
        if self.routing_log is not None:
            self.routing_log.append((idx.view(B, S, -1), modality))
        y = self.experts(xt, w, idx)
        if self.shared_experts is not None:
            y = y + self.shared_experts(xt)
        return y.view(B, S, H)


class DenseMLP(nn.Module):
    """A non-MoE layer's MLP, named `mlp.shared_experts` as in the spec's dense variant."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.shared_experts = SwiGLU(hidden, inter)

    def forward(self, x: torch.Tensor, modality=None, fusion_ok=None) -> torch.Tensor:
        return self.shared_experts(x)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: M3Config, i: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, i)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(i) else DenseMLP(cfg.hidden_size, cfg.dense_intermediate_size)

    def forward(self, h, cos, sin, mask, cache, modality, fusion_ok):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h), modality, fusion_ok)


class M3Lite(nn.Module):
    """Token ids (+ image patches, audio tokens) -> logits, with an optional KV cache."""

    def __init__(self, cfg: M3Config):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        if cfg.vision_config is not None:
            self.vision_embed = Embedder(cfg.vision_config.embed_in_dim, cfg.hidden_size)
        if cfg.audio_config is not None:
            self.audio_embed = Embedder(cfg.audio_config.embed_in_dim, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._inv_freq: torch.Tensor | None = None  # fp32, kept out of .to(dtype)

    # -- pieces a backend may reuse
    def modality(self, input_ids: torch.Tensor) -> torch.Tensor:
        return modality_of(self.cfg, input_ids)

    def embed(self, input_ids: torch.Tensor, image_patches: torch.Tensor | None = None,
              audio_features: torch.Tensor | None = None) -> torch.Tensor:
        """[B, S] ids -> [B, S, H]; embedder outputs overwrite placeholder rows in order."""
        h = self.embed_tokens(input_ids)
        for feats, tok, name in ((image_patches, self.cfg.image_token_id, "vision_embed"),
                                 (audio_features, self.cfg.audio_token_id, "audio_embed")):
            n = 0 if tok is None else int((input_ids == tok).sum())
            got = 0 if feats is None else feats.shape[0]
            if n != got:
                raise ValueError(f"{name}: the prompt has {n} placeholder tokens but {got} feature rows were given")
            if n:
                rows = getattr(self, name)(feats.to(h.dtype))  # [n, H]
                h = h.masked_scatter((input_ids == tok)[..., None], rows)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm(h)
        return h @ self.embed_tokens.weight.T if self.lm_head is None else self.lm_head(h)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                image_patches: torch.Tensor | None = None, audio_features: torch.Tensor | None = None,
                cache: KVCache | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """input_ids [B, S]; position_ids [3, B, S] or [B, S] (default: continue after the cache);
        attention_mask [B, S] of the new tokens (False = left padding). Returns logits [B, S, V]
        ([B, 1, V] of the last position with last_only)."""
        B, S = input_ids.shape
        dev = input_ids.device
        P = cache.length if cache is not None else 0
        h = self.embed(input_ids, image_patches, audio_features) if inputs_embeds is None else inputs_embeds
        if position_ids is None:
            position_ids = torch.arange(P, P + S, device=dev).expand(B, S)
            if cache is not None and cache.rope_delta is not None:
                position_ids = position_ids + cache.rope_delta[:, None]
        elif cache is not None:  # M-RoPE: decode continues at cache length + delta (spec 5)
            cache.rope_delta = position_ids.reshape(-1, B, S).amax(dim=(0, 2)) + 1 - (P + S)
        if position_ids.dim() == 2:
            position_ids = position_ids[None].expand(3, B, S)
        if self._inv_freq is None or self._inv_freq.device != dev:
            self._inv_freq = rope_inv_freq(self.cfg).to(dev)
        cos, sin = rope_cos_sin(self.cfg, self._inv_freq, position_ids, h.dtype)

        # keys: cached then new; causal over absolute index, minus padding, minus sliding window
        new_mask = torch.ones(B, S, dtype=torch.bool, device=dev) if attention_mask is None else attention_mask.bool()
        key_mask = new_mask if cache is None or cache.mask is None else torch.cat([cache.mask, new_mask], 1)
        q_idx = torch.arange(P, P + S, device=dev)[:, None]
        k_idx = torch.arange(P + S, device=dev)[None]
        allowed = (k_idx <= q_idx)
        if self.cfg.sliding_window:
            allowed = allowed & (k_idx > q_idx - self.cfg.sliding_window)
        mask = allowed[None] & key_mask[:, None, :]  # [B, S, P+S]
        mask = mask | (k_idx == q_idx)[None]  # a padded query attends to itself (no empty rows)
        mask = mask[:, None]  # [B, 1, S, P+S]

        modality = self.modality(input_ids) * new_mask
        seen = torch.zeros(B, dtype=torch.bool, device=dev) if cache is None or cache.seen_nontext is None \
            else cache.seen_nontext
        fusion_ok = seen[:, None] | ((modality != MODALITY_TEXT).cumsum(1) > 0)  # [B, S], causal rule
        if cache is not None:
            cache.seen_nontext = fusion_ok[:, -1]
            cache.mask = key_mask

        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache, modality, fusion_ok)
        return self.logits(h[:, -1:] if last_only else h)

    # -- weights
    def load_tensors(self, tensors) -> None:
        """Copy a {checkpoint name: tensor} mapping (spec section 6 names) into the module.

        Experts arrive one tensor per expert and are stacked here; names are already validated.
        """
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, t in tensors.items():
                dst, sl = self._param_for(name)
                p = params[dst]
                (p[sl] if sl is not None else p).copy_(t)

    def _param_for(self, name: str):
        return param_for(self.cfg, name)


def param_for(cfg: M3Config, name: str) -> tuple[str, tuple | None]:
    """Map a checkpoint tensor name to (M3Lite parameter name, index into it or None):
    experts are stacked ([E, 2I, H] gate|up, [E, H, I] down), routers become `mlp.routers.{m}`."""
    n = name.removeprefix("model.")
    if ".mlp.experts." in n:
        pre, rest = n.split(".mlp.experts.")
        e, proj, _ = rest.split(".")
        e, I = int(e), cfg.moe_intermediate_size
        if proj == "down_proj":
            return f"{pre}.mlp.down", (e,)
        half = slice(0, I) if proj == "gate_proj" else slice(I, 2 * I)
        return f"{pre}.mlp.gate_up", (e, half)
    for i, r in enumerate(ROUTER_NAMES):
        if n.endswith(f".mlp.{r}.weight"):
            return n.replace(f".mlp.{r}.weight", f".mlp.routers.{i}.weight"), None
    return n, None


def expected_tensors(cfg: M3Config) -> dict[str, tuple[int, ...]]:
    """Every tensor name a checkpoint of `cfg` must hold, with its shape (spec section 6)."""
    H, V, D = cfg.hidden_size, cfg.vocab_size, cfg.head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (V, H)
    for name, sub in (("vision_embed", cfg.vision_config), ("audio_embed", cfg.audio_config)):
        if sub is not None:
            out.update({f"model.{name}.proj_in.weight": (H, sub.embed_in_dim), f"model.{name}.proj_in.bias": (H,),
                        f"model.{name}.proj_out.weight": (H, H), f"model.{name}.proj_out.bias": (H,)})

    def swiglu(prefix: str, inter: int) -> None:
        out.update({f"{prefix}.gate_proj.weight": (inter, H), f"{prefix}.up_proj.weight": (inter, H),
                    f"{prefix}.down_proj.weight": (H, inter)})

    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        out[f"{p}.input_layernorm.weight"] = (H,)
        out[f"{p}.post_attention_layernorm.weight"] = (H,)
        a = f"{p}.self_attn"
        dims = {"q_proj": (cfg.num_attention_heads * D, H), "k_proj": (cfg.num_key_value_heads * D, H),
                "v_proj": (cfg.num_key_value_heads * D, H), "o_proj": (H, cfg.num_attention_heads * D)}
        for proj, shape in dims.items():
            out[f"{a}.{proj}.weight"] = shape
            if cfg.attention_bias:
                out[f"{a}.{proj}.bias"] = (shape[0],)
        if cfg.use_qk_norm:
            out[f"{a}.q_norm.weight"] = (D,)
            out[f"{a}.k_norm.weight"] = (D,)
        if cfg.is_moe_layer(i):
            for r in ROUTER_NAMES[: len(cfg.router_modalities)]:
                out[f"{p}.mlp.{r}.weight"] = (cfg.num_experts, H)
            for e in range(cfg.num_experts):
                swiglu(f"{p}.mlp.experts.{e}", cfg.moe_intermediate_size)
            if cfg.num_shared_experts:
                swiglu(f"{p}.mlp.shared_experts", cfg.num_shared_experts * cfg.shared_expert_intermediate_size)
        else:
            swiglu(f"{p}.mlp.shared_experts", cfg.dense_intermediate_size)
    return out


def count_params(cfg: M3Config) -> tuple[int, int]:
    """(total, active per token) parameter counts; active counts k routed + shared experts."""
    shapes = expected_tensors(cfg)
    total = sum(math.prod(s) for s in shapes.values())
    inactive = 0
    if cfg.num_experts:
        per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
        n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
        inactive = n_moe * (cfg.num_experts - cfg.num_experts_per_tok) * per_expert
    # routers of the other modalities and the embedders are not all active, but the spec counts them
    return total, total - inactive


def weight_bytes(cfg: M3Config, bits: int = 16, group: int = 128, zero_point: bool = False) -> int:
    """Bytes of weights when the layers' linears take `bits` (16 = bf16) with a bf16 scale per
    `group` inputs (plus a zero point if asymmetric); embeddings, routers, embedders and norms
    stay bf16 and lm_head goes int8 whenever bits < 16 (spec section 7)."""
    shapes = expected_tensors(cfg)
    total = 0.0
    for name, shape in shapes.items():
        n = math.prod(shape)
        quantizable = ".layers." in name and name.endswith("proj.weight")
        if name == "lm_head.weight" and bits < 16:
            total += n * (8 + 16 / shape[1]) / 8  # int8, one scale per row
        elif quantizable and bits < 16:
            g = shape[1] if group == -1 else group
            total += n * (bits + (16 + (16 if zero_point else 0)) / g) / 8
        else:
            total += n * 2
    return int(total)


def kv_bytes_per_token(cfg: M3Config, bytes_per_value: int = 2) -> int:
    """K and V for every layer: 2 x layers x kv_heads x head_dim x bytes (spec: 64 KiB for M3-Lite)."""
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * bytes_per_value

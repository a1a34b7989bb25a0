"""`m3edge quantize`: stream a checkpoint layer by layer into a compressed-tensors pack-quantized one.

Per layer (sequential, as GPTQ does: each layer sees the outputs of the already-quantized ones):

    h --input_layernorm--> x --(stats)--> quantize q,k,v --attention--> o_in --(stats)--> quantize o
    h2 = h + o(o_in) --post_attention_layernorm--> x2 --routers--> tokens per expert
      for each expert e: x2[tokens_e] --(stats)--> quantize gate,up --> act --(stats)--> quantize down
      shared expert: all tokens
    h = h2 + Σ w_e expert_e(x2) + shared(x2)

Methods: `rtn` needs no calibration; `awq` scales v rows -> o columns and up rows -> down columns
by AWQ's search (o's scale after the attention of the quantized q, k, v; down's before up is
quantized) and picks each group's grid by an activation-weighted clip search (quantize/awq.py);
`gptq` does the same scaling, takes that same grid and lets GPTQ choose the integers with its
error compensation (quantize/gptq.py, static groups, optional act-order). Statistics are per
expert, from the tokens routed to it. `--tune-scales N` then trains every group's scale (integers
fixed) for N epochs against the float model's next-token distribution on the calibration prompts
(quantize/tune.py): the one step that is not streaming, it holds both models in RAM.

Only one weight matrix is materialised in fp32 at a time (read from the memory-mapped source),
plus the calibration hidden states; the quantized tensors go straight to a per-layer shard in a
work directory next to DST. After every layer the work directory records the hidden states and
what is done, so `--resume` continues a killed run and yields the same bytes. DST appears only
at the end, by one rename.

Measured on SmolLM2-135M (int4 g128, held-out GPL-3 perplexity; bf16 23.20, RTN 29.70, this
GPTQ with act-order 26.70, 46 % of the gap) and not kept, each a change of the GPTQ run:
  - Float targets (GPTAQ-like): the float model's states carried beside the quantized ones and each
    linear first replaced by the least-squares map from its quantized-model inputs to the float
    model's outputs, ridge toward W of 0.01 / 1.0 x mean(diag(X^T X)): 30.50 / 27.72. It over-fits
    the calibration: on the calibration text itself it is better (18.31 vs 18.93, float 17.02).
  - Coordinate descent over the codes after GPTQ plus a least-squares refit of the group scales
    (QuantEase-like; -18 % layer objective on a synthetic layer): 2 rounds 26.64, 4 rounds 27.51.
  - Random orthogonal rotation of the residual stream with the RMSNorm weights folded into the
    next linears (QuaRot-like): RTN 44.06; the fold alone 43.18. Layer 0's input norm is ~0 on most
    channels, so folded group ranges are set by a few columns.
  - +32k calibration tokens sampled from the model itself: 26.52. GPTQ damping 0.1: 27.09.
Where RTN's gap sits (RTN on a part, the rest float): attention only 25.28, MLP only 27.75, all but
down_proj 27.77, all but layer 0 29.18, all but layer 29 28.40 (the last layer: 20 % of the gap).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from m3edge.errors import M3Error
from m3edge.model.checkpoint import INDEX, TensorFiles, read_config, share, validate, write_manifest
from m3edge.model.m3lite import (MODALITY_TEXT, ROUTER_NAMES, Attention, M3Config, RMSNorm, modality_of,
                                 route, rope_cos_sin, rope_inv_freq)
from m3edge.model.packing import pack_linear, quantization_config
from m3edge.model.tokenizer import Tokenizer
from m3edge.model.scheme import Scheme
from m3edge.model.scheme import dequantize as deq
from m3edge.quantize.awq import ActStats, awq_quantize, search_input_scale
from m3edge.quantize.gptq import gptq_quantize, rtn_quantize

METHODS = ("rtn", "gptq", "awq")
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
              "preprocessor_config.json", "special_tokens_map.json")
LINEAR_RE = re.compile(r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(experts\.\d+|shared_experts)\.(gate|up|down)_proj)\.weight$")


@dataclass
class Options:
    scheme: Scheme = field(default_factory=Scheme)
    method: str = "rtn"
    lm_head_bits: int = 8  # 0 keeps lm_head in bf16
    include: list[str] = field(default_factory=list)  # regexes: quantize only matching linears
    exclude: list[str] = field(default_factory=list)  # regexes: keep matching linears in bf16
    calib: list[str] = field(default_factory=list)
    builtin_calib: bool = True
    calib_tokens: int = 16384
    min_expert_tokens: int = 16  # fewer routed tokens -> RTN for that expert (listed)
    calibrate_all_experts: bool = False
    act_order: bool = False
    damp: float = 0.01
    awq_scale: bool = True  # awq / gptq: AWQ's input-channel scaling of o and down (quantize/awq.py)
    partial_groups: bool = False  # allow a group that does not divide K (shorter last group)
    tune_epochs: int = 0  # > 0: then tune the group scales end to end for this many epochs (quantize/tune.py)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise M3Error(f"unknown method '{self.method}' (choose rtn, gptq or awq)")
        if self.lm_head_bits not in (0, 8):
            raise M3Error(f"--lm-head-bits must be 8 or 0 (keep bf16), got {self.lm_head_bits}")
        if self.tune_epochs < 0:
            raise M3Error(f"--tune-scales takes a number of epochs >= 0 (0: no tuning), got {self.tune_epochs}")
        for rx in self.include + self.exclude:
            try:
                re.compile(rx)
            except re.error as e:
                raise M3Error(f"--include/--exclude pattern {rx!r} is not a valid regex ({e})") from None

    def key(self) -> dict:
        d = asdict(self)
        d["scheme"] = asdict(self.scheme)
        return d


@dataclass
class LayerReport:
    layer: int
    seconds: float = 0.0
    rel_error: float = 0.0  # mean over this layer's matrices of ||W - Ŵ||_F / ||W||_F
    bytes_in: int = 0
    bytes_out: int = 0
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)  # modality -> per-expert counts
    rtn_fallback: list[int] = field(default_factory=list)


def _quantized_names(cfg: M3Config, names: list[str], opt: Options) -> set[str]:
    out = set()
    for n in names:
        if not LINEAR_RE.match(n):
            continue
        if opt.include and not any(re.search(rx, n) for rx in opt.include):
            continue
        if any(re.search(rx, n) for rx in opt.exclude):
            continue
        out.add(n)
    return out


class _Work:
    """The work directory `.DST.partial`: layer shards, hidden states, state.json."""

    def __init__(self, dst: Path):
        self.dir = dst.parent / f".{dst.name}.partial"

    @property
    def state_path(self) -> Path:
        return self.dir / "state.json"

    def load_state(self) -> dict | None:
        try:
            return json.loads(self.state_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def save_state(self, state: dict) -> None:
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.state_path)

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        tmp = self.dir / (name + ".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, self.dir / name)


def _fingerprint(src: Path) -> dict:
    return {f.name: f.stat().st_size for f in sorted(src.iterdir()) if f.is_file()}


def quantize_checkpoint(src: str | Path, dst: str | Path, opt: Options, force: bool = False, resume: bool = False,
                        progress: Callable[[str, int, int], None] | None = None,
                        log: Callable[[str], None] | None = None) -> tuple[Path, list[LayerReport]]:
    src, dst = Path(src), Path(dst)
    opt.validate()
    cfg = read_config(src)
    if cfg.quantization_config:
        raise M3Error(f"'{src}' is already quantized; quantize the full-precision checkpoint instead (from a GGUF "
                      "file: `m3edge import FILE.gguf --dequantize --out DIR`)")
    files = TensorFiles(src, keep_open=False)
    validate(cfg, files)
    if dst.exists() and not force:
        raise M3Error(f"output '{dst}' already exists (pass --force to replace it)")
    qnames = _quantized_names(cfg, files.names(), opt)
    for n in sorted(qnames):
        opt.scheme.check(n, files.shape(n), opt.partial_groups)
    work = _Work(dst)
    state = work.load_state() if resume else None
    key = {"options": opt.key(), "source": str(src.resolve()), "fingerprint": _fingerprint(src)}
    if resume:
        if state is None:
            raise M3Error(f"nothing to resume: no interrupted run for '{dst}' (run without --resume)")
        if state["key"] != key:
            raise M3Error("--resume: the interrupted run used other options or another source; "
                          "run without --resume to start over")
    else:
        shutil.rmtree(work.dir, ignore_errors=True)
        work.dir.mkdir(parents=True)
        state = {"key": key, "done_layers": 0, "reports": []}
        work.save_state(state)

    calibrated = opt.method != "rtn"
    tok = Tokenizer.from_dir(src)
    prompts = None
    if calibrated or opt.tune_epochs:
        from m3edge.quantize.calib import build_calibration

        prompts = build_calibration(cfg, tok, [Path(f) for f in opt.calib], opt.builtin_calib, opt.calib_tokens)
        if log:
            log(f"calibration: {len(prompts)} prompts, {sum(len(p) for p in prompts)} tokens")
    _trim_heap()
    q = _LayerQuantizer(cfg, files, opt, qnames)
    n_layers = cfg.num_hidden_layers

    if state["done_layers"] == 0:
        work.save_tensors("rest.safetensors", q.rest_tensors())
        if calibrated:
            work.save_tensors("hidden.safetensors", q.embed(prompts))
    hidden = None
    if calibrated:
        with safe_open(str(work.dir / "hidden.safetensors"), "pt") as f:
            hidden = [f.get_tensor(f"h{j}") for j in range(len(prompts))]
    reports = [LayerReport(**r) for r in state["reports"]]
    for i in range(state["done_layers"], n_layers):
        t0 = time.perf_counter()
        tensors, hidden, rep = q.layer(i, prompts, hidden, progress)
        rep.seconds = time.perf_counter() - t0
        work.save_tensors(f"layer-{i:05d}.safetensors", tensors)
        if calibrated:
            work.save_tensors("hidden.safetensors", {f"h{j}": h for j, h in enumerate(hidden)})
        reports.append(rep)
        q.files.close()  # unmap the source pages read for this layer: RSS stays about one layer
        _trim_heap()
        state["done_layers"], state["reports"] = i + 1, [asdict(r) for r in reports]
        work.save_state(state)
        if progress:
            progress(f"layer {i + 1}/{n_layers}", i + 1, n_layers)
    out = _assemble(src, dst, work, cfg, opt, qnames, reports, force, prompts, progress, log)
    return out, reports


class _LayerQuantizer:
    def __init__(self, cfg: M3Config, files: TensorFiles, opt: Options, qnames: set[str]):
        self.cfg, self.files, self.opt, self.qnames = cfg, files, opt, qnames
        self.inv_freq = rope_inv_freq(cfg)

    # -- tensors outside the layers
    def rest_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for n in self.files.names():
            if n.startswith("model.layers."):
                continue
            t = self.files.get(n)
            if n == "lm_head.weight" and self.opt.lm_head_bits == 8:
                s = Scheme(8, 128 if t.shape[1] % 128 == 0 else -1, True)
                qt, sc, z = rtn_quantize(t.float(), s)
                out.update({f"lm_head.{k}": v for k, v in pack_linear(qt, sc, z, s, torch.bfloat16).items()})
            else:
                out[n] = t.to(torch.bfloat16)
        return out

    def embed(self, prompts) -> dict[str, torch.Tensor]:
        """Token embeddings with the image / audio embedders' rows scattered in (fp32)."""
        emb = self.files.get("model.embed_tokens.weight")
        out = {}
        from m3edge.model.m3lite import Embedder

        embedders = {}
        for name, sub, tok in (("vision_embed", self.cfg.vision_config, self.cfg.image_token_id),
                               ("audio_embed", self.cfg.audio_config, self.cfg.audio_token_id)):
            if sub is not None:
                e = Embedder(sub.embed_in_dim, self.cfg.hidden_size)
                e.load_state_dict({k: self.files.get(f"model.{name}.{k}").float() for k in e.state_dict()})
                embedders[tok] = e
        with torch.no_grad():
            for j, p in enumerate(prompts):
                h = emb[p.input_ids].float()  # [S, H]
                for feats, tok in ((p.image_patches, self.cfg.image_token_id), (p.audio_features, self.cfg.audio_token_id)):
                    if feats is not None:
                        h[p.input_ids == tok] = embedders[tok](feats.float())
                out[f"h{j}"] = h
        return out

    # -- one weight matrix
    def _quantize(self, name: str, w: torch.Tensor, stats, out: dict, rep_err: list) -> torch.Tensor:
        """Quantize w [N, K] (fp32) with the method; store packed tensors; return Ŵ (fp32)."""
        base = name.removesuffix(".weight")
        if name not in self.qnames:
            out[name] = w.to(torch.bfloat16)
            return w.to(torch.bfloat16).float()
        s = self.opt.scheme
        if stats is None or self.opt.method == "rtn":
            qt, sc, z = rtn_quantize(w, s)
        elif self.opt.method == "gptq":
            # the grid (scale, zero per group) from AWQ's activation-aware clip search, the integers
            # from GPTQ's error compensation on that fixed grid
            _, sc, z = awq_quantize(w, stats, s)
            qt, sc, z = gptq_quantize(w, stats.hessian(), s, damp=self.opt.damp, act_order=self.opt.act_order,
                                      static_grid=(sc, z))
        else:
            qt, sc, z = awq_quantize(w, stats, s)
        out.update({f"{base}.{k}": v for k, v in pack_linear(qt, sc, z, s, torch.bfloat16).items()})
        w_hat = deq(qt, sc, z, s.group_size(w.shape[1]))
        rep_err.append(float((w - w_hat).norm() / w.norm().clamp_min(1e-12)))
        return w_hat

    def _stats(self):
        if self.opt.method in ("gptq", "awq"):
            return lambda k: ActStats(k)
        return None

    def _w(self, name: str) -> torch.Tensor:
        return self.files.get(name).float()

    # -- one decoder layer
    @torch.no_grad()
    def layer(self, i: int, prompts, hidden, progress):
        cfg, p = self.cfg, f"model.layers.{i}"
        out: dict[str, torch.Tensor] = {}
        errs: list[float] = []
        rep = LayerReport(layer=i)
        mk = self._stats()
        calibrated = hidden is not None and mk is not None
        for n in (f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight",
                  f"{p}.self_attn.q_norm.weight", f"{p}.self_attn.k_norm.weight",
                  *[f"{p}.self_attn.{x}_proj.bias" for x in "qkvo"],
                  *[f"{p}.mlp.{r}.weight" for r in ROUTER_NAMES]):
            if n in self.files:
                out[n] = self.files.get(n).to(torch.bfloat16)
        rep.bytes_in = sum(self.files.nbytes(n) for n in self.files.names() if n.startswith(p + "."))

        if not calibrated:  # RTN: matrix by matrix, no activations
            for x in "qkvo":
                name = f"{p}.self_attn.{x}_proj.weight"
                self._quantize(name, self._w(name), None, out, errs)
            self._mlp(i, None, None, out, errs, rep, progress)
            rep.rel_error = sum(errs) / max(len(errs), 1)
            rep.bytes_out = sum(t.numel() * t.element_size() for t in out.values())
            return out, hidden, rep

        # attention: q, k, v share their input; o sees the attention output of the quantized q, k, v
        attn = Attention(cfg, i)
        ln1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        ln1.weight.copy_(self._w(f"{p}.input_layernorm.weight"))
        xs = [ln1(h) for h in hidden]
        st = mk(cfg.hidden_size)
        for x in xs:
            st.add(x)
        for x in "qkv":
            getattr(attn, f"{x}_proj").weight.copy_(self._quantize(f"{p}.self_attn.{x}_proj.weight",
                                                                   self._w(f"{p}.self_attn.{x}_proj.weight"), st, out, errs))
        if cfg.attention_bias:
            for x in "qkvo":
                getattr(attn, f"{x}_proj").bias.copy_(self._w(f"{p}.self_attn.{x}_proj.bias"))
        if cfg.use_qk_norm:
            attn.q_norm.weight.copy_(self._w(f"{p}.self_attn.q_norm.weight"))
            attn.k_norm.weight.copy_(self._w(f"{p}.self_attn.k_norm.weight"))
        wo = self._w(f"{p}.self_attn.o_proj.weight")
        o_in = []
        hook = attn.o_proj.register_forward_pre_hook(lambda mod, args: o_in.append(args[0][0]))
        for x, pr in zip(xs, prompts):
            S = x.shape[0]
            cos, sin = rope_cos_sin(cfg, self.inv_freq, pr.position_ids[:, None], torch.float32)
            allowed = torch.ones(S, S, dtype=torch.bool).tril()
            if cfg.sliding_window:
                allowed &= ~torch.ones(S, S, dtype=torch.bool).tril(-cfg.sliding_window)
            attn(x[None], cos, sin, allowed[None, None], None)
        hook.remove()
        st = mk(attn.o_proj.in_features)
        for a in o_in:
            st.add(a)
        s = self._v_o_scale(i, wo, st, out)
        if s is not None:
            wo, st, o_in = wo * s, st.scaled(s), [a / s for a in o_in]
        wo_hat = self._quantize(f"{p}.self_attn.o_proj.weight", wo, st, out, errs)
        bo = attn.o_proj.bias if cfg.attention_bias else None
        h2 = [h + F.linear(a, wo_hat, bo) for h, a in zip(hidden, o_in)]
        del xs

        ln2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        ln2.weight.copy_(self._w(f"{p}.post_attention_layernorm.weight"))
        x2 = [ln2(h) for h in h2]
        ys = self._mlp(i, x2, prompts, out, errs, rep, progress)
        new_hidden = [h + y for h, y in zip(h2, ys)]
        rep.rel_error = sum(errs) / max(len(errs), 1)
        rep.bytes_out = sum(t.numel() * t.element_size() for t in out.values())
        return out, new_hidden, rep

    def _swiglu(self, prefix: str, x: torch.Tensor | None, stats_mk, out, errs, tokens_ok: bool) -> torch.Tensor | None:
        """Quantize one SwiGLU (gate, up: same input; down: its activation); return its output on x."""
        wg, wu, wd = (self._w(f"{prefix}.{n}_proj.weight") for n in ("gate", "up", "down"))
        use = x is not None and tokens_ok and stats_mk is not None
        st = None
        if use:
            st = stats_mk(wg.shape[1])
            st.add(x)
        g_hat = self._quantize(f"{prefix}.gate_proj.weight", wg, st, out, errs)
        if x is None:
            self._quantize(f"{prefix}.up_proj.weight", wu, None, out, errs)
            self._quantize(f"{prefix}.down_proj.weight", wd, None, out, errs)
            return None
        gate = F.silu(x @ g_hat.T)  # [n, I]
        if use and self.opt.awq_scale and f"{prefix}.down_proj.weight" in self.qnames:
            # up rows -> down columns: down's input is silu(g) * (x u^T), linear in u's rows
            st0 = stats_mk(wd.shape[1])
            st0.add(gate * (x @ wu.T))
            s = search_input_scale([wd], st0, self.opt.scheme)
            wu, wd = wu / s[:, None], wd * s
        u_hat = self._quantize(f"{prefix}.up_proj.weight", wu, st, out, errs)
        act = gate * (x @ u_hat.T)  # [n, I]
        st = None
        if use:
            st = stats_mk(wd.shape[1])
            st.add(act)
        d_hat = self._quantize(f"{prefix}.down_proj.weight", wd, st, out, errs)
        return act @ d_hat.T

    def _v_o_scale(self, i: int, wo: torch.Tensor, st, out: dict) -> torch.Tensor | None:
        """AWQ scaling v rows -> o columns, after q, k, v are quantized: attention is linear in v, so
        dividing v's rows by s_v divides o's input channels by s_v of the kv head they read (GQA: one
        scale for the q heads sharing a v channel). Powers of two, so v's stored rows (scales, bias,
        or bf16 weight) divide exactly and o's calibration inputs stay exactly what the file computes.
        Returns the scale of o's columns, or None."""
        cfg, p = self.cfg, f"model.layers.{i}"
        if not self.opt.awq_scale or f"{p}.self_attn.o_proj.weight" not in self.qnames:
            return None
        D, rep = cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
        j = torch.arange(cfg.num_attention_heads * D)
        v_of = (j // D // rep) * D + j % D  # o input channel -> the v channel it reads
        s = search_input_scale([wo], st, self.opt.scheme, tie=v_of, pow2=True)
        if bool((s == 1).all()):
            return None
        s_v = torch.ones(cfg.num_key_value_heads * D).index_copy_(0, v_of, s)
        v = f"{p}.self_attn.v_proj."
        for k in ("weight_scale", "weight", "bias"):
            if v + k in out:
                t = out[v + k]
                out[v + k] = (t.float() / (s_v if t.dim() == 1 else s_v[:, None])).to(t.dtype)
        return s

    def _mlp(self, i, x2, prompts, out, errs, rep, progress):
        cfg, p = self.cfg, f"model.layers.{i}"
        mk = self._stats()
        if not cfg.is_moe_layer(i):
            if x2 is None:
                self._swiglu(f"{p}.mlp.shared_experts", None, None, out, errs, False)
                return None
            xa = torch.cat(x2)
            y = self._swiglu(f"{p}.mlp.shared_experts", xa, mk, out, errs, True)
            return list(y.split([x.shape[0] for x in x2]))
        E = cfg.num_experts
        if x2 is None:  # RTN: no routing needed
            for e in range(E):
                self._swiglu(f"{p}.mlp.experts.{e}", None, None, out, errs, False)
                if progress:
                    progress(f"layer {i} expert {e}", e + 1, E)
            if cfg.num_shared_experts:
                self._swiglu(f"{p}.mlp.shared_experts", None, None, out, errs, False)
            return None
        xa = torch.cat(x2)  # [T, H]
        mods = [modality_of(cfg, pr.input_ids) for pr in prompts]  # per prompt [S]
        modality = torch.cat(mods)
        fusion_ok = torch.cat([(m != MODALITY_TEXT).cumsum(0) > 0 for m in mods])  # causal fusion rule, per prompt
        routers = [self.files.get(f"{p}.mlp.{r}.weight") for r in ROUTER_NAMES[: len(cfg.router_modalities)]]
        w, idx = route(cfg, routers, xa, modality, fusion_ok)  # [T, k]
        counts = {}
        for m, name in enumerate(cfg.router_modalities):
            sel = idx[modality == m]
            counts[name] = torch.bincount(sel.reshape(-1), minlength=E).tolist()
        rep.expert_tokens = counts
        y = torch.zeros_like(xa)
        for e in range(E):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            enough = len(tok) >= self.opt.min_expert_tokens
            if not enough and not self.opt.calibrate_all_experts:
                rep.rtn_fallback.append(e)
            calib_x = xa if self.opt.calibrate_all_experts else xa[tok]
            if self.opt.calibrate_all_experts or enough:
                # Hessian from the calibration tokens, output only where the expert is routed
                ye = self._swiglu(f"{p}.mlp.experts.{e}", calib_x, mk, out, errs, True)
                if self.opt.calibrate_all_experts:
                    ye = ye[tok]
            else:
                ye = self._swiglu(f"{p}.mlp.experts.{e}", xa[tok], None, out, errs, False)
            y.index_add_(0, tok, ye * w[tok, slot, None])
            if progress:
                progress(f"layer {i} expert {e}", e + 1, E)
        if cfg.num_shared_experts:
            y += self._swiglu(f"{p}.mlp.shared_experts", xa, mk, out, errs, True)
        return list(y.split([x.shape[0] for x in x2]))


def _trim_heap() -> None:
    """Keep freed matrices out of RSS. glibc serves blocks below its adaptive (up to 32 MB) mmap
    threshold from the heap and keeps them after free, so a layer's worth of fp32 matrices would
    ratchet RSS up across layers: pin the threshold at 1 MiB (big blocks are mmapped and unmapped
    on free) and trim what the heap holds."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _assemble(src: Path, dst: Path, work: _Work, cfg: M3Config, opt: Options, qnames: set[str],
              reports: list[LayerReport], force: bool, prompts=None, progress=None, log=None) -> Path:
    """Hard-link the shards into a fresh temp dir with their final names, add config, index and
    side files, tune the scales there if asked, add report and manifest, then rename it to DST (the
    work dir, untuned, stays valid until then: a run killed while tuning resumes from here)."""
    final = dst.parent / f".{dst.name}.assemble"
    shutil.rmtree(final, ignore_errors=True)
    final.mkdir()
    shards = ["rest.safetensors"] + [f"layer-{i:05d}.safetensors" for i in range(cfg.num_hidden_layers)]
    n = len(shards)
    weight_map = {}
    for k, s in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        os.link(work.dir / s, final / name)
        with safe_open(str(final / name), "pt") as f:
            weight_map.update({t: name for t in f.keys()})
    (final / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    raw = json.loads((src / "config.json").read_text())
    groups = [(opt.scheme, sorted(n.removesuffix(".weight") for n in qnames))]
    src_files = TensorFiles(src)
    if opt.lm_head_bits == 8 and "lm_head.weight" in src_files:
        lm = src_files.shape("lm_head.weight")
        groups.append((Scheme(8, 128 if lm[1] % 128 == 0 else -1, True), ["lm_head"]))
    ignore = ["re:.*mlp\\.(gate|image_gate|audio_gate)$", "re:.*(vision|audio)_embed.*", "model.embed_tokens"]
    if opt.lm_head_bits == 0:
        ignore.append("lm_head")
    raw["torch_dtype"] = "bfloat16"
    raw["quantization_config"] = quantization_config(groups, ignore)
    (final / "config.json").write_text(json.dumps(raw, indent=2))
    for f in SIDE_FILES:
        if (src / f).exists():
            shutil.copyfile(src / f, final / f)
    report = {"method": opt.method, "options": opt.key(), "layers": [asdict(r) for r in reports]}
    if opt.tune_epochs and qnames:
        from m3edge.quantize.tune import tune_scales

        report["tune_scales"] = t = tune_scales(src, final, qnames, prompts, opt.tune_epochs, progress)
        if log:
            log(f"tuned scales: held-out KL {t['held_out_kl_before']:.4f} -> {t['held_out_kl_after']:.4f} "
                f"(step {t['kept_step']} of {t['steps']} kept), {t['seconds']:.0f} s")
    (final / "quantization_report.json").write_text(json.dumps(report, indent=1))
    write_manifest(final, {"format": "m3edge-quantized/1"})
    share(final)
    if dst.exists() and force:
        shutil.rmtree(dst)
    os.replace(final, dst)
    shutil.rmtree(work.dir, ignore_errors=True)
    return dst

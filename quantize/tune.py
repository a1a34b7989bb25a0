"""End-to-end tuning of the group scales after quantizing: `m3edge quantize --tune-scales N`.

The integers and zero points the method chose stay as they are; every group's scale s becomes
s * exp(a), and the a's are trained so that the quantized model's next-token distribution matches
the float model's on the calibration prompts: KL(float || quantized) over every position, one
prompt a step, Adam at lr 2e-3 with a cosine decay to 0 over N epochs, a fixed shuffle seed. This
is EfficientQAT's end-to-end step on the quantization parameters (Chen et al. 2024, "E2E-QP"), with
the float model as the teacher instead of the labels. One prompt in five is held out of training;
the scales kept are those of the step with the lowest held-out KL (checked three times an epoch,
the untuned scales included), rounded to bf16 as the file stores them.

Only the scales move (one number per group: 1/128 of the weights at g128), so the file format,
the integers and every kernel stay the same; the tuned checkpoint differs from the untuned one in
its `weight_scale` tensors only.

Not streaming: the float model and the quantized one are in RAM at once (fp32 float model, the
integers at one byte a weight), plus one prompt's activations for the backward pass. Meant for
models that fit a workstation's RAM twice; the layer-by-layer part of `m3edge quantize` is
unaffected.

Measured on SmolLM2-135M (int4 g128, GPTQ with act-order, held-out GPL-3 perplexity, 2 CPU cores):
see bench/quant_quality.py and the README's table.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from m3edge.model.checkpoint import INDEX, TensorFiles, load_model, packed_parts
from m3edge.model.m3lite import M3Lite, MoE
from m3edge.model.packing import scheme_for, unpack_linear
from m3edge.model.scheme import dequantize
from m3edge.prompt import Prompt
from m3edge.quantize.gptq import round_scale

LR = 2e-3
HOLD_OUT = 5  # every 5th calibration prompt is held out
CHECKS_PER_EPOCH = 3
SEED = 0


class ScaledLinear(nn.Module):
    """A quantized linear whose group scales train: w = (q - zero) * s0 * exp(a), a [out, G] from 0."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int,
                 bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("q", q)  # int8 [out, in]
        self.register_buffer("s0", scale.float())  # [out, G]
        self.register_buffer("zero", zero)  # int32 [out, G] or None
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        self.a = nn.Parameter(torch.zeros_like(self.s0))
        self.group = group

    def scale(self) -> torch.Tensor:
        return self.s0 * torch.exp(self.a)

    def weight(self) -> torch.Tensor:
        return dequantize(self.q, self.scale(), self.zero, self.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)


def attach(model: M3Lite, files: TensorFiles, qcfg: dict, names: set[str]) -> dict[str, ScaledLinear]:
    """Give the model's quantized linears (checkpoint module names in `names`, no `.weight`) trainable
    scales: an nn.Linear is replaced by a ScaledLinear; a MoE's stacked expert weights become plain
    tensors rebuilt from their experts' ScaledLinears before each forward. Returns them by name."""
    out: dict[str, ScaledLinear] = {}

    def scaled(name: str, bias: torch.Tensor | None) -> ScaledLinear:
        s = scheme_for(name, qcfg)
        u = unpack_linear(packed_parts(files, name), s)
        if u.minimum is not None:
            raise ValueError(f"{name}: float-minimum (GGUF) grids are not tuned")
        out[name] = ScaledLinear(u.q, u.scale, u.zero, s.group_size(u.q.shape[1]), bias)
        return out[name]

    for path, mod in list(model.named_modules()):
        prefix = f"model.{path}" if path else "model"
        if isinstance(mod, MoE):
            _attach_experts(mod, prefix, names, scaled)
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.Linear) and f"{prefix}.{child_name}" in names:
                setattr(mod, child_name, scaled(f"{prefix}.{child_name}", child.bias))
    missing = names - out.keys()
    if missing:
        raise ValueError(f"no module for {len(missing)} quantized linear(s), e.g. {sorted(missing)[0]}")
    return out


def _attach_experts(moe: MoE, prefix: str, names: set[str], scaled) -> None:
    E, I = moe.down.shape[0], moe.down.shape[2]
    parts = []  # per expert: (gate, up, down), each a ScaledLinear or (left unquantized) its float rows
    for e in range(E):
        dense = (moe.gate_up[e, :I], moe.gate_up[e, I:], moe.down[e])
        parts.append([scaled(f"{prefix}.experts.{e}.{p}_proj", None) if f"{prefix}.experts.{e}.{p}_proj" in names
                      else d.detach().clone() for p, d in zip(("gate", "up", "down"), dense)])
    del moe.gate_up, moe.down  # parameters -> plain tensors, set before each forward

    def weight(x):
        return x.weight() if isinstance(x, ScaledLinear) else x

    def rebuild(mod, args):
        mod.gate_up = torch.stack([torch.cat([weight(g), weight(u)]) for g, u, _ in parts])
        mod.down = torch.stack([weight(d) for _, _, d in parts])

    moe.register_forward_pre_hook(rebuild)


def _logprobs(model: M3Lite, p: Prompt) -> torch.Tensor:
    """[S, V] fp32 log-probabilities of the next token at every position of one prompt."""
    logits = model(p.input_ids[None], p.position_ids[:, None], p.image_patches, p.audio_features)[0]
    return F.log_softmax(logits.float(), dim=-1)


def _kl(student: M3Lite, teacher: M3Lite, p: Prompt) -> torch.Tensor:
    with torch.no_grad():
        t = _logprobs(teacher, p)
    return F.kl_div(_logprobs(student, p), t, log_target=True, reduction="batchmean")


@torch.no_grad()
def _held_out_kl(student: M3Lite, teacher: M3Lite, prompts: list[Prompt]) -> float:
    tokens = sum(len(p) for p in prompts)
    return sum(float(_kl(student, teacher, p)) * len(p) for p in prompts) / tokens


def tune_scales(src: Path, qdir: Path, qnames: set[str], prompts: list[Prompt], epochs: int,
                progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Tune the scales of the assembled (not yet published) checkpoint `qdir` against the float
    checkpoint `src`; rewrite its shards' `weight_scale` tensors in place (by new files + rename:
    the shards may be hard links into the work directory, which must keep the untuned ones for
    `--resume`). Returns what to report: held-out KL before / after, the step kept, seconds."""
    t0 = time.perf_counter()
    names = {n.removesuffix(".weight") for n in qnames}
    qcfg = json.loads((qdir / "config.json").read_text())["quantization_config"]
    teacher = load_model(src, dtype=torch.float32)
    student = load_model(qdir, dtype=torch.float32)
    files = TensorFiles(qdir)
    layers = attach(student, files, qcfg, names)
    files.close()
    for p in [*teacher.parameters(), *student.parameters()]:
        p.requires_grad_(False)
    params = [m.a for m in layers.values()]
    for a in params:
        a.requires_grad_(True)

    held = prompts[::HOLD_OUT]
    train = [p for i, p in enumerate(prompts) if i % HOLD_OUT] or held
    n_steps = epochs * len(train)
    check_every = max(1, len(train) // CHECKS_PER_EPOCH)
    opt = torch.optim.Adam(params, lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, n_steps) / n_steps)))
    gen = torch.Generator().manual_seed(SEED)
    before = _held_out_kl(student, teacher, held)
    best, best_step, best_a = before, 0, [a.detach().clone() for a in params]
    step = 0
    for _ in range(epochs):
        for i in torch.randperm(len(train), generator=gen).tolist():
            loss = _kl(student, teacher, train[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % check_every == 0 or step == n_steps:
                kl = _held_out_kl(student, teacher, held)
                if kl < best:
                    best, best_step, best_a = kl, step, [a.detach().clone() for a in params]
            if progress:
                progress(f"tune scales {step}/{n_steps}", step, n_steps)
    del teacher

    with torch.no_grad():
        for a, b in zip(params, best_a):
            a.copy_(b)
        tuned = {f"{n}.weight_scale": round_scale(m.scale(), torch.bfloat16).to(torch.bfloat16)
                 for n, m in layers.items()}
    _rewrite(qdir, tuned)
    return {"epochs": epochs, "steps": n_steps, "kept_step": best_step, "held_out_prompts": len(held),
            "held_out_kl_before": before, "held_out_kl_after": best, "seconds": time.perf_counter() - t0}


def _rewrite(qdir: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Replace the named tensors in qdir's shards: each touched shard is written anew and renamed."""
    weight_map = json.loads((qdir / INDEX).read_text())["weight_map"]
    by_file: dict[str, list[str]] = {}
    for n in tensors:
        by_file.setdefault(weight_map[n], []).append(n)
    for fname in sorted(by_file):
        path = qdir / fname
        with safe_open(str(path), "pt") as f:
            data = {k: f.get_tensor(k) for k in f.keys()}
        for n in by_file[fname]:
            assert data[n].shape == tensors[n].shape and data[n].dtype == tensors[n].dtype, n
            data[n] = tensors[n]
        tmp = path.with_name(path.name + ".tmp")
        save_file(data, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)

"""Model quality measures: perplexity on a text file, and routing agreement with a reference.

Perplexity rule (stated so numbers compare across tools): the file is tokenized as one string
with no special tokens; it is cut into non-overlapping windows of `window` tokens (a last, shorter
window is dropped); each window is scored on its own, with the tokenizer's BOS prepended when its
config says `add_bos_token` (the window then holds window - 1 text tokens), and every token after
the first position is predicted: ppl = exp(mean NLL over all predicted tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from m3edge.errors import M3Error
from m3edge.model.m3lite import M3Lite
from m3edge.model.tokenizer import Tokenizer


@dataclass
class PplResult:
    ppl: float
    tokens: int  # predicted tokens
    windows: int
    bos: bool


def text_ids(tok: Tokenizer, path: str | Path) -> list[int]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise M3Error(f"text file '{path}' does not exist") from None
    except UnicodeDecodeError:
        raise M3Error(f"text file '{path}' is not UTF-8 text") from None
    return tok.encode(text, add_bos=False)


def _window_logits(model, x: torch.Tensor) -> torch.Tensor:
    """Logits predicting tokens 1.. of the window x [1, n]: the torch reference or an ONNX Runtime
    decoder (`m3edge.runtime.ort.OrtDecoder`, a fresh cache per window)."""
    if isinstance(model, M3Lite):
        return model(x)[0, :-1].float()
    n = x.shape[1]
    out = model.step(x[0].numpy(), np.tile(np.arange(n), (3, 1)), model.new_cache(), num_logits=n)
    return torch.from_numpy(out[:-1])


@torch.inference_mode()
def perplexity(model, tok: Tokenizer, ids: list[int], window: int = 512,
               progress: Callable[[str, int, int], None] | None = None) -> PplResult:
    """`model`: an M3Lite or an OrtDecoder."""
    bos = tok.add_bos and tok.bos_id is not None
    step = window - 1 if bos else window
    n = len(ids) // step
    if n == 0:
        raise M3Error(f"the text has {len(ids)} tokens, fewer than one {window}-token window")
    nll, count = 0.0, 0
    for w in range(n):
        chunk = ids[w * step:(w + 1) * step]
        x = torch.tensor([([tok.bos_id] if bos else []) + chunk])
        logits = _window_logits(model, x)  # [window - 1, V]
        nll += float(F.cross_entropy(logits, x[0, 1:], reduction="sum"))
        count += x.shape[1] - 1
        if progress:
            progress(f"window {w + 1}/{n}", w + 1, n)
    return PplResult(math.exp(nll / count), count, n, bos)


@torch.inference_mode()
def routing_agreement(model: M3Lite, ref: M3Lite, prompts) -> dict[str, float]:
    """Mean |top-k(model) ∩ top-k(ref)| / k over MoE layers and tokens, per modality (spec 7, item 8)."""
    mods = {0: "text", 1: "image", 2: "audio"}
    hits = {m: 0.0 for m in mods}
    total = {m: 0 for m in mods}
    pairs = [(a.mlp, b.mlp) for a, b in zip(model.layers, ref.layers) if hasattr(a.mlp, "routers")]
    if not pairs:
        raise M3Error("the model has no MoE layers, so there is no routing to compare")
    for a, b in pairs:
        a.routing_log, b.routing_log = [], []
    try:
        for p in prompts:
            args = (p.input_ids[None], p.position_ids[:, None], p.image_patches, p.audio_features)
            model(*args)
            ref(*args)
        for a, b in pairs:
            for (ia, mod), (ib, _) in zip(a.routing_log, b.routing_log):
                k = ia.shape[-1]
                inter = (ia[..., :, None] == ib[..., None, :]).any(-1).sum(-1).float() / k  # [B, S]
                for m in mods:
                    sel = mod == m
                    hits[m] += float(inter[sel].sum())
                    total[m] += int(sel.sum())
    finally:
        for a, b in pairs:
            a.routing_log = b.routing_log = None
    return {mods[m]: hits[m] / total[m] for m in mods if total[m]}

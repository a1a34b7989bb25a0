"""Backends: (token ids, positions, media features, cache) in, logits out. Nothing else.

The engine owns prompts, sampling and streaming; a backend only runs the network. `torch` is the
reference model; `ort` (ONNX Runtime) and `cuda` (native int4 kernels) plug in with the same
three methods.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from m3edge.errors import M3Error
from m3edge.model.m3lite import M3Config, KVCache


class Backend(Protocol):
    name: str
    cfg: M3Config

    def new_cache(self) -> KVCache: ...

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, image_patches: torch.Tensor | None,
                audio_features: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
        """input_ids [1, S], position_ids [3, 1, S] -> logits of the last position [V] (fp32)."""
        ...


class TorchBackend:
    name = "torch"

    def __init__(self, model_dir: str | Path, dtype: torch.dtype | None = None, device: str = "cpu"):
        from m3edge.model.checkpoint import load_model

        self.model = load_model(model_dir, dtype=dtype, device=device)
        self.cfg = self.model.cfg
        self.device = device

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.num_hidden_layers)

    @torch.inference_mode()
    def forward(self, input_ids, position_ids, image_patches, audio_features, cache):
        dev = self.device
        logits = self.model(input_ids.to(dev), position_ids.to(dev),
                            None if image_patches is None else image_patches.to(dev),
                            None if audio_features is None else audio_features.to(dev), cache=cache)
        return logits[0, -1].float()


BACKENDS = ("auto", "torch")


def make_backend(name: str, model_dir: str | Path, dtype: torch.dtype | None = None) -> Backend:
    if name not in BACKENDS:
        raise M3Error(f"unknown backend '{name}' (available: {', '.join(BACKENDS)})")
    return TorchBackend(model_dir, dtype=dtype)

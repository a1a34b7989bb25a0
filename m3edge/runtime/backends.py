"""Backends: (token ids, positions, media features, cache) in, logits out. Nothing else.

The engine owns prompts, sampling and streaming; a backend only runs the network. `torch` is the
reference model; `ort` (ONNX Runtime, runtime/ort.py) and `cuda` (native int4 kernels,
runtime/cuda.py) plug in with the same two methods.
"""

from __future__ import annotations

import sys
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


class OrtBackend:
    """ONNX Runtime on the CPU over an exported graph (export/onnx.py); the core is torch-free."""

    name = "ort"

    def __init__(self, export_dir: str | Path, threads: int | None = None):
        from m3edge.model.checkpoint import read_config
        from m3edge.runtime.ort import OrtDecoder

        self.decoder = OrtDecoder(export_dir, threads)
        self.cfg = read_config(export_dir)

    def new_cache(self):
        return self.decoder.new_cache()

    def forward(self, input_ids, position_ids, image_patches, audio_features, cache):
        logits = self.decoder.step(input_ids[0].numpy(), position_ids[:, 0].numpy(), cache,
                                   None if image_patches is None else image_patches.float().numpy(),
                                   None if audio_features is None else audio_features.float().numpy())
        return torch.from_numpy(logits[-1].copy())


BACKENDS = ("auto", "torch", "ort", "cuda")
_cuda_why: list[str | None] = []  # cuda_reason's answer, asked once per process
_said: list[bool] = []  # auto has said on stderr why it does not use the GPU


def cuda_reason() -> str | None:
    """Why the cuda backend cannot run here (one sentence, said once on stderr under auto), or None."""
    if not _cuda_why and not torch.cuda.is_available():
        _cuda_why.append("torch sees no CUDA GPU")
    elif not _cuda_why:
        from m3edge.runtime.cuda import cuda_unavailable

        _cuda_why.append(cuda_unavailable())
    return _cuda_why[0]


def default_quantized(backend: str) -> bool:
    """Which form of the embedded default model a backend runs: int4 everywhere but the torch reference."""
    return backend != "torch"


def resolve_backend(name: str, model_dir: Path) -> str:
    """`auto`: ONNX Runtime for an ONNX export; for a quantized checkpoint the cuda backend where it
    runs (a CUDA GPU and the native kernels built), else ONNX Runtime once it has been exported
    (`m3edge chat` / `generate` export it once, into the cache); the torch reference otherwise."""
    from m3edge.model.checkpoint import read_config
    from m3edge.runtime.ort import find_export, is_export

    if name not in BACKENDS:
        raise M3Error(f"unknown backend '{name}' (available: {', '.join(BACKENDS)})")
    if is_export(model_dir):
        if name in ("torch", "cuda"):
            raise M3Error(f"{model_dir} is an ONNX export; the {name} backend needs the quantized checkpoint it "
                          "came from (or use --backend ort)")
        return "ort"
    quantized = bool(read_config(model_dir).quantization_config)
    if name in ("ort", "cuda") and not quantized:
        raise M3Error(f"{model_dir} is not quantized and the {name} backend runs int4/int8 models: run "
                      f"`m3edge quantize {model_dir} --out QDIR` first")
    if name == "cuda":
        if cuda_reason():
            raise M3Error(f"the cuda backend cannot run here: {cuda_reason()}")
        return "cuda"
    if name == "auto" and quantized and torch.cuda.is_available():
        if cuda_reason() is None:
            return "cuda"
        if not _said:
            print(f"m3edge: not using the GPU ({cuda_reason()}); running on ONNX Runtime", file=sys.stderr)
            _said.append(True)
    if not _ort_capable(quantized, name):
        return "torch"
    if find_export(model_dir) is not None:
        return "ort"
    if name == "ort":
        raise M3Error(f"{model_dir} has no ONNX export yet: run `m3edge export {model_dir} --format onnx --out DIR` "
                      "and load DIR (or run `m3edge chat` on it once)")
    return "torch"  # auto before the export exists


def _ort_capable(quantized: bool, name: str) -> bool:
    """ONNX Runtime runs it: asked for, or auto on a quantized model where the cuda backend cannot."""
    return quantized and (name == "ort" or (name == "auto" and cuda_reason() is not None))


def wants_ort(model_dir: Path, name: str = "auto") -> bool:
    """Whether `name` runs this model on ONNX Runtime once it is exported: a quantized checkpoint
    asked for ort, or under auto without a CUDA GPU."""
    from m3edge.model.checkpoint import read_config

    return _ort_capable(bool(read_config(model_dir).quantization_config), name)


def make_backend(name: str, model_dir: str | Path, dtype: torch.dtype | None = None,
                 max_context: int | None = None, progress=None) -> Backend:
    """The backend `name` resolves to for this model; max_context sizes the cuda backend's KV cache,
    progress(name, i, n) follows its load layer by layer."""
    from m3edge.runtime.ort import find_export

    model_dir = Path(model_dir)
    kind = resolve_backend(name, model_dir)
    if kind == "ort":
        return OrtBackend(find_export(model_dir))
    if kind == "cuda":
        from m3edge.runtime.cuda import CudaBackend

        return CudaBackend(model_dir, max_context=max_context, progress=progress)
    return TorchBackend(model_dir, dtype=dtype)

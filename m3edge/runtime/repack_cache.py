"""The cuda backend's repack cache: a checkpoint's linears in the kernels' layout, on disk, made once.

The first load of a checkpoint directory on the cuda backend repacks every linear the kernels take
(runtime/native.py) and writes the results under the cache folder, one safetensors file per layer
(and one for the lm_head); later loads read those files straight onto the GPU and skip the packed
tensors of the checkpoint and the repack. The folder is keyed by the checkpoint (its config and
weight files' names, sizes and modification times) and `native.REPACK_VERSION`, so a re-quantized
checkpoint or a new kernel layout makes a new one; the folder a changed checkpoint left behind is
removed when its new one is made.

    $M3EDGE_CACHE_DIR (else $XDG_CACHE_HOME/m3edge, else ~/.cache/m3edge) / repack / <key> /
        source.txt                the checkpoint directory it was made from
        layer-0000.safetensors    every entry of layer 0 (tensors + their shapes in the metadata)
        ...
        lm_head.safetensors

Each file is written to a temporary name (per process) and renamed when complete, so a crash, a full
disk or two loads at once leave only whole files (a load after it repacks what is missing). A file that cannot be read is repacked
and written again. Where the folder cannot be written, or the disk has less free space than the
weights need, the load goes on without the cache and says why once on stderr.
M3EDGE_CACHE_DIR=off turns it off.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from m3edge.runtime import native

OFF = ("", "0", "off", "none", "false")


def cache_root() -> Path | None:
    """The cache folder (module doc), or None when M3EDGE_CACHE_DIR turns it off."""
    env = os.environ.get("M3EDGE_CACHE_DIR")
    if env is not None:
        return None if env.strip().lower() in OFF else Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "m3edge"


def checkpoint_key(model_dir: str | os.PathLike) -> str:
    """The checkpoint's identity for the cache: its json and safetensors files' names, sizes and
    modification times, and the repack layout's version."""
    h = hashlib.sha256(f"m3edge repack v{native.REPACK_VERSION}\n".encode())
    for p in sorted(Path(model_dir).iterdir()):
        if p.is_file() and p.suffix in (".json", ".safetensors"):
            st = p.stat()
            h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def _note(msg: str) -> None:
    print(f"m3edge: {msg}", file=sys.stderr)


class RepackCache:
    """The cache folder of one checkpoint. `part(name)` gives one file's entries (module doc)."""

    def __init__(self, model_dir: str | os.PathLike, device: torch.device, need_bytes: int,
                 root: Path | None = None):
        """need_bytes: the repacked weights' size (the memory plan's), checked against free disk."""
        self.model_dir = Path(model_dir).resolve()
        self.device = device
        root = root if root is not None else cache_root()
        self.dir = None if root is None else root / "repack" / checkpoint_key(self.model_dir)
        self.writable = self.dir is not None
        if self.dir is None:
            return
        try:
            if not (self.dir / "source.txt").exists():
                self._make(need_bytes)
        except OSError as e:
            self._off(f"cannot write the repack cache in {self.dir.parent} ({e.strerror or e})")

    def _make(self, need_bytes: int) -> None:
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.dir.parent).free
        if free < need_bytes + (1 << 30):
            self._off(f"{free / 2**30:.1f} GiB free in {self.dir.parent}, the repack cache needs "
                      f"{need_bytes / 2**30 + 1:.1f}")
            return
        for old in self.dir.parent.iterdir():  # this checkpoint's folder from before it changed
            src = old / "source.txt"
            if old != self.dir and src.is_file() and src.read_text().strip() == str(self.model_dir):
                shutil.rmtree(old, ignore_errors=True)
        self.dir.mkdir(exist_ok=True)
        (self.dir / "source.txt").write_text(f"{self.model_dir}\n")

    def _off(self, why: str) -> None:
        if self.writable:
            _note(f"{why}; loading without it (M3EDGE_CACHE_DIR sets the folder, =off turns this off)")
        self.writable = False

    def part(self, name: str) -> "CachePart":
        return CachePart(self, name)


class CachePart:
    """One file of the cache: entries of `W4Weights` lists, read on a hit, made and kept on a miss,
    written by `save` when anything was made."""

    def __init__(self, cache: RepackCache, name: str):
        self.cache, self.name = cache, name
        self.path = None if cache.dir is None else cache.dir / f"{name}.safetensors"
        self.tensors: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, list[list[int]]] = {}
        self.made = False
        if self.path is not None and self.path.is_file():
            try:
                with safe_open(str(self.path), framework="pt", device=str(cache.device)) as f:  # one read
                    self.shapes = json.loads((f.metadata() or {}).get("entries", "{}"))
                    self.tensors = {k: f.get_tensor(k) for k in f.keys()}
            except (SafetensorError, OSError, ValueError, RuntimeError):
                self.tensors, self.shapes = {}, {}  # unreadable: repacked and written again

    def get(self, entry: str, make: Callable[[], list[native.W4Weights]]) -> list[native.W4Weights]:
        """The entry's weights from the file, or make() (which reads the checkpoint) kept for `save`."""
        got = self._read(entry)
        if got is not None:
            return got
        ws = make()
        self.made = True
        self.shapes[entry] = [[w.n, w.k, w.group] for w in ws]
        for j, w in enumerate(ws):
            for field in ("w", "scales", "mins", "zeros"):
                t = getattr(w, field)
                if t is not None:
                    self.tensors[f"{entry}.{j}.{field}"] = t
        return ws

    def _read(self, entry: str) -> list[native.W4Weights] | None:
        shapes = self.shapes.get(entry)
        if shapes is None or not all(f"{entry}.{j}.w" in self.tensors for j in range(len(shapes))):
            return None
        t = self.tensors
        return [native.W4Weights(t[f"{entry}.{j}.w"], t[f"{entry}.{j}.scales"], t.get(f"{entry}.{j}.mins"),
                                 t.get(f"{entry}.{j}.zeros"), n, k, group)
                for j, (n, k, group) in enumerate(shapes)]

    def save(self) -> None:
        """Write the file (to a temporary name, renamed when complete) if anything was made."""
        cache = self.cache
        if self.made and cache.writable and self.path is not None:
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")  # two loads at once: each its own
            try:
                save_file({k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}, str(tmp),
                          metadata={"entries": json.dumps(self.shapes)})
                os.replace(tmp, self.path)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                cache._off(f"cannot write {self.path} ({e.strerror or e})")
        self.tensors = {}  # the model holds its own references

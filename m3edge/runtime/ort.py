"""The ONNX Runtime backend core: an exported decoder (export/onnx.py) run on the CPU.

Torch-free on purpose (numpy in, numpy out): a kiosk process that runs only this path does not
pay torch's memory. One InferenceSession, intra-op threads = cores, IO binding: the KV cache lives
in one preallocated buffer per layer that is bound as both `past_*` and `present_*`, so
GroupQueryAttention appends the new rows in place and nothing is copied between steps. The logits
buffer of a decode step is reused too.
"""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from m3edge.errors import CheckpointError, M3Error

# what export/onnx.py writes (it imports these; the runtime never imports the exporter)
FORMAT, MANIFEST, EMBED_FILE = "m3edge-onnx/2", "export_manifest.json", "embed_tokens.bin"
_INITIAL_CAPACITY = 1024
PREFILL_CHUNK = 128  # tokens per run of a long prompt: bounds activation memory, same speed


def is_export(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def cached_export_dir(model_dir: str | os.PathLike) -> Path:
    """Where `ensure_onnx` (export/onnx.py) keeps the export of a quantized checkpoint: keyed by the
    checkpoint's manifest hash, so a re-quantized model gets a new export."""
    import hashlib

    from m3edge.model.checkpoint import sha256_file
    from m3edge.model.importers import cache_dir

    d = Path(model_dir)
    mf = d / "manifest.json"
    key = sha256_file(mf)[:16] if mf.exists() else hashlib.sha256(str(d.resolve()).encode()).hexdigest()[:16]
    return cache_dir() / "onnx" / f"{d.name}-{key}"


def find_export(model_dir: str | os.PathLike) -> Path | None:
    """`model_dir` if it is an export, else its cached export if one of this format exists."""
    if is_export(model_dir):
        return Path(model_dir)
    out = cached_export_dir(model_dir)
    try:
        return out if json.loads((out / MANIFEST).read_text()).get("format") == FORMAT else None
    except (OSError, json.JSONDecodeError):
        return None


def _lazy_zeros(shape: tuple[int, ...]) -> np.ndarray:
    """float32 zeros in their own anonymous mapping: pages cost memory only once written, and go back
    to the system when the array dies (np.zeros may reuse freed heap memory, which calloc must touch)."""
    buf = mmap.mmap(-1, int(np.prod(shape)) * 4)
    return np.frombuffer(buf, np.float32).reshape(shape)


class OrtCache:
    """The KV buffers of one sequence plus what the engine's KVCache also carries: the fusion bit and
    the M-RoPE delta. `truncate` keeps a prefix (rows past `length` are simply overwritten later)."""

    def __init__(self, n_layers: int, kv_heads: int, head_dim: int, capacity: int):
        self.n_layers, self.kv_heads, self.head_dim = n_layers, kv_heads, head_dim
        self.length = 0
        self.seen_nontext = False
        self.rope_delta: np.ndarray | None = None  # [1] int64, like KVCache
        self.k: list[np.ndarray] = []
        self.v: list[np.ndarray] = []
        self.ort_k: list[ort.OrtValue] = []
        self.ort_v: list[ort.OrtValue] = []
        self.capacity = 0
        self.binding: ort.IOBinding | None = None
        self.scalars: dict[str, np.ndarray] = {}
        self.media_bound: dict[str, np.ndarray] = {}
        self.logits1_bound = False
        self._grow(capacity)

    def _grow(self, capacity: int) -> None:
        shape = (1, self.kv_heads, capacity, self.head_dim)
        cos = np.zeros((capacity, self.head_dim // 2), np.float32)  # row p: the rotary angles of position p
        sin = np.zeros_like(cos)
        if self.capacity:
            cos[: self.length], sin[: self.length] = self.cos[: self.length], self.sin[: self.length]
        self.cos, self.sin = cos, sin
        k = [_lazy_zeros(shape) for _ in range(self.n_layers)]
        v = [_lazy_zeros(shape) for _ in range(self.n_layers)]
        for old, new in zip(self.k + self.v, k + v):
            new[:, :, : self.length] = old[:, :, : self.length]
        self.k, self.v, self.capacity = k, v, capacity
        self.ort_k = [ort.OrtValue.ortvalue_from_numpy(a) for a in k]  # shares the numpy memory
        self.ort_v = [ort.OrtValue.ortvalue_from_numpy(a) for a in v]
        self.binding = None  # OrtDecoder binds the new buffers on the next step

    def reserve(self, n: int, limit: int) -> None:
        if n > limit:
            raise M3Error(f"the sequence needs {n} positions, more than the model's {limit}")
        if n > self.capacity:
            self._grow(min(limit, max(n, 2 * self.capacity)))

    def truncate(self, n: int, seen_nontext) -> None:
        self.length = min(self.length, n)
        self.seen_nontext = bool(np.asarray(seen_nontext).reshape(-1)[0])


class OrtDecoder:
    """Token ids (+ media features) and positions in, logits out; the cache is updated in place."""

    def __init__(self, export_dir: str | os.PathLike, threads: int | None = None, profile_prefix: str | None = None):
        """`profile_prefix`: run under ONNX Runtime's profiler (`session.end_profiling()` writes the file)."""
        d = Path(export_dir)
        mpath = d / MANIFEST
        if not mpath.is_file():
            raise CheckpointError(f"{d} is not an ONNX export (no {MANIFEST}); run `m3edge export QMODEL --format onnx --out DIR`")
        try:
            self.manifest = json.loads(mpath.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"cannot read {mpath}: {e}") from None
        if self.manifest.get("format") != FORMAT:
            raise CheckpointError(f"{d} was exported as {self.manifest.get('format')!r}; this m3edge reads {FORMAT!r}: "
                                  "export the quantized model again")
        for f in (d / n for n in self.manifest["files"]):
            if not f.is_file():
                raise CheckpointError(f"{f.name} is missing from {d}: the export is incomplete, export again")
            want = self.manifest["files"][f.name]["bytes"]
            if f.stat().st_size != want:
                raise CheckpointError(f"{f.name} in {d} has {f.stat().st_size} bytes, the manifest says {want}: "
                                      "the file is truncated or from another export")
        rc = self.manifest["runtime"]
        self.n_layers, self.kv_heads, self.head_dim = rc["num_hidden_layers"], rc["num_key_value_heads"], rc["head_dim"]
        self.vocab = rc["vocab_size"]
        self.max_positions = rc["max_position_embeddings"]
        self.inv_freq = np.asarray(rc["rope_inv_freq"], np.float32)
        self.mrope = rc.get("mrope_section")
        self.image_token, self.audio_token = rc.get("image_token_id"), rc.get("audio_token_id")
        self._nontext = [t for t in (self.image_token, self.audio_token) if t is not None]
        self.media_dims = {"image_patches": rc.get("image_embed_dim"), "audio_features": rc.get("audio_embed_dim")}
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or os.cpu_count() or 1
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if profile_prefix:
            so.enable_profiling, so.profile_file_prefix = True, profile_prefix
        try:
            self.session = ort.InferenceSession(str(d / self.manifest["graph"]), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types with long messages
            raise CheckpointError(f"ONNX Runtime cannot load {d / self.manifest['graph']}: {str(e).splitlines()[0]}") from None
        self.input_names = {i.name for i in self.session.get_inputs()}
        self._embedding(d / EMBED_FILE, self.manifest["embedding"])
        self._logits1 = np.empty((1, 1, self.vocab), np.float32)
        self._logits1_ort = ort.OrtValue.ortvalue_from_numpy(self._logits1)
        self._arange = np.arange(_INITIAL_CAPACITY, dtype=np.int64)[None]

    def _embedding(self, path: Path, layout: dict) -> None:
        """Memory-map the token table: a lookup reads only its rows (export/onnx.py writes the file)."""
        def part(name):
            p = layout[name]
            return np.memmap(path, dtype=np.dtype(p["dtype"]), mode="r", offset=p["offset"], shape=tuple(p["shape"]))

        self.embed_bits, self.hidden = layout["bits"], layout["hidden"]
        if self.embed_bits == 16:
            self._table = part("table")  # bf16 bits as uint16 [V, H]
        else:
            self._B, self._scales = part("B"), part("scales")  # uint8 [V, nb, blob], float32 [V, nb]
            # a carried table (an imported GGUF's): uint8 zero points [V, nb], float32 minima [V, nb]
            self._zero = part("zero_points") if "zero_points" in layout else None
            self._mins = part("mins") if "mins" in layout else None

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """[S] token ids -> [1, S, H] float32 rows of the table (dequantized as MatMulNBits would)."""
        if self.embed_bits == 16:
            return (self._table[ids].astype(np.uint32) << 16).view(np.float32)[None]
        u = self._B[ids]  # [S, nb, blob]
        if self.embed_bits == 4:  # element 2i in the low nibble, 2i + 1 in the high one
            u = np.stack([u & 0xF, u >> 4], axis=-1).reshape(len(ids), u.shape[1], -1)
        zu = (1 << (self.embed_bits - 1)) if self._zero is None else self._zero[ids][..., None].astype(np.float32)
        x = (u.astype(np.float32) - zu) * self._scales[ids][..., None]
        if self._mins is not None:
            x += self._mins[ids][..., None]
        return np.ascontiguousarray(x.reshape(len(ids), -1)[:, : self.hidden])[None]

    def _bind_cache(self, cache: OrtCache) -> ort.IOBinding:
        """One binding per cache, made when its buffers are (re)allocated: KV in and out (the same
        buffers), the logits buffer first (so it is output 0), scalar inputs that `step` rewrites."""
        b = self.session.io_binding()
        b.bind_ortvalue_output("logits", self._logits1_ort)
        cache.logits1_bound = True
        cache.scalars = {"seqlens_k": np.zeros(1, np.int32), "total_seq_len": np.zeros((), np.int32),
                         "nontext_seen": np.zeros(1, bool), "num_logits": np.ones(1, np.int64)}
        for name, arr in cache.scalars.items():
            b.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(arr))
        for name in ("image_patches", "audio_features"):
            if name in self.input_names:
                b.bind_cpu_input(name, np.zeros((0, self.media_dims[name]), np.float32))
        cache.media_bound = {}
        for i in range(self.n_layers):
            b.bind_ortvalue_input(f"past_key.{i}", cache.ort_k[i])
            b.bind_ortvalue_input(f"past_value.{i}", cache.ort_v[i])
            b.bind_ortvalue_output(f"present_key.{i}", cache.ort_k[i])
            b.bind_ortvalue_output(f"present_value.{i}", cache.ort_v[i])
        cache.binding = b
        return b

    def new_cache(self) -> OrtCache:
        return OrtCache(self.n_layers, self.kv_heads, self.head_dim, min(_INITIAL_CAPACITY, self.max_positions))

    def rope(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """positions [3, S] (t, h, w) -> cos, sin [S, D/2] with interleaved M-RoPE (as m3lite.rope_cos_sin)."""
        freqs = positions[..., None].astype(np.float32) * self.inv_freq  # [3, S, D/2]
        f = freqs[0].copy()
        if self.mrope is not None:
            for axis in (1, 2):
                f[..., axis: 3 * self.mrope[axis]: 3] = freqs[axis, ..., axis: 3 * self.mrope[axis]: 3]
        return np.cos(f), np.sin(f)

    def step(self, input_ids: np.ndarray, positions: np.ndarray, cache: OrtCache,
             image_patches: np.ndarray | None = None, audio_features: np.ndarray | None = None,
             num_logits: int = 1) -> np.ndarray:
        """input_ids [S] int64, positions [3, S] -> logits [num_logits, V] float32 (for one row, a view
        of a buffer the next step overwrites: copy it to keep it).

        Long prompts run in chunks of `PREFILL_CHUNK` tokens: the same result (attention over the cache
        plus causal within the chunk), with activation memory bounded by the chunk, not the prompt."""
        ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
        positions = np.asarray(positions, np.int64).reshape(3, -1)
        S = len(ids)
        if S <= PREFILL_CHUNK:
            return self._step(ids, positions, cache, image_patches, audio_features, num_logits)
        feats = {"img": (image_patches, self.image_token), "aud": (audio_features, self.audio_token)}
        used = dict.fromkeys(feats, 0)
        out = []
        for a in range(0, S, PREFILL_CHUNK):
            b = min(S, a + PREFILL_CHUNK)
            rows = {}
            for k, (f, tok) in feats.items():  # the feature rows of this chunk's placeholders, in order
                n = 0 if f is None else int((ids[a:b] == tok).sum())
                rows[k] = f[used[k]: used[k] + n] if n else None
                used[k] += n
            want = b - max(a, S - num_logits)  # logits this chunk contributes
            logits = self._step(ids[a:b], positions[:, a:b], cache, rows["img"], rows["aud"], max(want, 1))
            if want > 0:
                out.append(logits.copy() if want == 1 else logits)  # (one row is the reused buffer)
        return np.concatenate(out)

    def _step(self, ids, positions, cache, image_patches, audio_features, num_logits) -> np.ndarray:
        ids = np.ascontiguousarray(ids).reshape(1, -1)
        S, P = ids.shape[1], cache.length
        cache.reserve(P + S, self.max_positions)
        # GroupQueryAttention rotates row i with cos_cache[rope_pos[i]] and wants cos_cache to cover the
        # whole sequence: the cache keeps each position's angles (M-RoPE mixes t/h/w per slot)
        cache.cos[P: P + S], cache.sin[P: P + S] = self.rope(positions)
        if P + S > self._arange.shape[1]:
            self._arange = np.arange(2 * (P + S), dtype=np.int64)[None]
        b = cache.binding if cache.binding is not None else self._bind_cache(cache)
        st = cache.scalars  # bound once; written in place
        st["seqlens_k"][0] = P + S - 1
        st["total_seq_len"][...] = P + S
        st["nontext_seen"][0] = cache.seen_nontext
        st["num_logits"][0] = num_logits
        if "input_ids" in self.input_names:
            b.bind_cpu_input("input_ids", ids)
        embeds = self.embed(ids[0])  # a local: alive until the run below, whether ORT copies it or not
        b.bind_cpu_input("inputs_embeds", embeds)
        b.bind_cpu_input("cos", cache.cos[: P + S])
        b.bind_cpu_input("sin", cache.sin[: P + S])
        b.bind_cpu_input("rope_pos", self._arange[:, P: P + S])
        for name, feats in (("image_patches", image_patches), ("audio_features", audio_features)):
            if name not in self.input_names:
                if feats is not None:
                    raise M3Error(f"this model takes no {name.split('_')[0]} input")
            elif feats is not None or len(cache.media_bound.get(name, ())):  # (re)bind; an empty one stays
                arr = np.zeros((0, self.media_dims[name]), np.float32) if feats is None else feats
                cache.media_bound[name] = np.ascontiguousarray(arr, dtype=np.float32)  # alive while bound
                b.bind_cpu_input(name, cache.media_bound[name])
        if num_logits != 1:  # a fresh output each time (an allocated one keeps its shape)
            b.bind_output("logits")
        elif not cache.logits1_bound:
            b.bind_ortvalue_output("logits", self._logits1_ort)
        cache.logits1_bound = num_logits == 1
        self.session.run_with_iobinding(b)
        cache.length = P + S
        cache.rope_delta = np.array([positions.max() + 1 - (P + S)], np.int64)
        if self._nontext and np.isin(ids, self._nontext).any():
            cache.seen_nontext = True
        if num_logits == 1:
            return self._logits1[0]
        return b.get_outputs()[0].numpy()[0].copy()  # the output buffer is reused by the next run

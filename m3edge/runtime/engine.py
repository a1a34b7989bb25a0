"""The engine: prompt assembly, KV-cache reuse, sampling, stop rules and streaming over a backend.

    engine = Engine.load("path/to/checkpoint")          # or Engine.load() for the embedded default
    chat = engine.chat(system="You are terse.")
    for chunk in chat.send("Hello!"):
        print(chunk.text, end="", flush=True)

Messages follow the OpenAI/HF shape: {"role", "content"} where content is a string or a list of
parts {"type": "text", "text"}, {"type": "image", "image": path | array | PIL.Image},
{"type": "audio", "audio": path | array, "sampling_rate": int}.

Concurrency model: load the engine once and open any number of sessions, from any threads. The
backend runs one forward pass at a time (the engine's lock, held per prefill chunk and per decoded
token, never across a yield), so concurrent generations interleave token by token and each stays
as fast as 1/n of the engine; prompt assembly and media decoding run outside the lock. A session
is one conversation: using the same session from two threads at once raises. `cancel` (a
threading.Event) stops a generation at the next token with finish_reason "cancelled"; `Limits`
bounds what one request may ask (context, image pixels, audio seconds); `close()` (or leaving a
`with` block) frees the backend, and later calls raise.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from m3edge.errors import M3Error, MediaError
from m3edge.model.tokenizer import Tokenizer
from m3edge.prompt import Image, Prompt, build_prompt
from m3edge.runtime.backends import Backend, default_quantized, make_backend
from m3edge.runtime.sampling import SamplingParams, sample

OVERFLOW_POLICIES = ("drop_oldest", "error")
_media_ids = itertools.count()


class ContextOverflowError(M3Error):
    """The prompt plus the tokens to generate do not fit the context window."""


class LimitError(M3Error):
    """A request asks for more than the engine's limits allow (image pixels, audio seconds)."""


@dataclass
class Limits:
    """Per-request bounds for an embedded engine (None: no bound). The context bound is max_context."""

    max_image_pixels: int | None = 4096 * 4096
    max_audio_seconds: float | None = 120.0


@dataclass
class Reply:
    """A finished generation, as the callback-style calls return it."""

    text: str
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    tokens_per_s: float
    ttft_s: float


@dataclass
class GenerationChunk:
    text: str  # text added since the previous chunk
    token_ids: list[int]  # tokens generated since the previous chunk
    generated_tokens: int  # total so far
    prompt_tokens: int
    tokens_per_s: float  # decode rate so far (prefill excluded)
    ttft_s: float  # time to first token (prompt processing + first sample)
    finish_reason: str | None = None  # "eos" | "stop" | "length" | "cancelled" on the last chunk
    notice: str | None = None  # e.g. turns dropped to fit the context


@dataclass
class _CacheState:
    """What the backend's KV cache holds: one key per position (token id, or (media uid, row))."""

    cache: Any
    keys: list


class Engine:
    def __init__(self, backend: Backend, tokenizer: Tokenizer, model_dir: Path, max_context: int | None = None,
                 overflow: str = "drop_oldest", limits: Limits | None = None):
        if overflow not in OVERFLOW_POLICIES:
            raise M3Error(f"overflow policy must be one of {', '.join(OVERFLOW_POLICIES)}, got '{overflow}'")
        self.backend, self.tokenizer, self.model_dir = backend, tokenizer, Path(model_dir)
        self.cfg = backend.cfg
        self.max_context = min(max_context or self.cfg.max_position_embeddings, self.cfg.max_position_embeddings,
                               getattr(backend, "max_context", None) or self.cfg.max_position_embeddings)
        self.overflow = overflow
        self.eos_ids = set(self.cfg.eos_token_id)
        if tokenizer.eos_token and tokenizer.token_id(tokenizer.eos_token) is not None:
            self.eos_ids.add(tokenizer.token_id(tokenizer.eos_token))
        self.limits = limits or Limits()
        # media placeholders are never generated: a placeholder needs feature rows that a sampled one lacks
        self._placeholders = torch.tensor([t for t in (self.cfg.image_token_id, self.cfg.audio_token_id)
                                           if t is not None], dtype=torch.long)
        self._lock = threading.Lock()  # one backend call at a time (module doc: concurrency model)
        self._closed = False

    def _call(self, fn: str | Callable, *args):
        """A backend call (a method name) or a cache call under the engine's lock."""
        with self._lock:
            if self._closed:
                raise M3Error("this engine was closed")
            return (getattr(self.backend, fn) if isinstance(fn, str) else fn)(*args)

    def new_cache(self):
        return self._call("new_cache")

    def close(self) -> None:
        """Free the backend (waits for the forward pass in flight); later calls raise."""
        with self._lock:
            self._closed = True
            self.backend = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def load(cls, model: str | Path | None = None, backend: str = "auto", max_context: int | None = None,
             overflow: str = "drop_oldest", progress: Callable[[str, int, int], None] | None = None,
             limits: Limits | None = None) -> "Engine":
        """Load a checkpoint directory (None: the embedded default, imported on first use). progress
        (name, i, n) follows the import of the default model and the cuda backend's load."""
        from m3edge.model.checkpoint import read_config
        from m3edge.model.importers import ensure_default_model

        model_dir = ensure_default_model(progress, default_quantized(backend)) if model is None else Path(model)
        if model_dir.is_file() and model_dir.suffix == ".gguf":
            raise M3Error(f"'{model_dir}' is a GGUF file; run `m3edge import {model_dir} --out DIR` and use DIR")
        read_config(model_dir)  # one clear error for a path that is not a checkpoint
        be = make_backend(backend, model_dir, max_context=max_context, progress=progress)
        return cls(be, Tokenizer.from_dir(model_dir), model_dir, max_context, overflow, limits)

    def chat(self, system: str | None = None) -> "ChatSession":
        return ChatSession(self, system)

    def generate(self, messages: str | list[dict[str, Any]], params: SamplingParams | None = None,
                 cancel: threading.Event | None = None, **kw) -> Iterator[GenerationChunk]:
        """One-shot generation (no history kept). A string is one user message."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        state = _CacheState(self.new_cache(), [])
        return self._run(list(messages), params or SamplingParams(**kw), state, cancel=cancel)

    def complete(self, messages: str | list[dict[str, Any]], on_chunk: Callable[[GenerationChunk], None] | None = None,
                 cancel: threading.Event | None = None, params: SamplingParams | None = None, **kw) -> Reply:
        """`generate` run to the end, each chunk handed to `on_chunk` as it comes (the callback style)."""
        return _drain(self.generate(messages, params, cancel, **kw), on_chunk)

    # -- prompt
    def _media(self, part: dict[str, Any]):
        """Turn an image/audio part into features once; cached in the part under `_features`."""
        from m3edge.frontends import audio_tokens, image_patches, load_audio, load_image

        if "_features" not in part:
            if part["type"] == "image":
                if self.cfg.vision_config is None:
                    raise MediaError("this model has no vision input, so it cannot take an image")
                pixels = load_image(part["image"])  # [H, W, 3]
                cap = self.limits.max_image_pixels
                if cap is not None and pixels.shape[0] * pixels.shape[1] > cap:
                    raise LimitError(f"the image has {pixels.shape[1]}x{pixels.shape[0]} pixels, more than the "
                                     f"limit of {cap}")
                patches, grid = image_patches(pixels)
                part["_features"] = Image(patches, grid)
            else:
                if self.cfg.audio_config is None:
                    raise MediaError("this model has no audio input, so it cannot take audio")
                wave = load_audio(part["audio"], part.get("sampling_rate"))  # [n] at 16 kHz
                cap = self.limits.max_audio_seconds
                if cap is not None and len(wave) > cap * 16000:
                    raise LimitError(f"the audio lasts {len(wave) / 16000:.1f} s, more than the limit of {cap:g} s")
                part["_features"] = audio_tokens(wave)
            part["_uid"] = next(_media_ids)
        return part["_features"], part["_uid"]

    def prepare(self, messages: list[dict[str, Any]]) -> tuple[Prompt, list]:
        """Render the chat template, expand media placeholders; returns the prompt and its cache keys."""
        rendered, images, audios, uids = [], [], [], {"image": [], "audio": []}
        for msg in messages:
            content = msg["content"]
            if isinstance(content, str):
                rendered.append({"role": msg["role"], "content": content})
                continue
            parts = []
            for part in content:
                if part.get("type") in ("image", "audio"):
                    feats, uid = self._media(part)
                    (images if part["type"] == "image" else audios).append(feats)
                    uids[part["type"]].append(uid)
                    parts.append({"type": part["type"]})
                elif part.get("type") == "text":
                    parts.append({"type": "text", "text": part["text"]})
                else:
                    raise M3Error(f"unknown message part type {part.get('type')!r} (text, image or audio)")
            if all(p["type"] == "text" for p in parts):  # text-only templates expect a string
                parts = "".join(p["text"] for p in parts)
            rendered.append({"role": msg["role"], "content": parts})
        text = self.tokenizer.apply_chat_template(rendered, add_generation_prompt=True)
        prompt = build_prompt(self.tokenizer.encode(text), self.cfg, images, audios)
        keys, runs = [], {"image": iter(uids["image"]), "audio": iter(uids["audio"])}
        cur: dict[str, tuple[int, int]] = {}
        for tok in prompt.input_ids.tolist():
            kind = "image" if tok == self.cfg.image_token_id else "audio" if tok == self.cfg.audio_token_id else None
            if kind is None:
                cur.clear()
                keys.append(tok)
                continue
            uid, row = cur.get(kind, (None, 0))
            if uid is None:
                uid, row = next(runs[kind]), 0
            keys.append((uid, row))
            cur[kind] = (uid, row + 1)
        return prompt, keys

    def fit(self, messages: list[dict[str, Any]], max_tokens: int) -> tuple[Prompt, list, list, str | None]:
        """Apply the overflow policy; returns (prompt, keys, messages kept, notice)."""
        prompt, keys = self.prepare(messages)
        need = len(prompt) + max_tokens
        if need <= self.max_context:
            return prompt, keys, messages, None
        if self.overflow == "error":
            raise ContextOverflowError(f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) needs "
                                       f"{need} tokens, more than the context of {self.max_context}")
        head = [m for m in messages[:1] if m["role"] == "system"]
        body = messages[len(head):]
        dropped = 0
        while len(body) > 1:
            body = body[1:]
            dropped += 1
            while len(body) > 1 and body[0]["role"] != "user":  # keep turns whole
                body, dropped = body[1:], dropped + 1
            prompt, keys = self.prepare(head + body)
            if len(prompt) + max_tokens <= self.max_context:
                return prompt, keys, head + body, (f"dropped the {dropped} oldest message(s) to fit the "
                                                   f"context of {self.max_context} tokens")
        raise ContextOverflowError(f"the last message alone ({len(prompt)} tokens) plus max_tokens ({max_tokens}) "
                                   f"does not fit the context of {self.max_context} tokens")

    # -- generation
    def _run(self, messages, params: SamplingParams, state: _CacheState,
             on_fit: Callable[[list], None] | None = None,
             cancel: threading.Event | None = None) -> Iterator[GenerationChunk]:
        params.validate()
        prompt, keys, kept, notice = self.fit(messages, params.max_tokens)
        if on_fit:
            on_fit(kept)
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        t0 = time.perf_counter()
        logits = self._prefill(prompt, keys, state)
        history = prompt.input_ids.tolist()
        out: list[int] = []  # generated ids (EOS excluded)
        pending: list[int] = []  # ids not yet reported in a chunk
        sent = ""  # text already streamed
        ttft = t_first = None
        while True:
            if len(self._placeholders):
                logits = logits.index_fill(-1, self._placeholders, float("-inf"))
            tok = sample(logits, params, history + out, gen)
            if ttft is None:
                t_first = time.perf_counter()
                ttft = t_first - t0
            finish = None
            if tok in self.eos_ids:
                finish = "eos"
            else:
                out.append(tok)
                pending.append(tok)
            full = self.tokenizer.decode(out)
            cut = _find_stop(full, params.stop)
            if cut is not None:
                full, finish = full[:cut], "stop"
            elif finish is None and (len(out) >= params.max_tokens or len(keys) + 1 >= self.max_context):
                finish = "length"
            elif finish is None and cancel is not None and cancel.is_set():
                finish = "cancelled"
            safe = full if finish else _hold_back(full, params.stop)
            if not finish and safe.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its bytes
                safe = safe.rstrip("\ufffd")
            if finish or len(safe) > len(sent):
                rate = (len(out) - 1) / (time.perf_counter() - t_first) if len(out) > 1 else 0.0
                yield GenerationChunk(safe[len(sent):], pending, len(out), len(prompt), rate, ttft, finish, notice)
                sent, pending, notice = safe, [], None
            if finish:
                return
            logits = self._call("forward", torch.tensor([[tok]]), self._decode_pos(state, keys), None,
                                None, state.cache)
            keys.append(tok)
            state.keys = list(keys)

    def _prefill(self, prompt: Prompt, keys: list, state: _CacheState) -> torch.Tensor:
        common = 0
        for a, b in zip(state.keys, keys):
            if a != b:
                break
            common += 1
        common = min(common, len(keys) - 1)  # at least one new token to get logits from
        if common < len(state.keys):
            if common == 0:
                state.cache = self.new_cache()
            else:
                seen = any(not isinstance(k, int) for k in keys[:common])
                self._call(state.cache.truncate, common, torch.tensor([seen]))
        ids = prompt.input_ids[common:]
        n_img = int((prompt.input_ids[:common] == self.cfg.image_token_id).sum()) if prompt.image_patches is not None else 0
        n_aud = int((prompt.input_ids[:common] == self.cfg.audio_token_id).sum()) if prompt.audio_features is not None else 0
        img = prompt.image_patches[n_img:] if prompt.image_patches is not None else None
        aud = prompt.audio_features[n_aud:] if prompt.audio_features is not None else None
        logits = self._call("forward", ids[None], prompt.position_ids[:, None, common:],
                            img if img is not None and len(img) else None,
                            aud if aud is not None and len(aud) else None, state.cache)
        state.keys = list(keys)
        return logits

    def _decode_pos(self, state: _CacheState, keys: list) -> torch.Tensor:
        """Position of the next decoded token: cache length + the sequence's M-RoPE delta."""
        delta = state.cache.rope_delta
        p = len(keys) + (int(delta[0]) if delta is not None else 0)
        return torch.full((3, 1, 1), p, dtype=torch.long)


def _drain(chunks: Iterator[GenerationChunk], on_chunk: Callable[[GenerationChunk], None] | None) -> Reply:
    text, last = [], None
    for last in chunks:
        text.append(last.text)
        if on_chunk:
            on_chunk(last)
    return Reply("".join(text), last.finish_reason, last.prompt_tokens, last.generated_tokens, last.tokens_per_s,
                 last.ttft_s)


def _find_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def _hold_back(text: str, stops: list[str]) -> str:
    """Drop a tail of `text` that could still grow into a stop string."""
    keep = len(text)
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                keep = min(keep, len(text) - n)
                break
    return text[:keep]


class ChatSession:
    """A conversation: history, chat template, and a KV cache reused across turns."""

    def __init__(self, engine: Engine, system: str | None = None):
        self.engine = engine
        self.system = system
        self._busy = threading.Lock()  # held while a turn generates
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": self.system}] if self.system else []
        self._state = _CacheState(self.engine.new_cache(), [])

    def send(self, content: str | list[dict[str, Any]], params: SamplingParams | None = None,
             cancel: threading.Event | None = None, **kw) -> Iterator[GenerationChunk]:
        """Add a user turn and stream the reply; the reply (or what was streamed of it) joins the history."""
        if not self._busy.acquire(blocking=False):
            raise M3Error("this chat session is already generating (one turn at a time per session)")
        msgs = self.messages + [{"role": "user", "content": content}]
        kept: list = []
        text = []
        try:
            for chunk in self.engine._run(msgs, params or SamplingParams(**kw), self._state, on_fit=kept.extend,
                                          cancel=cancel):
                text.append(chunk.text)
                yield chunk
        finally:  # also when the caller stops early (barge-in): the partial reply stays in the history
            if kept:
                self.messages = kept + [{"role": "assistant", "content": "".join(text)}]
            self._busy.release()

    def reply(self, content: str | list[dict[str, Any]], on_chunk: Callable[[GenerationChunk], None] | None = None,
              cancel: threading.Event | None = None, params: SamplingParams | None = None, **kw) -> Reply:
        """`send` run to the end, each chunk handed to `on_chunk` as it comes (the callback style)."""
        return _drain(self.send(content, params, cancel, **kw), on_chunk)


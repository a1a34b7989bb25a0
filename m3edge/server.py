"""`m3edge serve`: a local OpenAI-compatible HTTP API over one Engine (Python's http.server, no framework).

    GET  /health                  {"status": "ok", "model", "active", "queued"}
    GET  /v1/models               the one model
    POST /v1/chat/completions     OpenAI chat completions, streamed (SSE) or not; content parts
                                  "text", "image_url" (data: URLs only, nothing is fetched) and
                                  "input_audio" (base64 wav)
    GET  /, /<file>               the --static folder (the kiosk page), when given

Requests run on their own threads; at most `max_active` generate at once (they interleave token by
token on the engine, see engine.py), up to `max_queued` more wait for a slot, and beyond that the
answer is 503 at once. Errors are JSON in OpenAI's shape {"error": {"message", "type", "code"}}
with 400 (bad request), 401 (missing or wrong key), 404, 413 (body, image, audio or prompt over a
limit), 503 (queue full), 500 (a bug: its traceback goes to the server's stderr). Loopback by
default; any other address needs an API key. A client that goes away mid-stream cancels its
generation.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import json
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from m3edge.errors import M3Error, MediaError

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css",
                ".png": "image/png", ".svg": "image/svg+xml", ".ico": "image/x-icon"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.kind = status, message, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "code": self.code, "param": None}}


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    max_body_bytes: int = 32 * 2**20  # a request body (base64 media included)
    max_active: int = 4  # generations at once
    max_queued: int = 16  # requests waiting for a slot
    queue_timeout_s: float = 120.0
    max_tokens: int = 1024  # cap on a request's max_tokens
    static_dir: Path | None = None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_options(opt: ServeOptions) -> None:
    if not is_loopback(opt.host) and not opt.api_key:
        raise M3Error(f"serving on {opt.host} (beyond this machine) needs an API key: pass --api-key KEY "
                      "(clients then send 'Authorization: Bearer KEY')")
    if opt.static_dir is not None and not (Path(opt.static_dir) / "index.html").is_file():
        raise M3Error(f"--static {opt.static_dir} has no index.html")


# ------------------------------------------------------------------------------------- request parsing


def _b64(data: str, what: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise ApiError(400, f"{what} is not valid base64", "invalid_base64") from None


def _image(part: dict) -> dict:
    from PIL import Image, UnidentifiedImageError

    ref = part.get("image_url")
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str):
        raise ApiError(400, "an image_url part needs image_url.url", "invalid_image")
    if not url.startswith("data:"):
        raise ApiError(400, "image_url must be a data: URL (base64); m3edge fetches nothing from the network",
                       "remote_url_not_allowed")
    head, _, data = url.partition(",")
    if not head.startswith("data:image/") or not head.endswith(";base64"):
        raise ApiError(400, f"image_url must be data:image/...;base64, got '{head[:40]}'", "invalid_image")
    raw = _b64(data, "the image data")
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ApiError(400, f"the image cannot be decoded ({type(e).__name__})", "invalid_image") from None
    return {"type": "image", "image": img}


def _audio(part: dict) -> dict:
    import soundfile as sf

    a = part.get("input_audio")
    if not isinstance(a, dict) or not isinstance(a.get("data"), str):
        raise ApiError(400, "an input_audio part needs input_audio.data (base64)", "invalid_audio")
    if a.get("format", "wav") != "wav":
        raise ApiError(400, f"input_audio format '{a.get('format')}' is not supported (send wav)", "invalid_audio")
    raw = _b64(a["data"], "the audio data")
    try:
        wave, sr = sf.read(io.BytesIO(raw), dtype="float32", always_2d=False)
    except Exception as e:  # soundfile raises its own LibsndfileError / RuntimeError types
        raise ApiError(400, f"the audio is not a readable wav ({type(e).__name__})", "invalid_audio") from None
    return {"type": "audio", "audio": wave, "sampling_rate": sr}


def parse_messages(body: dict) -> list[dict[str, Any]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list", "invalid_messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] needs a role of system, user or assistant", "invalid_messages")
        role = "system" if m["role"] == "developer" else m["role"]
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of parts", "invalid_messages")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                parts.append(_image(part))
            elif kind == "input_audio":
                parts.append(_audio(part))
            else:
                raise ApiError(400, f"messages[{i}] has a part of type {kind!r} (text, image_url, input_audio)",
                               "invalid_messages")
        out.append({"role": role, "content": parts})
    return out


def parse_params(body: dict, opt: ServeOptions):
    from m3edge.runtime.sampling import SamplingParams

    if body.get("n", 1) != 1:
        raise ApiError(400, "n must be 1", "invalid_n")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    try:
        p = SamplingParams(max_tokens=int(body.get("max_completion_tokens") or body.get("max_tokens") or 256),
                           temperature=float(body.get("temperature", 1.0)), top_p=float(body.get("top_p", 1.0)),
                           top_k=int(body.get("top_k", 0)), seed=body.get("seed"),
                           repetition_penalty=float(body.get("repetition_penalty", 1.0)), stop=list(stop))
        p.validate()
    except (TypeError, ValueError, M3Error) as e:
        raise ApiError(400, f"bad sampling parameter: {e}", "invalid_parameter") from None
    if p.max_tokens > opt.max_tokens:
        raise ApiError(400, f"max_tokens {p.max_tokens} is over this server's cap of {opt.max_tokens}",
                       "invalid_parameter")
    return p


# ------------------------------------------------------------------------------------- the server


class Server:
    """The engine, the options and the admission queue, shared by the handler threads."""

    def __init__(self, engine, opt: ServeOptions, model_name: str):
        check_options(opt)
        self.engine, self.opt, self.model_name = engine, opt, model_name
        self.slots = threading.Semaphore(opt.max_active)
        self.lock = threading.Lock()
        self.active = self.queued = 0
        self.httpd = ThreadingHTTPServer((opt.host, opt.port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.app = self

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def admit(self) -> None:
        with self.lock:
            if self.queued >= self.opt.max_queued:
                raise ApiError(503, f"the server is busy ({self.active} generating, {self.queued} waiting)",
                               "server_busy", "server_error")
            self.queued += 1
        ok = self.slots.acquire(timeout=self.opt.queue_timeout_s)
        with self.lock:
            self.queued -= 1
            self.active += ok
        if not ok:
            raise ApiError(503, f"no generation slot came free in {self.opt.queue_timeout_s:g} s", "server_busy",
                           "server_error")

    def release(self) -> None:
        with self.lock:
            self.active -= 1
        self.slots.release()

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "m3edge"

    def log_message(self, fmt, *args) -> None:  # quiet by default; errors are answered as JSON
        pass

    @property
    def app(self) -> Server:
        return self.server.app

    # -- plumbing
    def _send(self, status: int, obj: Any = None, ctype: str = "application/json", raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: ApiError) -> None:
        self._send(e.status, e.body())

    def _auth(self) -> None:
        key = self.app.opt.api_key
        if key and self.headers.get("Authorization", "") != f"Bearer {key}":
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", "invalid_api_key",
                           "authentication_error")

    def _body(self) -> dict:
        n, cap = int(self.headers.get("Content-Length") or 0), self.app.opt.max_body_bytes
        if n > cap:
            left = n if n <= 8 * cap else 0  # read and drop it, so that the client gets to read our answer
            while left > 0 and (chunk := self.rfile.read(min(2**16, left))):
                left -= len(chunk)
            self.close_connection = n > 8 * cap  # an absurd size: answer and hang up
            raise ApiError(413, f"the request body has {n} bytes, over the limit of {cap}", "request_too_large")
        try:
            body = json.loads(self.rfile.read(n) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not JSON", "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", "invalid_json")
        return body

    # -- routes
    def do_GET(self) -> None:
        try:
            path = self.path.split("?")[0]
            if path == "/health":
                a = self.app
                return self._send(200, {"status": "ok", "model": a.model_name, "active": a.active, "queued": a.queued})
            if path == "/v1/models":
                self._auth()
                return self._send(200, {"object": "list", "data": [{"id": self.app.model_name, "object": "model",
                                                                    "created": 0, "owned_by": "m3edge"}]})
            return self._static(path)
        except ApiError as e:
            self._error(e)

    def _static(self, path: str) -> None:
        root = self.app.opt.static_dir
        if root is None:
            raise ApiError(404, f"no route {path}", "not_found")
        root = Path(root).resolve()
        f = (root / (path.lstrip("/") or "index.html")).resolve()
        if root not in f.parents or not f.is_file() or f.suffix not in STATIC_TYPES:
            raise ApiError(404, f"no file {path}", "not_found")
        self._send(200, ctype=STATIC_TYPES[f.suffix], raw=f.read_bytes())

    def do_POST(self) -> None:
        try:
            if self.path.split("?")[0] != "/v1/chat/completions":
                raise ApiError(404, f"no route {self.path}", "not_found")
            self._auth()
            body = self._body()
            messages, params = parse_messages(body), parse_params(body, self.app.opt)
            self.app.admit()
        except ApiError as e:
            return self._error(e)
        self._answering = False
        try:
            self._complete(body, messages, params)
        except Exception:  # a bug, not the client's: logged with its traceback, answered 500 if still possible
            import traceback

            traceback.print_exc()
            if not self._answering:
                self._error(ApiError(500, "internal error (see the server's log)", "internal_error", "server_error"))
            self.close_connection = True
        finally:
            self.app.release()

    def _complete(self, body: dict, messages: list, params) -> None:
        from m3edge.runtime.engine import ContextOverflowError, LimitError

        app, cancel = self.app, threading.Event()
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        stream = bool(body.get("stream"))
        chunks = app.engine.generate(messages, params, cancel=cancel)
        try:
            first = next(chunks)  # prompt errors surface here, before any byte of the answer
        except (LimitError, ContextOverflowError) as e:
            return self._error(ApiError(413, str(e), "context_length_exceeded" if isinstance(e, ContextOverflowError)
                                        else "media_too_large"))
        except MediaError as e:
            return self._error(ApiError(400, str(e), "invalid_media"))
        except M3Error as e:
            return self._error(ApiError(400, str(e), "invalid_request"))
        base = {"id": rid, "created": created, "model": app.model_name}
        if not stream:
            text, last = [first.text], first
            for last in chunks:
                text.append(last.text)
            self._answering = True  # from here on, a failure cannot change the status line
            return self._send(200, {**base, "object": "chat.completion", "choices": [{
                "index": 0, "message": {"role": "assistant", "content": "".join(text)},
                "finish_reason": FINISH[last.finish_reason]}], "usage": _usage(last)})
        self._answering = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream ends when the connection does
        self.end_headers()
        self.close_connection = True

        def event(delta: dict, finish: str | None, usage: dict | None = None) -> None:
            obj = {**base, "object": "chat.completion.chunk",
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if usage is not None:
                obj["usage"] = usage
            self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            self.wfile.flush()

        try:
            event({"role": "assistant", "content": ""}, None)
            c = first
            while True:
                if c.text:
                    event({"content": c.text}, None)
                if c.finish_reason:
                    event({}, FINISH[c.finish_reason], _usage(c))
                    break
                c = next(chunks)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the client left: stop generating for it
            cancel.set()
        finally:
            chunks.close()


def _usage(c) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.generated_tokens,
            "total_tokens": c.prompt_tokens + c.generated_tokens}


def serve(engine, opt: ServeOptions, model_name: str, ready=None) -> None:
    """Run until interrupted (Ctrl-C), then close the engine."""
    app = Server(engine, opt, model_name)
    if ready:
        ready(app)
    try:
        app.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        app.httpd.server_close()
        engine.close()

"""`m3edge serve` and the embedding API: the official openai client against the server (tiny M3-Lite
with an image and an audio part, SmolLM2 with text), the kiosk page in headless Chromium with fake
media devices, limits, auth and the queue, and the Python API's concurrency, cancellation and close."""

import base64
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from m3edge import Engine, Limits, M3Error
from m3edge.server import ServeOptions, Server

BIN = str(Path(sys.executable).parent / "m3edge")
KIOSK = Path(__file__).parent.parent / "examples" / "kiosk"


def png_url(w: int = 64, h: int = 48) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(w * h).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def wav_b64(seconds: float = 1.0, sr: int = 16000) -> str:
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(np.arange(int(seconds * sr)) * 0.05)).astype(np.float32), sr, format="WAV")
    return base64.b64encode(buf.getvalue()).decode()


def media_message(text: str = "What is this?", seconds: float = 1.0, image: str | None = None) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "text", "text": text},
        {"type": "image_url", "image_url": {"url": image or png_url()}},
        {"type": "input_audio", "input_audio": {"data": wav_b64(seconds), "format": "wav"}}]}]


class CliServer:
    """`m3edge serve ... --port 0` in a child process; the port is read from its first line."""

    def __init__(self, *args: str, env: dict | None = None):
        self.p = subprocess.Popen([BIN, "serve", *args, "--port", "0"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        line = self.p.stdout.readline()
        m = re.search(r"http://[\d.]+:(\d+)", line)
        assert m, line + self.p.stderr.read()
        self.url = f"http://127.0.0.1:{m[1]}"

    def stop(self) -> None:
        self.p.terminate()
        self.p.wait(10)


@pytest.fixture(scope="module")
def tiny_cli(tiny_dir):
    s = CliServer(str(tiny_dir), "--backend", "torch", "--static", str(KIOSK))
    yield s
    s.stop()


# ------------------------------------------------------------------------------------ the openai client


def test_openai_client_streams_image_and_audio(tiny_cli):
    from openai import OpenAI

    client = OpenAI(base_url=tiny_cli.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["tiny"]
    msgs = media_message()
    stream = client.chat.completions.create(model="tiny", messages=msgs, stream=True, max_tokens=12, temperature=0)
    events = [(c.choices[0].delta.content, c.choices[0].finish_reason) for c in stream]
    assert events[0] == ("", None) and events[-1] == (None, "length")
    streamed = "".join(t for t, _ in events if t)
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
    assert full.choices[0].message.content == streamed and streamed  # greedy: the same text both ways
    # the image (64x48 -> 2x2 patches of 32) and ~1 s of audio became placeholder tokens of the prompt
    text_only = client.chat.completions.create(model="tiny", max_tokens=1, temperature=0,
                                               messages=[{"role": "user", "content": "What is this?"}])
    assert full.usage.prompt_tokens - text_only.usage.prompt_tokens > 4 + 2
    assert full.usage.completion_tokens == 12


def test_openai_client_smollm2_text(smol_carried, tmp_path):
    from openai import OpenAI

    s = CliServer(str(smol_carried), env={"M3EDGE_HOME": str(tmp_path / "home")})  # auto: ONNX Runtime on the CPU
    try:
        client = OpenAI(base_url=s.url + "/v1", api_key="unused")
        stream = client.chat.completions.create(model="x", stream=True, max_tokens=20, temperature=0,
                                                messages=[{"role": "user", "content": "What is the capital of France?"}])
        text = "".join(c.choices[0].delta.content or "" for c in stream)
        assert "Paris" in text, text
        health = json.loads(urllib.request.urlopen(s.url + "/health").read())
        assert health["status"] == "ok" and health["model"] == smol_carried.name
    finally:
        s.stop()


# ------------------------------------------------------------------------------------ the kiosk page


def _y4m(path: Path, w: int = 64, h: int = 48, frames: int = 20) -> None:
    """A tiny raw video (Chromium's fake camera reads y4m): grey frames growing brighter."""
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F10:1 Ip A1:1 C420jpeg\n".encode())
        for i in range(frames):
            luma, chroma = np.full(w * h, 40 + 5 * i, np.uint8), np.full(w * h // 2, 128, np.uint8)
            f.write(b"FRAME\n" + luma.tobytes() + chroma.tobytes())


def test_kiosk_page_in_headless_chromium(tiny_cli, tmp_path):
    """Chromium with fake media devices (a wav as the mic, a y4m video as the camera) clicks through one
    turn of examples/kiosk: records, sends image + audio + question, shows the streamed answer."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _y4m(tmp_path / "clip.y4m")
    sf.write(tmp_path / "speech.wav", (0.3 * np.sin(np.arange(48000) * 0.05)).astype(np.float32), 16000)
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--disable-background-networking", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
              f"--use-file-for-fake-audio-capture={tmp_path / 'speech.wav'}",
              f"--use-file-for-fake-video-capture={tmp_path / 'clip.y4m'}"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        driver.get(tiny_cli.url + "/?max_tokens=8")
        wait = WebDriverWait(driver, 60)
        status = lambda: driver.find_element(By.ID, "status").text  # noqa: E731
        wait.until(lambda _: status() == "ready")
        driver.find_element(By.ID, "talk").click()
        time.sleep(1.5)
        driver.find_element(By.ID, "talk").click()
        wait.until(lambda _: status() == "done" or status().startswith("error"))
        assert status() == "done"
        sent = driver.find_element(By.ID, "sent").text
        m = re.fullmatch(r"sent: image 64x48, audio ([\d.]+) s", sent)
        assert m and float(m[1]) > 0.5, sent
        assert driver.find_element(By.ID, "answer").text.strip()
    finally:
        driver.quit()


# ------------------------------------------------------------------------------------ limits and auth


@pytest.fixture(scope="module")
def engine(tiny_dir):
    e = Engine.load(tiny_dir, backend="torch", overflow="error", max_context=400,
                    limits=Limits(max_image_pixels=128 * 128, max_audio_seconds=2.0))
    yield e
    e.close()


def _start(engine, **kw) -> Server:
    app = Server(engine, ServeOptions(port=0, **kw), "tiny")
    threading.Thread(target=app.serve_forever, daemon=True).start()
    return app


def _post(app: Server, body, headers: dict | None = None, raw: bytes | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{app.port}/v1/chat/completions",
                                 data=raw if raw is not None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_limits_and_bad_input_answer_json_errors(engine):
    app = _start(engine, max_body_bytes=2 * 2**20)
    try:
        def check(body, status, code, **kw):
            got, err = _post(app, body, **kw)
            assert got == status, (got, err)
            assert set(err) == {"error"} and err["error"]["code"] == code and err["error"]["message"], err

        ok = {"messages": media_message(), "max_tokens": 2}
        assert _post(app, ok)[0] == 200
        check({"messages": media_message(image=png_url(200, 100)), "max_tokens": 2}, 413, "media_too_large")
        check({"messages": media_message(seconds=3.0), "max_tokens": 2}, 413, "media_too_large")
        check({"messages": [{"role": "user", "content": "word " * 500}], "max_tokens": 2}, 413,
              "context_length_exceeded")
        check(None, 413, "request_too_large", raw=b"{" + b" " * (3 * 2**20) + b"}")
        bad64 = media_message()
        bad64[0]["content"][2]["input_audio"]["data"] = "not base64!!"
        check({"messages": bad64}, 400, "invalid_base64")
        remote = media_message(image="https://example.com/cat.png")
        check({"messages": remote}, 400, "remote_url_not_allowed")
        check({"messages": []}, 400, "invalid_messages")
        check({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, 400, "invalid_messages")
        check({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "invalid_parameter")
        check(None, 400, "invalid_json", raw=b"{not json")
        notpng = media_message(image="data:image/png;base64," + base64.b64encode(b"hello").decode())
        check({"messages": notpng}, 400, "invalid_image")
        assert _post(app, ok)[0] == 200  # still serving
    finally:
        app.shutdown()


def test_api_key_and_off_loopback(engine):
    app = _start(engine, api_key="sekret")
    try:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        status, err = _post(app, body)
        assert status == 401 and err["error"]["code"] == "invalid_api_key"
        assert _post(app, body, {"Authorization": "Bearer wrong"})[0] == 401
        assert _post(app, body, {"Authorization": "Bearer sekret"})[0] == 200
        health = urllib.request.urlopen(f"http://127.0.0.1:{app.port}/health")
        assert health.status == 200  # a liveness probe needs no key
    finally:
        app.shutdown()
    with pytest.raises(M3Error, match="serving on 0.0.0.0 .* needs an API key"):
        Server(engine, ServeOptions(host="0.0.0.0", port=0), "tiny")
    app = _start(engine, host="0.0.0.0", api_key="sekret")  # off loopback, with a key: requests need it
    try:
        status, err = _post(app, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert status == 401 and err["error"]["type"] == "authentication_error"
    finally:
        app.shutdown()
    r = subprocess.run([BIN, "serve", "--host", "0.0.0.0"], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "needs an API key" in r.stderr


def test_queue_full_is_503_and_requests_queue(engine, monkeypatch):
    """max_active 1, max_queued 1: a second request waits for the first; a third is turned away."""
    forward = engine.backend.forward

    def slow(*a):  # a slower model: 20 ms per step, so requests overlap
        time.sleep(0.02)
        return forward(*a)

    monkeypatch.setattr(engine.backend, "forward", slow)
    app = _start(engine, max_active=1, max_queued=1)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 60, "temperature": 0}
    results = []
    try:
        threads = [threading.Thread(target=lambda: results.append(_post(app, body)[0])) for _ in range(2)]
        for t in threads:
            t.start()
            time.sleep(0.3)
        deadline = time.time() + 10
        while app.queued < 1 and time.time() < deadline:
            time.sleep(0.02)
        status, err = _post(app, body)
        assert status == 503 and err["error"]["code"] == "server_busy"
        for t in threads:
            t.join(60)
        assert results == [200, 200]
    finally:
        app.shutdown()


def test_client_leaving_mid_stream_cancels(engine, monkeypatch):
    forward, calls = engine.backend.forward, []

    def slow(*a):
        calls.append(1)
        time.sleep(0.02)
        return forward(*a)

    monkeypatch.setattr(engine.backend, "forward", slow)
    app = _start(engine)
    try:
        import http.client

        c = http.client.HTTPConnection("127.0.0.1", app.port)
        c.request("POST", "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                                              "max_tokens": 300, "temperature": 0, "stream": True}))
        r = c.getresponse()
        assert r.status == 200 and r.getheader("Content-Type") == "text/event-stream"
        assert r.readline().startswith(b"data: ")
        r.close()  # leave (the response holds the socket too)
        c.close()
        deadline = time.time() + 20
        while app.active and time.time() < deadline:
            time.sleep(0.05)
        assert app.active == 0
        assert len(calls) < 40, len(calls)  # stopped a few tokens after the client left (alone: 80, then EOS)
    finally:
        app.shutdown()


# ------------------------------------------------------------------------------------ the Python API


def test_api_threads_sessions_callbacks_cancel(engine):
    """Sessions on several threads at once give what each gives alone; a callback sees every chunk;
    cancel stops a generation; one session cannot run two turns at once."""
    prompts = ["hello", "tell me a story", "what is 2 + 2", "good morning"]
    alone = [engine.complete(p, max_tokens=16, temperature=0).text for p in prompts]
    together = [None] * len(prompts)

    def run(i):
        together[i] = engine.chat().reply(prompts[i], max_tokens=16, temperature=0).text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together == alone

    seen = []
    reply = engine.chat().reply("hello", on_chunk=seen.append, max_tokens=8, temperature=0)
    assert "".join(c.text for c in seen) == reply.text and seen[-1].finish_reason == reply.finish_reason == "length"

    cancel = threading.Event()
    chunks = []
    for c in engine.generate("hello", cancel=cancel, max_tokens=300, temperature=0):
        chunks.append(c)
        if len(chunks) == 3:
            cancel.set()
    assert chunks[-1].finish_reason == "cancelled" and chunks[-1].generated_tokens < 10

    chat = engine.chat()
    it = chat.send("hello", max_tokens=4)
    next(it)
    with pytest.raises(M3Error, match="already generating"):
        next(chat.send("again"))
    it.close()
    assert chat.reply("again", max_tokens=2).generated_tokens >= 1  # free again


def test_close_frees_the_engine(tiny_dir):
    with Engine.load(tiny_dir, backend="torch") as e:
        chat = e.chat()
        assert chat.reply("hi", max_tokens=2).text is not None
    with pytest.raises(M3Error, match="closed"):
        chat.reply("hi", max_tokens=2)
    assert e.backend is None


def test_media_placeholders_are_never_sampled(engine, monkeypatch):
    """A placeholder token needs feature rows; one the model samples has none (found by bench/soak.py:
    the decode step then failed). Here the audio placeholder always has the largest logit."""
    forward, aud = engine.backend.forward, engine.cfg.audio_token_id

    def favour_placeholder(*a):
        logits = forward(*a).clone()
        logits[..., aud] = logits.max() + 10
        return logits

    monkeypatch.setattr(engine.backend, "forward", favour_placeholder)
    chunks = list(engine.generate("hi", max_tokens=8, temperature=0))
    ids = [t for c in chunks for t in c.token_ids]
    assert len(ids) == 8 and aud not in ids and engine.cfg.image_token_id not in ids

"""Soak `m3edge serve`: many mixed requests at a fixed concurrency; errors, latency and the server's RSS.

Starts `m3edge serve MODEL --port 0` as a child (default: a tiny random M3-Lite made here), then
sends N requests from C client threads over HTTP: text, text + image, text + audio, text + image +
audio, each streamed (SSE) or not, with max_tokens 4..24, 1 in 20 carrying a deliberate mistake
(bad base64, which must come back as a 400 JSON error). The server's resident memory (VmRSS from
/proc) is sampled after the warm-up requests and at the end; growth after warm-up is the leak
signal. One table at the end.

    python bench/soak.py [--model DIR] [--requests 1000] [--concurrency 4] [--warmup 100]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def media() -> tuple[str, str]:
    import soundfile as sf
    from PIL import Image

    rng = np.random.default_rng(0)
    png = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(png, "PNG")
    wav = io.BytesIO()
    sf.write(wav, (0.3 * np.sin(np.arange(16000) * 0.05)).astype(np.float32), 16000, format="WAV")
    return ("data:image/png;base64," + base64.b64encode(png.getvalue()).decode(),
            base64.b64encode(wav.getvalue()).decode())


def request_body(i: int, image: str, audio: str) -> tuple[dict, int]:
    """The i-th request and the status it must get."""
    r = random.Random(i)
    kind = i % 4
    parts = [{"type": "text", "text": r.choice(["What is this?", "Describe it.", "hello", "Say something."])}]
    if kind in (1, 3):
        parts.append({"type": "image_url", "image_url": {"url": image}})
    if kind in (2, 3):
        parts.append({"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}})
    want = 200
    if i % 20 == 19:  # a client mistake: must be a 400 with a JSON error, and must not hurt the server
        parts.append({"type": "input_audio", "input_audio": {"data": "%%% not base64", "format": "wav"}})
        want = 400
    return {"messages": [{"role": "user", "content": parts}], "max_tokens": r.randint(4, 24),
            "temperature": r.choice([0.0, 0.7]), "seed": i, "stream": bool(r.getrandbits(1))}, want


def one(port: int, body: dict) -> tuple[int, float]:
    t0 = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        c.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read()
        if r.status == 200 and body["stream"]:
            assert data.rstrip().endswith(b"data: [DONE]"), data[-200:]
        else:
            json.loads(data)  # every answer, error or not, is JSON
        return r.status, time.perf_counter() - t0
    finally:
        c.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="checkpoint to serve (default: a tiny random M3-Lite made here)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=100)
    a = ap.parse_args()
    bin_ = str(Path(sys.executable).parent / "m3edge")
    tmp = Path(tempfile.mkdtemp(prefix="m3edge-soak-"))
    model = a.model
    if model is None:
        model = tmp / "tiny"
        subprocess.run([bin_, "synth", "--preset", "tiny", "--out", str(model)], check=True, capture_output=True)
    srv = subprocess.Popen([bin_, "serve", str(model), "--port", "0", "--backend", a.backend,
                            "--max-active", str(a.concurrency)], stdout=subprocess.PIPE, text=True,
                           env={**os.environ, "M3EDGE_HOME": str(tmp / "home")})
    line = srv.stdout.readline()
    port = int(re.search(r":(\d+)/v1", line)[1])
    image, audio = media()
    statuses: dict[int, int] = {}
    wrong, latencies = [], []
    lock, next_i = threading.Lock(), iter(range(a.requests))
    rss = {"start": rss_mb(srv.pid)}

    def client() -> None:
        while True:
            with lock:
                i = next(next_i, None)
            if i is None:
                return
            body, want = request_body(i, image, audio)
            try:
                status, dt = one(port, body)
            except Exception as e:  # noqa: BLE001 - any client-side failure counts as an error
                status, dt = -1, 0.0
                print(f"request {i}: {type(e).__name__}: {e}", file=sys.stderr)
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                if status != want:
                    wrong.append((i, status, want))
                if want == 200:
                    latencies.append(dt)
                if i == a.warmup:
                    rss["after warm-up"] = rss_mb(srv.pid)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(a.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    rss["end"] = rss_mb(srv.pid)
    srv.terminate()
    srv.wait(10)
    lat = np.array(latencies) * 1e3
    growth = 100 * (rss["end"] / rss["after warm-up"] - 1)
    print(f"\nm3edge serve {model.name}, {a.requests} requests at concurrency {a.concurrency} "
          f"({wall:.0f} s, {a.requests / wall:.1f} req/s); {os.cpu_count()} cores\n")
    print("| requests | wrong status | statuses | latency p50 / p95 / max ms | RSS start / after warm-up / end MiB "
          "| RSS growth after warm-up |\n|---|---|---|---|---|---|")
    print(f"| {a.requests} | {len(wrong)} | {dict(sorted(statuses.items()))} | {np.percentile(lat, 50):.0f} / "
          f"{np.percentile(lat, 95):.0f} / {lat.max():.0f} | {rss['start']:.0f} / {rss['after warm-up']:.0f} / "
          f"{rss['end']:.0f} | {growth:+.1f}% |")
    if wrong:
        print(f"\nwrong statuses (request, got, wanted), first 10: {wrong[:10]}")


if __name__ == "__main__":
    main()

"""The real `m3edge` entry point: user mistakes print one sentence and exit non-zero, no traceback."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

M3EDGE = [str(Path(sys.executable).parent / "m3edge")]


def m3edge(*args, env=None, timeout=120):
    e = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run(M3EDGE + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=e)


def assert_one_sentence(r, needle):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]


def test_help_on_every_command():
    for cmd in ["synth", "import", "info", "generate", "chat"]:
        r = m3edge(cmd, "--help")
        assert r.returncode == 0 and "Example:" in r.stdout, cmd


def test_synth_info_generate(tmp_path):
    out = tmp_path / "tiny"
    r = m3edge("synth", "--preset", "tiny", "--out", out)
    assert r.returncode == 0 and (out / "model.safetensors").exists()
    r = m3edge("info", out)
    assert r.returncode == 0 and "0.54 M total" in r.stdout and "int4 g128" in r.stdout
    r = m3edge("generate", out, "-p", "Four score", "--max-tokens", "5")
    assert r.returncode == 0 and "5 tokens" in r.stderr
    assert_one_sentence(m3edge("synth", "--out", out), "already exists")
    assert_one_sentence(m3edge("synth", "--preset", "huge", "--out", tmp_path / "x"), "unknown preset 'huge'")


def test_lite_synth_with_cut_depth(tmp_path):
    """Full-width lite-16g at 1 layer: the spec's shapes, written shard by shard."""
    out = tmp_path / "lite"
    r = m3edge("synth", "--preset", "lite-16g", "--layers", "1", "--out", out, timeout=600)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hidden_size"] == 4096 and cfg["num_experts"] == 32 and cfg["num_hidden_layers"] == 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "model.layers.0.mlp.experts.31.down_proj.weight" in index["weight_map"]
    r = m3edge("info", out)
    assert r.returncode == 0 and "32 routed (4 fusion), top-8" in r.stdout


def test_user_mistakes(tiny_dir, tmp_path):
    """Each mistake: one sentence, no traceback. The commands run two at a time (each is a fresh
    process that imports torch)."""
    from concurrent.futures import ThreadPoolExecutor

    import gguf
    import soundfile as sf
    from safetensors import safe_open
    from safetensors.torch import save_file

    cases = [(("generate", tmp_path / "nope", "-p", "hi"), "does not exist")]
    (tmp_path / "empty").mkdir()
    cases.append((("info", tmp_path / "empty"), "is not a checkpoint directory"))
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    cases.append((("generate", tiny_dir, "-p", "hi", "--image", bad), "bad.png"))
    silent = tmp_path / "empty.wav"
    sf.write(silent, np.zeros(0, np.float32), 16000)
    cases.append((("generate", tiny_dir, "-p", "hi", "--audio", silent), "empty"))
    cfg_dir = tmp_path / "negative"
    shutil.copytree(tiny_dir, cfg_dir)
    cfg = json.loads((cfg_dir / "config.json").read_text())
    cfg["hidden_size"] = -64
    (cfg_dir / "config.json").write_text(json.dumps(cfg))
    cases.append((("info", cfg_dir), "hidden_size must be a positive integer"))
    trunc = tmp_path / "trunc"
    shutil.copytree(tiny_dir, trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[:5000])
    cases.append((("generate", trunc, "-p", "hi"), "model.safetensors is truncated"))
    for what, edit, needle in (
        ("missing", lambda t: t.pop("model.norm.weight"), "missing tensor 'model.norm.weight'"),
        ("shape", lambda t: t.update({"model.norm.weight": t["model.norm.weight"][:10]}),
         "'model.norm.weight' in model.safetensors has shape [10]"),
    ):
        d = tmp_path / what
        shutil.copytree(tiny_dir, d)
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}
        edit(t)
        save_file(t, str(d / "model.safetensors"))
        cases.append((("generate", d, "-p", "hi"), needle))
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_text("hello")
    cases.append((("import", not_gguf, "--out", tmp_path / "o"), "x.gguf"))
    cases.append((("generate", tiny_dir, "-p", "hi", "--top-p", "0"), "top_p"))
    other = tmp_path / "qwen.gguf"
    w = gguf.GGUFWriter(str(other), "qwen2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cases.append((("import", other, "--out", tmp_path / "o2"), "'qwen2'"))
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda c: m3edge(*c[0]), cases))
    for (args, needle), r in zip(cases, results):
        assert_one_sentence(r, needle)


def test_image_part_to_text_only_model(tmp_path, novision_dir):
    """An image for a model without vision: one sentence; the chat goes on with text."""
    d = novision_dir
    img = tmp_path / "red.png"
    from PIL import Image

    Image.new("RGB", (64, 64), "red").save(img)
    assert_one_sentence(m3edge("generate", d, "-p", "hi", "--image", img), "no vision input")
    r = subprocess.run(M3EDGE + ["chat", str(d), "--max-tokens", "4"], capture_output=True, text=True,
                       input=f"/image {img}\nwhat is it?\nhello\n/quit\n", timeout=120)
    assert r.returncode == 0 and "no vision input" in r.stderr and "4 tokens" in r.stderr

"""`m3edge quantize`: interoperable output, expert coverage, crash safety and resume, streaming memory,
and the errors a user can cause."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from m3edge.model.checkpoint import TensorFiles, load_model, read_config
from m3edge.model.packing import QuantTargets, dequantize_linear
from m3edge.model.synth import preset_config, write_random
from m3edge.quantize.pipeline import Options, quantize_checkpoint
from m3edge.model.scheme import Scheme

M3EDGE = str(Path(sys.executable).parent / "m3edge")


def run_cli(*args, **kw):
    return subprocess.run([M3EDGE, *map(str, args)], capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def gptq_tiny(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "tiny-gptq"
    path, reports = quantize_checkpoint(tiny_dir, out, Options(scheme=Scheme(4, 32, False), method="gptq"))
    return path, reports


def test_compressed_tensors_decompresses_to_our_weights(gptq_tiny, tmp_path):
    """The compressed-tensors library itself turns our checkpoint into dense weights equal to ours."""
    from compressed_tensors.entrypoints.convert import CompressedTensorsDequantizer, convert_checkpoint

    path, _ = gptq_tiny
    dense = tmp_path / "dense"
    convert_checkpoint(str(path), str(dense), CompressedTensorsDequantizer(str(path), dtype=torch.bfloat16))
    theirs = {}
    for f in dense.glob("*.safetensors"):
        with safe_open(str(f), "pt") as g:
            theirs.update({k: g.get_tensor(k) for k in g.keys()})
    cfg = read_config(path)
    targets = QuantTargets.from_config(cfg.quantization_config)
    files = TensorFiles(path)
    checked = 0
    for name in files.names():
        if not name.endswith(".weight_packed"):
            continue
        module = name.removesuffix(".weight_packed")
        parts = {k: files.get(f"{module}.{k}") for k in ("weight_packed", "weight_scale", "weight_shape",
                                                         "weight_zero_point") if f"{module}.{k}" in files}
        ours = dequantize_linear(parts, targets.scheme_for(module))
        assert torch.equal(theirs[f"{module}.weight"].to(torch.bfloat16), ours.to(torch.bfloat16)), module
        checked += 1
    assert checked == 2 * (4 + 3 * 8 + 3) + 1  # attention, experts, shared expert per layer, and lm_head


def test_quantized_model_runs_and_is_close(gptq_tiny, tiny_dir):
    path, reports = gptq_tiny
    ref, q = load_model(tiny_dir), load_model(path, dtype=torch.float32)
    ids = torch.arange(1, 60)[None]
    a, b = ref(ids), q(ids)
    assert (a - b).abs().max() < 0.25 * a.abs().max()
    manifest = json.loads((path / "manifest.json").read_text())
    assert all(len(v["sha256"]) == 64 for v in manifest["files"].values())
    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized" and any("mlp\\.(gate|image_gate|audio_gate)" in i for i in cfg["ignore"])
    with safe_open(str(next(path.glob("model-00001-*.safetensors"))), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert f.get_tensor("lm_head.weight_packed").dtype == torch.int32


def test_awq_scaling_keeps_the_model(tiny_dir, tmp_path):
    """AWQ's input-channel scaling (up rows -> down columns, v rows -> o columns) moves magnitude
    between two matrices; at int8 the model must still be the float one, and both scalings must
    have happened (v's stored row scales differ from the unscaled run's by powers of two). Some v
    rows are made 16x larger so that o's inputs have outlier channels worth scaling."""
    import shutil

    d = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, d)
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    for k in t:
        if k.endswith("v_proj.weight"):
            t[k][:8] *= 16
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    ids = torch.arange(1, 60)[None]
    with torch.no_grad():
        a = load_model(d)(ids)
    scales, err = {}, {}
    for on in (False, True):
        out = tmp_path / f"awq-{on}"
        quantize_checkpoint(d, out, Options(scheme=Scheme(8, 32, True), method="awq", awq_scale=on))
        with torch.no_grad():
            err[on] = float((a - load_model(out, dtype=torch.float32)(ids)).abs().max() / a.abs().max())
        f = TensorFiles(out)
        scales[on] = [f.get(f"model.layers.0.{m}.weight_scale").float() for m in ("self_attn.v_proj", "mlp.shared_experts.up_proj")]
    assert err[False] < 0.05 and err[True] < 1.5 * err[False], err  # a wrong fold costs O(1)
    v_ratio = scales[False][0] / scales[True][0]
    assert not torch.equal(v_ratio, torch.ones_like(v_ratio))
    assert torch.equal(v_ratio.log2(), v_ratio.log2().round())
    assert not torch.equal(scales[False][1], scales[True][1])


def test_every_expert_count_is_reported(gptq_tiny):
    _, reports = gptq_tiny
    for r in reports:
        assert set(r.expert_tokens) == {"text", "image", "audio"}
        assert all(len(c) == 8 for c in r.expert_tokens.values())
        assert sum(r.expert_tokens["image"]) > 0 and sum(r.expert_tokens["audio"]) > 0
        # fusion experts (6, 7) get tokens: image/audio and the text after them
        assert all(r.expert_tokens["text"][e] + r.expert_tokens["image"][e] > 0 for e in (6, 7))


def test_unreachable_expert_is_reported_and_falls_back_to_rtn(tiny_dir, tmp_path):
    """Routers whose rows come in (+v, -v) pairs always score two experts >= 0; expert 3's zero row
    therefore never makes the top 2."""
    d = tmp_path / "ckpt"
    import shutil

    shutil.copytree(tiny_dir, d)
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    g = torch.Generator().manual_seed(5)
    for k in list(t):
        if k.endswith(("mlp.gate.weight", "mlp.image_gate.weight", "mlp.audio_gate.weight")):
            v, u = torch.randn(2, 64, generator=g)
            w = torch.randn(8, 64, generator=g)
            w[0], w[1], w[2], w[4], w[3] = v, -v, u, -u, 0
            t[k] = w
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "q"
    r = run_cli("quantize", d, "--out", out, "--method", "gptq", "--group", "32")
    assert r.returncode == 0, r.stderr
    assert "layer 0: 3" in r.stdout and "layer 1: 3" in r.stdout and "RTN" in r.stdout
    report = json.loads((out / "quantization_report.json").read_text())
    for layer in report["layers"]:
        assert layer["rtn_fallback"] == [3]
        assert all(c[3] == 0 for c in layer["expert_tokens"].values())
    # the fallback expert's weights are exactly RTN's
    from m3edge.quantize.gptq import rtn_quantize

    files = TensorFiles(out)
    parts = {k: files.get(f"model.layers.0.mlp.experts.3.up_proj.{k}") for k in ("weight_packed", "weight_scale",
                                                                                   "weight_shape", "weight_zero_point")}
    q, s, z = rtn_quantize(t["model.layers.0.mlp.experts.3.up_proj.weight"].float(), Scheme(4, 32, False))
    from m3edge.model.scheme import dequantize

    assert torch.equal(dequantize_linear(parts, Scheme(4, 32, False)), dequantize(q, s, z))


def test_tuned_scales_change_only_scales_and_lower_the_kl(tiny_dir, tmp_path):
    """--tune-scales: the file differs from the untuned one in decoder weight_scale tensors only, and
    the written checkpoint (bf16 scales as stored) is closer to the float model on the held-out
    calibration prompts (image, audio and text) than the untuned one, by the KL computed here."""
    from m3edge.model.tokenizer import Tokenizer
    from m3edge.quantize.calib import build_calibration
    from m3edge.quantize.tune import HOLD_OUT, _held_out_kl

    opt = dict(scheme=Scheme(4, 32, False), method="rtn", calib_tokens=3000)
    plain, _ = quantize_checkpoint(tiny_dir, tmp_path / "rtn", Options(**opt))
    tuned, _ = quantize_checkpoint(tiny_dir, tmp_path / "tuned", Options(**opt, tune_epochs=2))
    a, b = TensorFiles(plain), TensorFiles(tuned)
    assert a.names() == b.names()
    changed = [n for n in a.names() if not torch.equal(a.get(n), b.get(n))]
    assert changed and all(n.startswith("model.layers.") and n.endswith("_proj.weight_scale") for n in changed)
    assert len(changed) > 0.9 * sum(1 for n in a.names() if n.startswith("model.layers.") and n.endswith("_proj.weight_scale"))

    t = json.loads((tuned / "quantization_report.json").read_text())["tune_scales"]
    assert t["held_out_kl_after"] < 0.9 * t["held_out_kl_before"] and t["kept_step"] > 0
    cfg = read_config(tiny_dir)
    held = build_calibration(cfg, Tokenizer.from_dir(tiny_dir), max_tokens=3000)[::HOLD_OUT]
    assert any(p.image_patches is not None for p in held) and any(p.audio_features is not None for p in held)
    ref = load_model(tiny_dir, dtype=torch.float32)
    kl_plain = _held_out_kl(load_model(plain, dtype=torch.float32), ref, held)
    kl_tuned = _held_out_kl(load_model(tuned, dtype=torch.float32), ref, held)
    assert kl_tuned < 0.9 * kl_plain, (kl_tuned, kl_plain)
    assert abs(kl_tuned - t["held_out_kl_after"]) < 0.05 * kl_tuned  # the report's number is the file's


def medium_config(layers: int, hidden: int = 256, inter: int = 512, experts: int = 8) -> dict:
    raw = preset_config("tiny")
    raw.update(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
               head_dim=hidden // 4, moe_intermediate_size=inter, shared_expert_intermediate_size=inter,
               num_experts=experts, num_fusion_experts=2, num_experts_per_tok=2,
               rope_scaling={"rope_type": "default", "mrope_section": [hidden // 8 - 2 * (hidden // 32),
                                                                        hidden // 32, hidden // 32],
                             "mrope_interleaved": True})  # head_dim / 2 = hidden / 8 frequency slots
    return raw


def assert_same_files(ref: Path, dst: Path) -> None:
    for f in sorted(p.name for p in ref.iterdir()):
        if f in ("quantization_report.json", "manifest.json"):  # timings differ
            continue
        assert (dst / f).read_bytes() == (ref / f).read_bytes(), f


def test_sigkill_leaves_nothing_and_resume_is_bit_identical(tmp_path):
    src = write_random(medium_config(4), tmp_path / "src")
    args = ["quantize", src, "--method", "gptq", "--group", "64", "--calib-tokens", "3000"]
    ref = run_cli(*args, "--out", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    dst = tmp_path / "dst"
    proc = subprocess.Popen([M3EDGE, *map(str, args), "--out", str(dst)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = tmp_path / ".dst.partial" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if json.loads(state.read_text())["done_layers"] >= 2:
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not dst.exists(), "a killed run left something at DST"
    done = json.loads(state.read_text())["done_layers"]
    assert 2 <= done < 4
    r = run_cli(*args, "--out", dst, "--resume")
    assert r.returncode == 0, r.stderr
    assert_same_files(tmp_path / "ref", dst)
    assert not (tmp_path / ".dst.partial").exists()


def test_sigkill_while_tuning_leaves_nothing_and_resume_is_bit_identical(tmp_path):
    """Killed during --tune-scales (after every layer is done): DST absent; --resume re-tunes from the
    untuned shards the work directory kept and writes the same bytes as an uninterrupted run."""
    src = write_random(medium_config(2), tmp_path / "src")
    args = ["quantize", src, "--group", "64", "--calib-tokens", "3000", "--tune-scales", "1"]
    ref = run_cli(*args, "--out", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    dst = tmp_path / "dst"
    proc = subprocess.Popen([M3EDGE, *map(str, args), "--out", str(dst)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    tuning = tmp_path / ".dst.assemble" / "config.json"  # written just before tuning starts
    deadline = time.time() + 300
    while time.time() < deadline and not tuning.exists() and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(0.5)  # into the tuning (it loads two models first)
    assert proc.poll() is None, "the run ended before it could be killed while tuning"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not dst.exists(), "a killed run left something at DST"
    assert json.loads((tmp_path / ".dst.partial" / "state.json").read_text())["done_layers"] == 2
    r = run_cli(*args, "--out", dst, "--resume")
    assert r.returncode == 0, r.stderr
    assert_same_files(tmp_path / "ref", dst)
    assert not (tmp_path / ".dst.partial").exists() and not (tmp_path / ".dst.assemble").exists()


def test_user_mistakes(tiny_dir, tmp_path):
    def one_sentence(r, needle):
        assert r.returncode != 0 and "Traceback" not in r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and needle in lines[0], r.stderr

    one_sentence(run_cli("quantize", tiny_dir, "--out", tmp_path / "a", "--method", "magic"), "unknown method 'magic'")
    one_sentence(run_cli("quantize", tiny_dir, "--out", tmp_path / "a", "--group", "64"),
                 "--group 64 does not divide the 32 inputs")
    (tmp_path / "exists").mkdir()
    one_sentence(run_cli("quantize", tiny_dir, "--out", tmp_path / "exists", "--group", "32"), "already exists")
    bad = tmp_path / "notes.pdf"
    bad.write_bytes(b"%PDF-1.4")
    one_sentence(run_cli("quantize", tiny_dir, "--out", tmp_path / "b", "--group", "32", "--method", "gptq",
                         "--calib", bad), "is not text")
    one_sentence(run_cli("quantize", tiny_dir, "--out", tmp_path / "c", "--group", "32", "--resume"),
                 "nothing to resume")
    one_sentence(run_cli("quantize", tiny_dir, "--out", tmp_path / "c", "--group", "32", "--tune-scales", "-1"),
                 "--tune-scales takes a number of epochs >= 0")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_peak_rss_is_about_one_layer(tmp_path):
    """Weights >= 4 x (one layer + 1 GB) on disk; the quantizer's peak RSS stays below one layer + 1 GB."""
    raw = medium_config(1, hidden=1024, inter=2048, experts=8)
    raw["vocab_size"] = 2048
    from m3edge.model.m3lite import M3Config, expected_tensors

    shapes = expected_tensors(M3Config.from_dict(raw))
    per_layer = sum(np.prod(s) * 4 for n, s in shapes.items() if n.startswith("model.layers.0."))  # fp32 bytes
    layers = int(np.ceil(4 * (per_layer + 2**30) / per_layer))
    raw["num_hidden_layers"] = layers
    # the weights' values do not matter here, only their bytes: one random block of 64 MiB, repeated
    # (drawing 4 GiB of normals took twice as long as writing them)
    block = torch.randn(2**24, generator=torch.Generator().manual_seed(0)) * 0.02

    def tiled(name, shape, dtype, gen):
        n = int(np.prod(shape))
        flat = block[:n].clone() if n <= block.numel() else block.repeat(-(-n // block.numel()))[:n]
        return flat.view(shape).to(dtype)

    src = write_random(raw, tmp_path / "src", shard_bytes=512 * 2**20, tensor=tiled)
    on_disk = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    assert on_disk >= 4 * (per_layer + 2**30)
    out = tmp_path / "q"
    probe = (f"import resource, subprocess, sys; r = subprocess.run({[M3EDGE, 'quantize', str(src), '--out', str(out)]!r});"
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    peak = int(r.stdout.strip().splitlines()[-1]) * 1024
    assert peak < per_layer + 2**30, f"peak RSS {peak / 2**30:.2f} GiB for a {per_layer / 2**30:.2f} GiB layer"
    assert (out / "manifest.json").exists()

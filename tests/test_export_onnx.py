"""ONNX export and the ONNX Runtime backend, against the torch reference on the same weights.

Parity is checked at MatMulNBits accuracy level 0 (fp32 compute, so ORT and torch see the same
dequantized weights and differ only by summation order); level 4 (int8 activations, the shipped
default) is checked by greedy agreement on SmolLM2 and by perplexity in bench/cpu.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from m3edge.errors import CheckpointError, M3Error
from m3edge.export.matmulnbits import concat_rows, dequantize_nbits, quantize_rows, relayout
from m3edge.export.onnx import ExportOptions, embed_block, export_onnx
from m3edge.model.checkpoint import load_model
from m3edge.model.m3lite import KVCache
from m3edge.model.packing import pack_linear
from m3edge.model.scheme import Scheme, dequantize, quantize, scale_zero
from m3edge.runtime.ort import OrtDecoder

BIN = str(Path(sys.executable).parent / "m3edge")


# ------------------------------------------------------------------------------------ re-layout


def _reference_blob(q: np.ndarray, bits: int, block: int, pad_u: int) -> np.ndarray:
    """MatMulNBits' B written the obvious way: per row, per block, per byte."""
    n, k = q.shape
    nb = -(-k // block)
    per_byte = 8 // bits
    out = np.zeros((n, nb, block // per_byte), np.uint8)
    for r in range(n):
        for j in range(nb * block):
            u = int(q[r, j]) + (1 << (bits - 1)) if j < k else pad_u
            byte, slot = divmod(j % block, per_byte)
            out[r, j // block, byte] |= u << (slot * bits)
    return out


@pytest.mark.parametrize("bits,group,sym,k", [(4, 32, True, 64), (4, 128, False, 576), (4, -1, True, 96),
                                              (8, 64, True, 128), (8, 128, False, 576), (4, 64, False, 192)])
def test_relayout_is_bit_exact(bits, group, sym, k):
    torch.manual_seed(bits * 1000 + k)
    s = Scheme(bits, group, sym)
    w = torch.randn(24, k)
    scale, zero = scale_zero(w, s)
    scale = scale.to(torch.bfloat16).float()  # as stored
    q = quantize(w, scale, zero, s)
    nb = relayout(q.numpy(), scale.numpy(), None if zero is None else zero.numpy(), s)
    g = s.group_size(k)
    ref = dequantize(q, scale, zero, g).numpy()
    assert np.array_equal(dequantize_nbits(nb), ref)  # the same weights, bit for bit
    if zero is None:
        assert np.array_equal(nb.B, _reference_blob(q.numpy(), bits, nb.block, 1 << (bits - 1)))
    if bits == 4 and k % nb.block == 0:  # 4-bit: B is exactly the bytes of compressed-tensors' weight_packed
        packed = pack_linear(q, scale, zero, s, torch.bfloat16)["weight_packed"]
        assert np.array_equal(nb.B.reshape(len(q), -1), packed.numpy().view(np.uint8))
    both = concat_rows([nb, nb])
    assert np.array_equal(dequantize_nbits(both), np.concatenate([ref, ref]))


@pytest.mark.parametrize("scale_dtype", [np.float16, np.float32])
def test_relayout_float_minimum_is_bit_exact(scale_dtype):
    """GGUF Q4_1 (fp16 d, m) and Q4_K (fp32 d*sc, dmin*m) grids: w = u * scale + min re-laid as an
    integer zero point near -min/scale plus a residual; the weights stay bit-identical, the zero
    points centre the MatMulNBits part (|residual| <= scale / 2 where the block spans 0)."""
    rng = np.random.default_rng(3)
    s = Scheme(4, 32, False, float_min=True)
    n, k = 40, 128
    u = rng.integers(0, 16, (n, k))
    scale = rng.uniform(1e-3, 2e-2, (n, 4))
    minimum = -scale * rng.uniform(0, 15, (n, 4))  # blocks that span 0, as Q4_1 makes them
    minimum[0] = rng.uniform(0.01, 0.1, 4)  # a block of positive weights only
    minimum[1] = -scale[1] * 40  # and one far below
    scale[2, 0] = 0  # an all-equal block (d = 0, as llama.cpp writes it)
    if scale_dtype == np.float32:  # Q4_K: 11-bit d times 6-bit integers
        scale = (scale.astype(np.float16).astype(np.float32) * rng.integers(1, 64, (n, 4))).astype(np.float32) / 64
        minimum = minimum.astype(np.float16).astype(np.float32) * 3
    scale, minimum = scale.astype(scale_dtype).astype(np.float32), minimum.astype(scale_dtype).astype(np.float32)
    q = torch.from_numpy(u - 8).to(torch.int8)
    zero = torch.full((n, 4), -8, dtype=torch.int32)
    ref = dequantize(q, torch.from_numpy(scale), zero, 32, torch.from_numpy(minimum)).numpy()
    nb = relayout(q.numpy(), scale, zero.numpy(), s, minimum)
    assert np.array_equal(dequantize_nbits(nb), ref)  # bit for bit
    assert np.array_equal(dequantize_nbits(concat_rows([nb, nb])), np.concatenate([ref, ref]))
    spans = (scale > 0) & (minimum <= 0) & (minimum + 15 * scale >= 0)
    assert (np.abs(nb.mins)[spans] <= scale[spans] / 2 * (1 + 1e-6)).all()
    assert nb.mins[2, 0] == minimum[2, 0]  # d = 0: zero point 0, the minimum is the whole weight


@pytest.mark.parametrize("bits,block", [(8, 64), (4, 32)])
def test_embedding_table_grid(bits, block):
    w = np.random.default_rng(0).standard_normal((50, 576)).astype(np.float32)
    nb = quantize_rows(w, bits, embed_block(576, bits))
    assert nb.block == block and nb.bits == bits
    d = np.repeat(nb.scales, block, axis=1)
    q = np.clip(np.rint(w / d), -(1 << (bits - 1)), (1 << (bits - 1)) - 1)  # nearest point of each block's grid
    assert np.array_equal(dequantize_nbits(nb), (q * d).astype(np.float32))
    blocks = w.reshape(50, -1, block)
    peak = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)
    deq = np.take_along_axis(dequantize_nbits(nb).reshape(50, -1, block), np.abs(blocks).argmax(-1)[..., None], -1)
    np.testing.assert_allclose(deq, peak, rtol=1e-6)  # each block's largest value is exact (Q8_0 / Q4_0 rule)


# ------------------------------------------------------------------------------------ tiny M3-Lite parity


@pytest.fixture(scope="module")
def tiny_q(tiny_dir, tmp_path_factory):
    from m3edge.quantize.pipeline import Options, quantize_checkpoint

    out = tmp_path_factory.mktemp("q") / "tiny-int4"
    quantize_checkpoint(tiny_dir, out, Options(scheme=Scheme(4, 32, False)))
    return out


def _mm_prompt(cfg):
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (1, 20))
    ids[0, 3:7] = cfg.image_token_id  # a 2x2 image
    ids[0, 10:13] = cfg.audio_token_id
    pos = torch.arange(20).expand(3, 1, 20).clone()
    pos[1, 0, 3:7] = torch.tensor([3, 3, 4, 4])
    pos[2, 0, 3:7] = torch.tensor([3, 4, 3, 4])
    pos[:, 0, 7:] -= 2  # the image advances positions by max(gh, gw) = 2, not 4
    return ids, pos, torch.randn(4, 3072), torch.randn(3, 1024)


def _assert_prefill_parity(qdir, out):
    """Every logit of the image+audio prompt: ORT (level 0) vs the reference, within 2e-5."""
    ref = load_model(qdir, dtype=torch.float32)
    ids, pos, img, aud = _mm_prompt(ref.cfg)
    with torch.no_grad():
        r = ref(ids, pos, img, aud)[0]
    dec = OrtDecoder(out)
    g = dec.step(ids[0].numpy(), pos[:, 0].numpy(), dec.new_cache(), img.numpy(), aud.numpy(), num_logits=20)
    np.testing.assert_allclose(g, r.numpy(), atol=2e-5, rtol=0)


def test_tiny_m3lite_parity_image_audio(tiny_q, tmp_path):
    """Prefill logits at every position and 64 greedy steps: ORT (level 0, exact embedding) vs the
    torch reference on the dequantized checkpoint; MoE with per-modality routers and the fusion rule."""
    out = export_onnx(tiny_q, tmp_path / "onnx", ExportOptions(accuracy_level=0, embed_bits=16))
    onnx.checker.check_model(str(out / "model.onnx"))
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert {"MatMulNBits", "GroupQueryAttention", "NonZero", "ScatterND", "TopK"} <= ops
    ref = load_model(tiny_q, dtype=torch.float32)
    dec = OrtDecoder(out)
    ids, pos, img, aud = _mm_prompt(ref.cfg)
    cache, oc = KVCache(ref.cfg.num_hidden_layers), dec.new_cache()
    with torch.no_grad():
        r = ref(ids, pos, img, aud, cache=cache)[0]
    g = dec.step(ids[0].numpy(), pos[:, 0].numpy(), oc, img.numpy(), aud.numpy(), num_logits=ids.shape[1])
    np.testing.assert_allclose(g, r.numpy(), atol=2e-5, rtol=0)
    assert oc.seen_nontext and int(oc.rope_delta[0]) == int(cache.rope_delta[0]) == -2
    a, b = [int(r[-1].argmax())], [int(g[-1].argmax())]
    for _ in range(64):
        p = torch.full((3, 1, 1), cache.length + int(cache.rope_delta[0]))
        with torch.no_grad():
            r = ref(torch.tensor([[a[-1]]]), p, cache=cache)[0, -1]
        g = dec.step(np.array([b[-1]]), p[:, 0].numpy(), oc)
        assert np.abs(g - r.numpy()).max() < 2e-5
        a.append(int(r.argmax()))
        b.append(int(g.argmax()))
    assert a == b


def test_moe_runs_only_selected_experts(tiny_q, tmp_path):
    """The routed experts' MatMulNBits see exactly the rows routed to them (zero rows for the others)."""
    out = export_onnx(tiny_q, tmp_path / "onnx", ExportOptions(accuracy_level=0, embed_bits=16))
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    expert_in = {n.name: n.input[0] for n in m.graph.node
                 if n.op_type == "MatMulNBits" and n.input[1].startswith("model.layers.0.mlp.experts.")
                 and "gate_proj" in n.input[1]}
    assert len(expert_in) == 8
    from onnx import TensorProto, helper

    for name in expert_in.values():
        m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    onnx.save(m, str(out / "probe.onnx"))
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out / "probe.onnx"))
    ref = load_model(tiny_q, dtype=torch.float32)
    ref.layers[0].mlp.routing_log = []
    ids = torch.randint(0, 1000, (1, 9))
    with torch.no_grad():
        ref(ids)
    chosen = ref.layers[0].mlp.routing_log[0][0][0]  # [S, k]
    dec = OrtDecoder(out)
    feeds = {"input_ids": ids.numpy(), "inputs_embeds": dec.embed(ids[0].numpy()), "rope_pos": np.arange(9)[None], "seqlens_k": np.array([8], np.int32),
             "total_seq_len": np.array(9, np.int32), "nontext_seen": np.array([False]), "num_logits": np.array([1]),
             "image_patches": np.zeros((0, 3072), np.float32), "audio_features": np.zeros((0, 1024), np.float32)}
    feeds["cos"], feeds["sin"] = dec.rope(np.tile(np.arange(9), (3, 1)))
    for i in range(2):
        for kv in ("key", "value"):
            feeds[f"past_{kv}.{i}"] = np.zeros((1, 2, 16, 16), np.float32)
    rows = sess.run(list(expert_in.values()), feeds)
    counts = [len(r) for r in rows]
    want = [int((chosen == e).any(-1).sum()) for e in range(8)]
    assert sorted(counts) == sorted(want) and sum(counts) == 9 * 2
    assert counts[-2:] == [0, 0]  # fusion experts stay closed on a text-only prompt


def test_engine_on_ort_matches_torch(tiny_q, tmp_path):
    """Two chat turns (prefix reuse, M-RoPE delta after an image) through the engine: same tokens."""
    from m3edge.model.tokenizer import Tokenizer
    from m3edge.runtime.backends import TorchBackend
    from m3edge.runtime.engine import Engine

    out = export_onnx(tiny_q, tmp_path / "onnx", ExportOptions(accuracy_level=0, embed_bits=16))
    img = (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)
    replies = {}
    engines = {"torch": Engine(TorchBackend(tiny_q, dtype=torch.float32), Tokenizer.from_dir(tiny_q), tiny_q),
               "ort": Engine.load(out)}  # auto: an ONNX export runs on ort
    for backend, eng in engines.items():
        assert eng.backend.name == backend
        chat = eng.chat()
        turn1 = "".join(c.text for c in chat.send([{"type": "image", "image": img}, {"type": "text", "text": "hi"}],
                                                  max_tokens=12, temperature=0))
        turn2 = "".join(c.text for c in chat.send("and then?", max_tokens=12, temperature=0))
        replies[backend] = (turn1, turn2)
    assert replies["torch"] == replies["ort"]


def test_auto_backend_picks_ort_for_quantized_on_cpu(tiny_q, tiny_dir, tmp_path, monkeypatch):
    from m3edge.export.onnx import ensure_onnx
    from m3edge.runtime.backends import make_backend, resolve_backend, wants_ort

    monkeypatch.setenv("M3EDGE_HOME", str(tmp_path / "home"))
    assert not torch.cuda.is_available()
    assert wants_ort(tiny_q) and not wants_ort(tiny_dir)
    assert resolve_backend("auto", tiny_q) == "torch"  # not exported yet: the library never runs the exporter
    with pytest.raises(M3Error, match="has no ONNX export yet: run `m3edge export"):
        resolve_backend("ort", tiny_q)
    out = ensure_onnx(tiny_q)  # what `m3edge chat` does first
    assert out.parent == tmp_path / "home" / "onnx" and ensure_onnx(tiny_q) == out
    assert resolve_backend("auto", tiny_q) == "ort" and make_backend("auto", tiny_q).name == "ort"
    assert resolve_backend("auto", tiny_dir) == "torch"
    with pytest.raises(M3Error, match="not quantized"):
        resolve_backend("ort", tiny_dir)


# ------------------------------------------------------------------------------------ SmolLM2 int4


@pytest.fixture(scope="module")
def smol_q(smol_dir, tmp_path_factory):
    from m3edge.quantize.pipeline import Options, quantize_checkpoint

    out = tmp_path_factory.mktemp("q") / "smol-int4"
    quantize_checkpoint(smol_dir, out, Options(scheme=Scheme(4, 64, True)))
    return out


def _greedy_pair(qdir, out, embed_bits, prompt, steps=64):
    from m3edge.model.tokenizer import Tokenizer

    ref = load_model(qdir, dtype=torch.float32)
    if embed_bits == 8:  # the reference gets the exported int8 table (and so does its tied lm_head)
        with torch.no_grad():
            t = ref.embed_tokens.weight
            t.copy_(torch.from_numpy(dequantize_nbits(quantize_rows(t.numpy(), 8, embed_block(t.shape[1])))))
    dec = OrtDecoder(out)
    tok = Tokenizer.from_dir(qdir)
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True))
    cache, oc = KVCache(ref.cfg.num_hidden_layers), dec.new_cache()
    with torch.no_grad():
        r = ref(torch.tensor([ids]), cache=cache)[0]
    g = dec.step(np.array(ids), np.tile(np.arange(len(ids)), (3, 1)), oc, num_logits=len(ids))
    errs = [np.abs(g - r.numpy()).max() / r.std().item()]
    a, b = [int(r[-1].argmax())], [int(g[-1].argmax())]
    for i in range(steps):
        with torch.no_grad():
            r = ref(torch.tensor([[a[-1]]]), cache=cache)[0, -1]
        g = dec.step(np.array([a[-1]]), np.full((3, 1), len(ids) + i), oc)  # teacher-forced on the reference
        errs.append(np.abs(g - r.numpy()).max() / r.std().item())
        a.append(int(r.argmax()))
        b.append(int(g.argmax()))
    return a, b, max(errs)


def test_smollm2_int4_parity_level0(smol_q, tmp_path):
    out = export_onnx(smol_q, tmp_path / "onnx", ExportOptions(accuracy_level=0, embed_bits=8))
    a, b, err = _greedy_pair(smol_q, out, 8, "Write a short story about a lighthouse keeper.")
    assert err < 1e-4, err  # max |logit error| / logit std
    assert a == b


def test_smollm2_int4_greedy_level4_and_cli(smol_q, tmp_path):
    """The shipped setting (int8 activations): `m3edge export` then greedy tokens vs the reference."""
    out = tmp_path / "onnx"
    r = subprocess.run([BIN, "export", str(smol_q), "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    man = json.loads((out / "export_manifest.json").read_text())
    assert man["accuracy_level"] == 4 and man["tensors"]["lm_head"]["carried"].startswith("tied")
    carried = [v for k, v in man["tensors"].items() if ".layers." in k]
    assert len(carried) == 30 * 7 and all(v["carried"] == "exact" and v["bits"] == 4 for v in carried)
    a, b, err = _greedy_pair(smol_q, out, 8, "What is the capital of France?", steps=32)
    assert a == b, (a, b)
    # int8 activations move logits by up to ~0.5 sigma (measured 0.56 here; fp32 compute: < 1e-4)
    assert err < 0.75, err


def test_mixed_gguf_export_parity(mixed_gguf, tmp_path):
    """A GGUF with Q4_0 / Q4_1 / Q4_K / Q8_0 carried and Q5_0 / Q6_K re-quantized, its Q8_0 embedding
    table carried into embed_tokens.bin: ORT (level 0) vs the torch reference, prefill and decode."""
    from m3edge.model.importers.gguf import import_gguf

    q = import_gguf(mixed_gguf, tmp_path / "q")
    out = export_onnx(q, tmp_path / "onnx", ExportOptions(accuracy_level=0))
    man = json.loads((out / "export_manifest.json").read_text())
    assert man["embedding"]["bits"] == 8 and man["embedding"]["block"] == 32
    assert man["tensors"]["model.layers.0.self_attn.k_proj"]["float_min"]
    ref = load_model(q, dtype=torch.float32)
    dec = OrtDecoder(out)
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    cache, oc = KVCache(ref.cfg.num_hidden_layers), dec.new_cache()
    with torch.no_grad():
        r = ref(ids, cache=cache)[0]
    g = dec.step(ids[0].numpy(), np.tile(np.arange(24), (3, 1)), oc, num_logits=24)
    np.testing.assert_allclose(g, r.numpy(), atol=2e-5 * float(r.abs().max()), rtol=0)
    for i, t in enumerate([5, 900, 40000]):
        with torch.no_grad():
            r = ref(torch.tensor([[t]]), cache=cache)[0]
        g = dec.step(np.array([t]), np.full((3, 1), 24 + i), oc)
        np.testing.assert_allclose(g, r.numpy(), atol=2e-5 * float(r.abs().max()), rtol=0)


def test_smollm2_carried_q4_1_greedy_level4(smol_carried, tmp_path):
    """The default model as `make demo` runs it: the GGUF's own Q4_1 / Q8_0 blocks, exported at the
    shipped setting (int8 activations), greedy tokens vs the torch reference on the file's weights."""
    out = tmp_path / "onnx"
    r = subprocess.run([BIN, "export", str(smol_carried), "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    man = json.loads((out / "export_manifest.json").read_text())
    assert man["embedding"]["block"] == 32 and man["tensors"]["lm_head"]["carried"] == "tied: the int8 embedding table"
    layers = [v for k, v in man["tensors"].items() if ".layers." in k]
    assert len(layers) == 210 and all(v["float_min"] and v["carried"].startswith("exact") for v in layers)
    a, b, err = _greedy_pair(smol_carried, out, 16, "What is the capital of France?", steps=32)
    assert a == b, (a, b)
    assert err < 0.75, err


# ------------------------------------------------------------------------------------ bad input


def test_export_refuses_unquantized_and_corrupt(tiny_dir, tiny_q, tmp_path):
    with pytest.raises(M3Error, match="is not quantized; run `m3edge quantize"):
        export_onnx(tiny_dir, tmp_path / "x")
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_q, bad)
    st = next(bad.glob("*.safetensors"))
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(CheckpointError):
        export_onnx(bad, tmp_path / "y")
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob(".y.*"))  # nothing half-written
    r = subprocess.run([BIN, "export", str(tiny_dir), "--out", str(tmp_path / "z")], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {tiny_dir} is not quantized; run `m3edge quantize {tiny_dir} "
                                             "--out QDIR` and export QDIR (the ONNX path runs int4/int8 weights only)"]


def test_missing_external_data_at_load(tiny_q, tmp_path):
    out = export_onnx(tiny_q, tmp_path / "onnx")
    (out / "model.onnx.data").rename(tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match=r"^model.onnx.data is missing from .*: the export is incomplete"):
        OrtDecoder(out)
    r = subprocess.run([BIN, "generate", str(out), "-p", "hi"], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "model.onnx.data is missing" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "elsewhere").write_bytes(b"\0" * 10)
    (tmp_path / "elsewhere").rename(out / "model.onnx.data")
    with pytest.raises(CheckpointError, match="truncated or from another export"):
        OrtDecoder(out)


def test_perplexity_through_ort_equals_reference(tiny_q, tmp_path):
    from m3edge.eval import perplexity, text_ids
    from m3edge.model.tokenizer import Tokenizer

    out = export_onnx(tiny_q, tmp_path / "onnx", ExportOptions(accuracy_level=0, embed_bits=16))
    tok = Tokenizer.from_dir(tiny_q)
    ids = text_ids(tok, Path(__file__).parent.parent / "m3edge" / "data" / "gettysburg.txt")
    ref = perplexity(load_model(tiny_q, dtype=torch.float32), tok, ids, window=64)
    got = perplexity(OrtDecoder(out), tok, ids, window=64)
    assert got.windows == ref.windows >= 2
    assert abs(got.ppl / ref.ppl - 1) < 1e-5, (got.ppl, ref.ppl)


def test_export_from_another_version_is_refused_and_redone(tiny_q, tmp_path, monkeypatch):
    from m3edge.export.onnx import ensure_onnx

    monkeypatch.setenv("M3EDGE_HOME", str(tmp_path / "home"))
    out = ensure_onnx(tiny_q)
    man = json.loads((out / "export_manifest.json").read_text())
    (out / "export_manifest.json").write_text(json.dumps({**man, "format": "m3edge-onnx/0"}))
    with pytest.raises(CheckpointError, match="export the quantized model again"):
        OrtDecoder(out)
    assert ensure_onnx(tiny_q) == out  # the cached export is made again
    OrtDecoder(out)


def test_chunked_prefill_equals_one_run(tiny_q, tmp_path, monkeypatch):
    """A long prompt runs in chunks (media rows split at the chunk edges): same logits, same cache."""
    import m3edge.runtime.ort as ort_mod

    out = export_onnx(tiny_q, tmp_path / "onnx", ExportOptions(accuracy_level=0, embed_bits=16))
    dec = OrtDecoder(out)
    ids, pos, img, aud = _mm_prompt(load_model(tiny_q, dtype=torch.float32).cfg)
    args = (ids[0].numpy(), pos[:, 0].numpy())
    whole = dec.new_cache()
    ref = dec.step(*args, whole, img.numpy(), aud.numpy(), num_logits=20).copy()
    ref_next = dec.step(np.array([7]), np.full((3, 1), 18), whole).copy()
    monkeypatch.setattr(ort_mod, "PREFILL_CHUNK", 5)  # the image (3..6) and audio (10..12) cross chunk edges
    for n in (20, 7, 1):
        c = dec.new_cache()
        got = dec.step(*args, c, img.numpy(), aud.numpy(), num_logits=n)
        assert got.shape == (n, 1024)
        np.testing.assert_allclose(got, ref[20 - n:], atol=1e-5)
        assert c.length == 20 and c.seen_nontext and int(c.rope_delta[0]) == -2
    np.testing.assert_allclose(dec.step(np.array([7]), np.full((3, 1), 18), c), ref_next, atol=1e-5)


def test_int8_per_channel_parity(tiny_dir, tmp_path):
    """W8A16 per output channel (group -1 -> 128-wide MatMulNBits blocks sharing the row's scale)."""
    from m3edge.quantize.pipeline import Options, quantize_checkpoint

    q = quantize_checkpoint(tiny_dir, tmp_path / "int8", Options(scheme=Scheme(8, -1, True)))[0]
    out = export_onnx(q, tmp_path / "onnx", ExportOptions(accuracy_level=0, embed_bits=16))
    man = json.loads((out / "export_manifest.json").read_text())
    assert {(v["bits"], v["block"]) for k, v in man["tensors"].items() if ".layers." in k} == {(8, 128)}
    _assert_prefill_parity(q, out)


def test_cli_backend_ort_on_a_quantized_checkpoint(tiny_q, tmp_path):
    env = {**os.environ, "M3EDGE_HOME": str(tmp_path / "home")}
    args = [BIN, "generate", str(tiny_q), "-p", "hello", "--max-tokens", "8", "--temperature", "0"]
    outs = {}
    for backend in ("ort", "auto"):
        r = subprocess.run(args + ["--backend", backend], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        outs[backend] = r.stdout
    assert outs["ort"] == outs["auto"] and outs["ort"].strip()
    assert len(list((tmp_path / "home" / "onnx").iterdir())) == 1  # exported once, then reused


def test_ort_core_runs_without_torch(tiny_q, tmp_path):
    """A kiosk process that runs only the ONNX path never loads torch (its memory is the point)."""
    out = export_onnx(tiny_q, tmp_path / "onnx")
    code = ("import sys, numpy as np\n"
            "from m3edge.runtime.ort import OrtDecoder\n"
            f"d = OrtDecoder({str(out)!r}); c = d.new_cache()\n"
            "l = d.step(np.array([5, 6, 7]), np.tile(np.arange(3), (3, 1)), c)\n"
            "l = d.step(np.array([int(l.argmax())]), np.full((3, 1), 3), c)\n"
            "assert l.shape == (1, 1024) and c.length == 4\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_linear_kept_in_float_exports_exactly(tiny_dir, tmp_path):
    """`m3edge quantize --exclude` keeps a linear in bf16: the export runs it as an fp32 MatMul."""
    from m3edge.quantize.pipeline import Options, quantize_checkpoint

    q = quantize_checkpoint(tiny_dir, tmp_path / "q", Options(scheme=Scheme(4, 32, True),
                                                              exclude=[r"model\.layers\.1\.self_attn\.o_proj"]))[0]
    out = export_onnx(q, tmp_path / "onnx", ExportOptions(accuracy_level=0, embed_bits=16))
    man = json.loads((out / "export_manifest.json").read_text())["tensors"]
    assert man["model.layers.1.self_attn.o_proj"]["bits"] == 16 and man["model.layers.0.self_attn.o_proj"]["bits"] == 4
    _assert_prefill_parity(q, out)


def test_auto_backend_says_why_once_when_the_kernels_cannot_run(tiny_q, tmp_path, monkeypatch, capsys):
    """A CUDA GPU whose kernels cannot build (mocked inside this test only: the machine has no GPU):
    auto says why once on stderr and runs the quantized model on ONNX Runtime."""
    import m3edge.runtime.backends as backends
    import m3edge.runtime.cuda as cuda
    from m3edge.export.onnx import ensure_onnx

    monkeypatch.setenv("M3EDGE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "cuda_unavailable", lambda: "the CUDA kernels cannot be built: nvcc is missing")
    monkeypatch.setattr(backends, "_cuda_why", [])
    monkeypatch.setattr(backends, "_said", [])
    assert backends.wants_ort(tiny_q)
    ensure_onnx(tiny_q)
    assert backends.resolve_backend("auto", tiny_q) == "ort"
    assert backends.resolve_backend("auto", tiny_q) == "ort"
    err = capsys.readouterr().err
    assert err.count("not using the GPU (the CUDA kernels cannot be built: nvcc is missing)") == 1
    with pytest.raises(M3Error, match="^the cuda backend cannot run here: the CUDA kernels cannot be built"):
        backends.resolve_backend("cuda", tiny_q)

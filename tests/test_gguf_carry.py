"""Lossless GGUF import: quantized blocks carried as m3edge packed tensors, checked against gguf-py's
own dequantization bit for bit; grids that cannot be carried are re-quantized and reported."""

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import torch

from conftest import MIXED_TYPES
from m3edge.model.checkpoint import TensorFiles, checkpoint_tensors, load_model, packed_parts, read_config
from m3edge.model.importers.gguf import dequantize_tensor, gguf_config, m3_name, open_gguf, read_metadata
from m3edge.model.packing import FLOAT_MIN_FORMAT, dequantize_linear

BIN = str(Path(sys.executable).parent / "m3edge")


def _ours_vs_gguf(src: Path, ckpt: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For every tensor of the GGUF: (our weight as the checkpoint dequantizes it, gguf-py's dequantization
    in HF row order)."""
    reader = open_gguf(src)
    meta, tensors = read_metadata(reader), {t.name: t for t in reader.tensors}
    cfg = gguf_config(meta, tensors, src.name)
    files, packed = TensorFiles(ckpt), checkpoint_tensors(read_config(ckpt))[1]
    out = {}
    for t in reader.tensors:
        name = m3_name(t.name)
        if name in packed:
            module, scheme = packed[name]
            ours = dequantize_linear(packed_parts(files, module), scheme)
        else:
            ours = files.get(name)
        out[t.name] = (ours, dequantize_tensor(t, cfg, src.name))
    return out


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype == torch.float32 and torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_smollm2_every_tensor_bit_exact(smol_carried):
    """The acceptance line: every carried tensor of the shipped Q4_1 file dequantizes, in fp32, to
    exactly gguf-py's values (the bits, not a tolerance)."""
    from m3edge.model.importers.gguf import default_gguf_path

    pairs = _ours_vs_gguf(default_gguf_path(), smol_carried)
    assert len(pairs) == 272
    bad = [n for n, (ours, ref) in pairs.items() if not _bits_equal(ours, ref)]
    assert not bad, bad[:5]
    man = json.loads((smol_carried / "manifest.json").read_text())
    assert all(t["lossless"] for t in man["tensors"].values())
    kinds = {(t["source"], t["stored"]) for t in man["tensors"].values()}
    assert kinds == {("Q4_1", "int4 g32, scale + float minimum"), ("Q8_0", "int8 g32, symmetric"), ("F32", "float32")}
    assert man["compressed_tensors"].startswith("not expressible: 210 tensors")
    assert set(man["files"]) >= {"model.safetensors", "config.json", "tokenizer.json"}
    qcfg = read_config(smol_carried).quantization_config
    assert qcfg["format"] == "mixed-precision"
    assert {g["format"] for g in qcfg["config_groups"].values()} == {"pack-quantized", FLOAT_MIN_FORMAT}
    # int4 on disk: 4.5 bits per weight plus a float minimum per 32, not fp32
    assert sum(f.stat().st_size for f in smol_carried.glob("*.safetensors")) < 100e6


def test_carried_model_runs_the_files_weights(smol_carried, smol_dir):
    """The torch reference loads the carried checkpoint to the very tensors of the dequantized import."""
    a, b = load_model(smol_carried), load_model(smol_dir)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_mixed_types_carried_or_requantized_and_reported(mixed_gguf, tmp_path):
    r = subprocess.run([BIN, "import", str(mixed_gguf), "--out", str(tmp_path / "m")], capture_output=True, text=True,
                       env={"COLUMNS": "160", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert "Q6_K" in r.stdout and "no: re-quantized" in r.stdout and "not expressible: 7 tensors" in r.stdout
    man = json.loads((tmp_path / "m" / "manifest.json").read_text())
    for name, kind in MIXED_TYPES.items():
        entry = man["tensors"][m3_name(f"{name}.weight")]
        assert entry["source"] == kind, name
        assert entry["lossless"] == (kind not in ("Q5_0", "Q6_K")), name
        if not entry["lossless"]:
            assert entry["stored"] == "int8 g32, symmetric" and "re-quantized by RTN" in entry["note"]
    pairs = _ours_vs_gguf(mixed_gguf, tmp_path / "m")
    for gname, (ours, ref) in pairs.items():
        kind = MIXED_TYPES.get(gname.removesuffix(".weight"), "F32")
        if kind in ("Q5_0", "Q6_K"):  # RTN int8 g32: within half a step of each group's scale
            step = ref.abs().reshape(ref.shape[0], -1, 32).amax(-1, keepdim=True) / 127
            assert ((ours - ref).abs().reshape(ref.shape[0], -1, 32) <= step / 2 * (1 + 1e-6) + 1e-12).all(), gname
            assert not torch.equal(ours, ref)
        else:
            assert _bits_equal(ours, ref), (gname, kind)


def test_requant_bits_4_and_dequantize(mixed_gguf, tmp_path):
    from m3edge.model.importers.gguf import import_gguf
    from m3edge.model.scheme import Scheme

    q4 = import_gguf(mixed_gguf, tmp_path / "q4", requant=Scheme(4, 32, False))
    man = json.loads((q4 / "manifest.json").read_text())
    assert man["tensors"]["model.layers.0.self_attn.o_proj.weight"]["stored"] == "int4 g32, zero points"
    full = import_gguf(mixed_gguf, tmp_path / "full", dequantize=True)
    assert read_config(full).quantization_config is None and not (full / "manifest.json").exists()
    for gname, (ours, ref) in _ours_vs_gguf(mixed_gguf, full).items():
        assert _bits_equal(ours, ref), gname


def test_q4k_scales_are_exact_products(mixed_gguf, tmp_path):
    """Q4_K's effective scale d * sc and minimum dmin * m are exact in fp32 (11-bit times 6-bit), stored as fp32."""
    from m3edge.model.importers.gguf import carry_blocks

    reader = open_gguf(mixed_gguf)
    t = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight")
    c = carry_blocks(t)
    assert c.scheme.float_min and c.scale.dtype == torch.float32 and c.minimum.dtype == torch.float32
    assert c.q.shape == (128, 256) and c.scale.shape == (128, 8)
    assert int(c.q.min()) >= -8 and int(c.q.max()) <= 7
    d = torch.from_numpy(np.asarray(t.data).reshape(-1, 144)[:, :2].copy().view(np.float16)).float()  # [blocks, 1]
    assert torch.equal((c.scale.reshape(-1, 8) / d) % 1, torch.zeros(c.scale.numel() // 8, 8))  # integer multiples
    assert carry_blocks(next(t for t in reader.tensors if t.name == "blk.0.ffn_gate.weight")) is None  # Q6_K


def test_bad_requant_bits_is_one_sentence(tmp_path):
    r = subprocess.run([BIN, "import", "--out", str(tmp_path / "x"), "--requant-bits", "5"], capture_output=True,
                       text=True)
    assert r.returncode != 0 and "--requant-bits must be 4 or 8, got 5" in r.stderr + r.stdout
    assert "Traceback" not in r.stderr and not (tmp_path / "x").exists()


def test_gguf_block_formats_match_llamacpp_reference():
    """Our block decoding against the format written out the plain way (ggml-quants.c dequantize_row_q4_1):
    y[j] = d * (qs[j] & 0xF) + m, y[j + 16] = d * (qs[j] >> 4) + m."""
    from m3edge.model.importers.gguf import _nibbles

    rng = np.random.default_rng(1)
    qs = rng.integers(0, 256, (5, 16), dtype=np.uint8)
    want = np.zeros((5, 32), np.uint8)
    for j in range(16):
        want[:, j], want[:, j + 16] = qs[:, j] & 0xF, qs[:, j] >> 4
    assert np.array_equal(_nibbles(qs), want)
    # and gguf-py's own Q4_1 of a known block round-trips through our carry
    x = np.linspace(-1, 2, 32, dtype=np.float32)[None]
    blk = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q4_1)
    d, m = blk[0, :2].view(np.float16)[0], blk[0, 2:4].view(np.float16)[0]
    u = _nibbles(blk[:, 4:])[0]
    assert np.array_equal(np.float32(d) * u.astype(np.float32) + np.float32(m),
                          gguf.quants.dequantize(blk, gguf.GGMLQuantizationType.Q4_1)[0])


def test_info_and_quantize_on_a_carried_checkpoint(smol_carried, tmp_path):
    r = subprocess.run([BIN, "info", str(smol_carried)], capture_output=True, text=True, env={"COLUMNS": "200",
                                                                                             "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert "210 x int4 g32, scale + float minimum; 1 x int8 g32, symmetric" in r.stdout
    r = subprocess.run([BIN, "quantize", str(smol_carried), "--out", str(tmp_path / "q")], capture_output=True,
                       text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr and not (tmp_path / "q").exists()
    assert "is already quantized" in r.stderr and "--dequantize" in r.stderr

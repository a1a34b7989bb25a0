"""compressed-tensors pack-quantized layout: our packer vs a numpy reference, and vs the real library.

The interop tests write a small checkpoint with our code only and have compressed-tensors read it
(its model-free `convert_checkpoint` + `CompressedTensorsDequantizer`, and the transformers route:
`apply_quantization_config` + `ModelCompressor.compress_model` / `decompress_model`).
"""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from m3edge.errors import CheckpointError, ConfigError, M3Error
from m3edge.model.packing import (QuantTargets, dequantize_linear, pack_int32, pack_int32_numpy, pack_linear,
                                  packed_shapes, quantization_config, scheme_for, unpack_int32, unpack_linear)
from m3edge.model.scheme import Scheme, quantize, scale_zero

ATTN = "re:.*self_attn\\.(q|k|v|o)_proj$"
EXPERTS = "re:.*mlp\\.(experts\\.\\d+|shared_experts)\\.(gate|up|down)_proj$"
IGNORE = ["re:.*mlp\\.(gate|image_gate|audio_gate)$", "re:.*(vision|audio)_embed.*", "model.embed_tokens"]


def _random_q(rows: int, cols: int, bits: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = torch.randint(lo, hi + 1, (rows, cols), generator=g, dtype=torch.int8)
    q[0, 0], q[-1, -1] = lo, hi  # both extremes in every case
    q[rows // 2, : min(cols, 9)] = lo
    return q


# ---------------------------------------------------------------------------------------------- 1. packing


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows,cols", [(1, 8), (3, 64), (17, 256), (33, 96), (5, 12), (7, 3)])
def test_pack_matches_numpy_reference(bits, rows, cols):
    q = _random_q(rows, cols, bits, seed=rows * 1000 + cols + bits)
    p = pack_int32(q, bits)
    assert p.dtype == torch.int32 and p.shape == (rows, -(-cols * bits // 32))
    assert np.array_equal(p.numpy(), pack_int32_numpy(q.numpy(), bits))
    assert torch.equal(unpack_int32(p, bits, cols), q)


def test_pack_known_words():
    # int4: u = q + 8 = 0..7 -> element 0 in the low nibble
    q4 = torch.arange(-8, 0, dtype=torch.int8)[None]
    assert pack_int32(q4, 4).item() == 0x76543210
    # int8: u = [0, 127, 128, 255] -> 0xFF807F00 read as signed int32
    q8 = torch.tensor([[-128, -1, 0, 127]], dtype=torch.int8)
    assert pack_int32(q8, 8).item() == 0xFF807F00 - (1 << 32)
    assert pack_int32_numpy(q8.numpy(), 8).item() == 0xFF807F00 - (1 << 32)
    # a short row is padded with u = 0 (i.e. q = -8): [7] -> u = 15
    assert pack_int32(torch.tensor([[7]], dtype=torch.int8), 4).item() == 0xF


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_equals_library_helpers(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    q = _random_q(13, 72, bits, seed=bits)
    assert torch.equal(pack_int32(q, bits), pack_to_int32(q, bits))
    # zero points: packed along the output dim (packed_dim=0)
    z = _random_q(13, 3, bits, seed=bits + 1)
    ours = pack_linear(torch.zeros(13, 96, dtype=torch.int8), torch.ones(13, 3), z.to(torch.int32),
                       Scheme(bits, 32, False))["weight_zero_point"]
    assert torch.equal(ours, pack_to_int32(z, bits, packed_dim=0))


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="int4"):
        pack_int32(torch.tensor([[8]], dtype=torch.int8), 4)
    with pytest.raises(ValueError, match="int8"):
        pack_int32(torch.tensor([[1]], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="words"):
        unpack_int32(torch.zeros(2, 3, dtype=torch.int32), 4, 32)
    with pytest.raises(ValueError, match="exactly representable"):
        pack_linear(torch.zeros(2, 32, dtype=torch.int8), torch.full((2, 1), 0.1), None, Scheme(4, 32, True))


@pytest.mark.parametrize("scheme", [Scheme(4, 128, True), Scheme(4, 32, False), Scheme(8, 64, False),
                                    Scheme(8, -1, True), Scheme(4, -1, False)])
def test_pack_linear_round_trip(scheme):
    w = torch.randn(37, 256, generator=torch.Generator().manual_seed(1))
    q, scale, zero = _quantize(w, scheme)
    t = pack_linear(q, scale, zero, scheme, torch.bfloat16)
    g = 1 if scheme.group == -1 else 256 // scheme.group
    assert t["weight_packed"].dtype == torch.int32 and t["weight_packed"].shape == (37, 256 * scheme.bits // 32)
    assert t["weight_scale"].dtype == torch.bfloat16 and t["weight_scale"].shape == (37, g)
    assert t["weight_shape"].dtype == torch.int64 and t["weight_shape"].tolist() == [37, 256]
    if scheme.symmetric:
        assert "weight_zero_point" not in t
    else:
        assert t["weight_zero_point"].dtype == torch.int32
        assert t["weight_zero_point"].shape == (-(-37 * scheme.bits // 32), g)
    q2, s2, z2, m2 = unpack_linear(t, scheme)
    assert torch.equal(q2, q) and torch.equal(s2, scale) and m2 is None
    assert (z2 is None) if scheme.symmetric else torch.equal(z2, zero)
    z = 0 if zero is None else zero.float().repeat_interleave(256 // g, 1)  # [37, 256]
    assert torch.equal(dequantize_linear(t, scheme), (q.float() - z) * scale.repeat_interleave(256 // g, 1))
    bad = dict(t, weight_shape=torch.tensor([37, 128]))
    with pytest.raises(CheckpointError):
        unpack_linear(bad, scheme)


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
def test_float_minimum_round_trip_and_config(scale_dtype):
    """m3edge's float-minimum form (GGUF Q4_1 / Q4_K carried): weight_min next to the scale, no zero
    point, w = (q - qmin) * scale + min in fp32; its own group format in config.json."""
    s = Scheme(4, 32, False, float_min=True)
    g = torch.Generator().manual_seed(2)
    q = torch.randint(-8, 8, (37, 64), generator=g).to(torch.int8)
    scale = (torch.rand(37, 2, generator=g) * 0.01).to(scale_dtype).float()
    minimum = (-torch.rand(37, 2, generator=g) * 0.1).to(scale_dtype).float()
    t = pack_linear(q, scale, None, s, scale_dtype, minimum)
    assert set(t) == {"weight_packed", "weight_scale", "weight_shape", "weight_min"}
    assert t["weight_min"].dtype == scale_dtype and t["weight_min"].shape == (37, 2)
    assert packed_shapes(37, 64, s) == {k: tuple(v.shape) for k, v in t.items()}
    u = unpack_linear(t, s)
    assert torch.equal(u.q, q) and torch.equal(u.minimum, minimum) and (u.zero == -8).all()
    want = (q.float() + 8) * scale.repeat_interleave(32, 1) + minimum.repeat_interleave(32, 1)
    assert torch.equal(dequantize_linear(t, s), want)
    with pytest.raises(CheckpointError, match="weight_min"):
        unpack_linear({k: v for k, v in t.items() if k != "weight_min"}, s)
    with pytest.raises(ValueError, match="minimum is not exactly representable"):
        pack_linear(q, scale, None, s, scale_dtype, minimum.double() * (1 + 2 ** -40))
    qcfg = json.loads(json.dumps(quantization_config([(s, ["a"]), (Scheme(8, 32, True), ["b"])], [])))
    assert qcfg["format"] == "mixed-precision"
    assert scheme_for("a", qcfg) == s and scheme_for("b", qcfg) == Scheme(8, 32, True)
    assert quantization_config([(Scheme(8, 32, True), ["b"])], [])["format"] == "pack-quantized"
    with pytest.raises(M3Error, match="asymmetric and grouped"):
        Scheme(4, 32, True, float_min=True)


# ---------------------------------------------------------------------------------------------- 2. interop


def _quantize(w: torch.Tensor, s: Scheme):
    scale, zero = scale_zero(w, s)
    scale = scale.to(torch.bfloat16).float()  # the stored (bf16) scale is the one q is computed with
    return quantize(w, scale, zero, s), scale, zero


def _tiny_model() -> nn.Module:
    """Linears named like ours; k/v have 36 outputs so int4 zero points need a padded word."""
    def lin(i, o):
        return nn.Linear(i, o, bias=False)

    m = nn.Module()
    m.model = nn.Module()
    m.model.embed_tokens = nn.Embedding(100, 256)
    layer = nn.Module()
    layer.self_attn = nn.Module()
    for n, o in (("q_proj", 256), ("k_proj", 36), ("v_proj", 36), ("o_proj", 256)):
        setattr(layer.self_attn, n, lin(256, o))
    layer.mlp = nn.Module()
    layer.mlp.gate = lin(256, 4)  # router: must stay dense
    layer.mlp.experts = nn.ModuleList()
    for _ in range(2):
        e = nn.Module()
        e.gate_proj, e.up_proj, e.down_proj = lin(256, 128), lin(256, 128), lin(128, 256)
        layer.mlp.experts.append(e)
    m.model.layers = nn.ModuleList([layer])
    m.lm_head = lin(256, 100)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def _write_checkpoint(tmp_path, model: nn.Module, main: Scheme, head: Scheme):
    """Our writer: pack every targeted linear, keep the rest bf16, config.json with our quantization_config."""
    qcfg = quantization_config([(main, [ATTN, EXPERTS]), (head, ["lm_head"])], IGNORE)
    targets = QuantTargets.from_config(qcfg)
    tensors, ours, params = {}, {}, {}
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Embedding)):
            continue
        s = scheme_for(name, targets) if isinstance(mod, nn.Linear) else None
        w = mod.weight.detach().float()
        if s is None:
            tensors[f"{name}.weight"] = w.to(torch.bfloat16)
            continue
        q, scale, zero = _quantize(w, s)
        t = pack_linear(q, scale, zero, s, torch.bfloat16)
        tensors.update({f"{name}.{k}": v for k, v in t.items()})
        ours[name] = dequantize_linear(t, s)  # fp32, exact
        params[name] = (s, t, scale, zero)
    d = tmp_path / "ckpt"
    d.mkdir()
    save_file(tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "m3lite", "torch_dtype": "bfloat16",
                                               "quantization_config": qcfg}, indent=2))
    return d, qcfg, tensors, ours, params


VARIANTS = [  # (main group, lm_head group)
    (Scheme(4, 128, True), Scheme(8, 128, True)),
    (Scheme(4, 32, False), Scheme(8, 128, True)),
    (Scheme(8, 128, True), Scheme(8, 128, True)),
    (Scheme(8, 64, False), Scheme(8, -1, True)),
    (Scheme(4, -1, True), Scheme(8, -1, True)),
    (Scheme(4, -1, False), Scheme(8, -1, False)),
]
IDS = [f"int{m.bits}-g{m.group}-{'sym' if m.symmetric else 'asym'}" for m, _ in VARIANTS]


@pytest.mark.parametrize("main,head", VARIANTS, ids=IDS)
def test_library_dequantizes_our_checkpoint(tmp_path, main, head):
    """Model-free route: compressed-tensors' `convert_checkpoint` with its `CompressedTensorsDequantizer`
    reads our config.json + safetensors and writes dense weights."""
    from compressed_tensors.entrypoints.convert import convert_checkpoint
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

    model = _tiny_model()
    d, qcfg, tensors, ours, _ = _write_checkpoint(tmp_path, model, main, head)
    assert set(ours) == {n for n, m in model.named_modules() if isinstance(m, nn.Linear)} - {"model.layers.0.mlp.gate"}

    out = tmp_path / "dense"
    convert_checkpoint(d, out, CompressedTensorsDequantizer(d, dtype=torch.bfloat16), max_workers=1, device="cpu")
    dense = load_file(str(out / "model.safetensors"))
    assert set(dense) == {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    for name, w in ours.items():
        # The library dequantizes in the scale dtype (bf16): (q - z) is an integer of at most 9 bits,
        # exact in bf16, and the bf16 multiply rounds the exact product once. Our fp32 result is that
        # exact product (8-bit x 8-bit significands fit fp32), so casting it to bf16 is the same rounding.
        assert dense[f"{name}.weight"].dtype == torch.bfloat16
        assert torch.equal(dense[f"{name}.weight"], w.to(torch.bfloat16)), name
    for name in ("model.layers.0.mlp.gate.weight", "model.embed_tokens.weight"):
        assert torch.equal(dense[name], tensors[name])


@pytest.mark.parametrize("main,head", VARIANTS, ids=IDS)
def test_library_compresses_and_decompresses_like_us(tmp_path, main, head):
    """transformers' route (CompressedTensorsHfQuantizer): config -> ModelCompressor -> apply_quantization_config
    -> compress_model (packed parameter layout) -> load our tensors -> decompress_model.

    Given our scales and zero points, the library's own compression of the fp32 weights must produce
    our tensors bit for bit (same names, shapes, dtypes except the scale's, which follows the model's)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config
    from transformers import CompressedTensorsConfig

    model = _tiny_model()  # fp32
    d, qcfg, tensors, ours, params = _write_checkpoint(tmp_path, model, main, head)
    cfg = CompressedTensorsConfig.from_dict(json.loads((d / "config.json").read_text()))
    mc = ModelCompressor.from_compression_config(cfg)
    apply_quantization_config(model, mc.quantization_config)

    # the library's target matching agrees with scheme_for on every linear
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            w = getattr(getattr(mod, "quantization_scheme", None), "weights", None)
            lib = None if w is None else (w.num_bits, w.group_size if w.strategy == "group" else -1, w.symmetric)
            s = scheme_for(name, qcfg)
            assert lib == (None if s is None else (s.bits, s.group, s.symmetric)), name
    assert not hasattr(model.model.embed_tokens, "quantization_scheme")

    with torch.no_grad():
        for name, (s, t, scale, zero) in params.items():
            mod = model.get_submodule(name)
            mod.weight_scale.copy_(scale)
            if zero is not None:
                mod.weight_zero_point.copy_(zero)
    mc.compress_model(model)
    sd = model.state_dict()
    assert set(sd) == set(tensors)
    for k, v in tensors.items():
        assert sd[k].shape == v.shape, k
        if k.endswith(".weight"):  # dense: router, embedding (the fp32 model holds them in fp32)
            assert torch.equal(sd[k].to(torch.bfloat16), v), k
        elif k.endswith("weight_scale"):
            assert sd[k].dtype == torch.float32 and torch.equal(sd[k], v.float()), k
        else:
            assert sd[k].dtype == v.dtype and torch.equal(sd[k], v), k

    model.load_state_dict({k: v for k, v in tensors.items()}, strict=True)
    mc.decompress_model(model)
    for name, w in ours.items():
        got = model.get_submodule(name).weight
        assert got.dtype == torch.float32 and torch.equal(got, w), name  # fp32 scales: exact, no rounding


def test_config_is_what_the_library_writes():
    """Our JSON parses as the library's QuantizationConfig and survives its serializer unchanged."""
    from compressed_tensors.quantization import QuantizationConfig

    qcfg = quantization_config([(Scheme(4, 32, False), [ATTN, EXPERTS]), (Scheme(8, -1, True), ["lm_head"])], IGNORE)
    parsed = QuantizationConfig.model_validate(qcfg)
    assert parsed.format == "pack-quantized" and parsed.quantization_status == "compressed"
    dumped = json.loads(json.dumps(parsed.model_dump(), default=str))
    for key in ("quant_method", "format", "quantization_status", "ignore", "kv_cache_scheme"):
        assert dumped[key] == qcfg[key], key
    for gname, group in qcfg["config_groups"].items():
        lib = dumped["config_groups"][gname]
        assert lib["targets"] == group["targets"] and lib["format"] == "pack-quantized"
        assert {k: lib["weights"][k] for k in group["weights"]} == group["weights"]
        assert lib["input_activations"] is None and lib["output_activations"] is None


# ---------------------------------------------------------------------------------------------- 3. scheme_for


def test_scheme_for_our_config():
    main, head = Scheme(4, 128, True), Scheme(8, 128, True)
    qcfg = json.loads(json.dumps(quantization_config([(main, [ATTN, EXPERTS]), (head, ["lm_head"])], IGNORE)))
    for n in ("model.layers.0.self_attn.q_proj", "model.layers.11.self_attn.o_proj",
              "model.layers.3.mlp.experts.127.down_proj", "model.layers.0.mlp.shared_experts.up_proj"):
        assert scheme_for(n, qcfg) == main, n
    assert scheme_for("lm_head", qcfg) == head
    for n in ("model.layers.0.mlp.gate", "model.layers.5.mlp.image_gate", "model.layers.5.mlp.audio_gate",
              "model.vision_embed.proj", "model.audio_embed.proj", "model.embed_tokens",
              "model.layers.0.self_attn.q_proj_extra", "model.layers.0.mlp.experts.1.gate_proj.lora"):
        assert scheme_for(n, qcfg) is None, n


def test_scheme_for_precedence_and_ignore():
    a, b, c = Scheme(4, 128, True), Scheme(8, 64, False), Scheme(4, -1, False)
    qcfg = quantization_config([(a, ["Linear"]), (b, ["re:.*proj$", "model.x.up_proj"]), (c, ["re:.*up_proj$"])],
                               ["re:.*mlp\\.gate$", "model.x.down_proj"])
    assert scheme_for("model.x.up_proj", qcfg) == b  # exact name beats any regex
    assert scheme_for("model.y.up_proj", qcfg) == b  # regexes in sorted order: ".*proj$" < ".*up_proj$"
    assert scheme_for("model.y.o_proj", qcfg) == b
    assert scheme_for("lm_head", qcfg) == a  # only the class target `Linear` matches
    assert scheme_for("model.x.down_proj", qcfg) is None  # ignore wins over every target
    assert scheme_for("model.layers.2.mlp.gate", qcfg) is None
    # a library preset group name
    assert scheme_for("lm_head", {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                  "config_groups": {"W4A16": ["Linear"]}, "ignore": []}) == Scheme(4, 128, True)


def test_scheme_for_rejects_what_we_cannot_run():
    base = quantization_config([(Scheme(4, 128, True), ["Linear"])], [])
    for patch in ({"type": "float"}, {"strategy": "block", "block_structure": [128, 128]}, {"num_bits": 2},
                  {"actorder": "group"}, {"group_size": 256}):
        cfg = json.loads(json.dumps(base))
        cfg["config_groups"]["group_0"]["weights"].update(patch)
        with pytest.raises(ConfigError):
            scheme_for("x", cfg)
    cfg = json.loads(json.dumps(base))
    cfg["config_groups"]["group_0"]["format"] = "int-quantized"
    with pytest.raises(ConfigError, match="format"):
        scheme_for("x", cfg)
    with pytest.raises(ConfigError, match="regex"):
        quantization_config([(Scheme(), ["re:("])], [])

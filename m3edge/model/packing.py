"""Our on-disk quantized format: compressed-tensors' "pack-quantized", written and read by us.

A checkpoint in this format loads in compressed-tensors, transformers and vLLM; the runtime reads
it without the library. Facts below are from compressed-tensors 0.20.0
(`compressors/pack_quantized/{base,helpers}.py`, `quantization/{quant_args,quant_config}.py`,
`utils/match.py`) and are checked against it by `tests/test_pack.py`.

Per quantized linear `<name>` (weight [out, in], G = ceil(in / group), or G = 1 per channel):

    <name>.weight_packed      int32 [out, in * bits / 32]
    <name>.weight_scale       scale dtype (bf16 for a bf16 model) [out, G]
    <name>.weight_shape       int64 [2] = (out, in)
    <name>.weight_zero_point  int32 [ceil(out * bits / 32), G]   asymmetric only

Packing: q is a signed int in [-2^(b-1), 2^(b-1) - 1]; it is stored as u = q + 2^(b-1) (unsigned,
b bits). Element i of a row sits at bits [b*i, b*i + b) of the row's bit stream, and word j holds
stream bits [32j, 32j + 32), least significant first. For int4: word j = u[8j] | u[8j+1] << 4 |
... | u[8j+7] << 28 (element 8j in the low nibble; as little-endian bytes, byte 0 = u[8j] | u[8j+1] << 4).
For int8: word j = u[4j] | u[4j+1] << 8 | u[4j+2] << 16 | u[4j+3] << 24. The word is the 32-bit
pattern read as a signed int32. A row whose length is not a multiple of 32 / b is padded with
u = 0 (compressed-tensors pads after adding the offset).

Zero points (asymmetric only) are int8-valued on the same signed grid and packed the same way but
along the *output* dimension (compressed-tensors' `packed_dim=0`): column g of the zero [out, G]
is a stream of `out` values, so out need not be a multiple of 32 / b (padding as above).

Dequantization: w = (q - zero) * scale, scale and zero broadcast over each group of `group`
consecutive inputs. compressed-tensors computes it in the scale's dtype; for bf16 scales with
|q - zero| <= 255 that is the exact product rounded once to bf16, so it equals our fp32 result cast
to bf16 (`dequantize_linear` returns the exact product in fp32).

m3edge's own extension, format "m3edge-pack-quantized-min" (scheme.float_min; GGUF Q4_1 / Q4_K
blocks carried as stored): the same weight_packed (u = q + 2^(b-1) is llama.cpp's unsigned nibble),
weight_scale in the source's precision, no zero point, and

    <name>.weight_min         float [out, G]        w = u * scale + min

compressed-tensors cannot express a float minimum (its zero point is on the integer grid and
subtracted before scaling), so a checkpoint holding such groups says so in config.json's format
("mixed-precision" with this group format) and in its manifest; m3edge reads it everywhere.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from m3edge.errors import CheckpointError, ConfigError, M3Error
from m3edge.model.scheme import Scheme
from m3edge.model.scheme import dequantize as _dequantize

FORMAT = "pack-quantized"
FLOAT_MIN_FORMAT = "m3edge-pack-quantized-min"  # our extension: w = u * scale + min (see the module doc)
QUANT_METHOD = "compressed-tensors"
CT_VERSION = "0.20.0"  # the compressed-tensors release this layout was checked against
PRESETS = {  # compressed-tensors preset group names this module can read (config_groups {"W4A16": [targets]})
    "W4A16": Scheme(4, 128, True),
    "W4A16_ASYM": Scheme(4, 128, False),
    "W8A16": Scheme(8, 128, True),
}


def _per_word(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"packing needs bits 4 or 8, got {bits}")
    return 32 // bits


# ---------------------------------------------------------------------------------------------- packing


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q [..., n] int8 on the signed b-bit grid -> int32 [..., ceil(n * bits / 32)], packed along the last dim."""
    per = _per_word(bits)
    if q.dtype != torch.int8:
        raise ValueError(f"pack_int32 needs int8 values, got {q.dtype}")
    off = 1 << (bits - 1)
    if q.numel() and (int(q.min()) < -off or int(q.max()) >= off):
        raise ValueError(f"values outside the int{bits} range [{-off}, {off - 1}] cannot be packed")
    n = q.shape[-1]
    if sys.byteorder == "little":
        # the words' little-endian bytes directly: int8 u is a byte, int4 two nibbles (element 2j low)
        u = F.pad((q + off).view(torch.uint8), (0, (-n) % per))  # q + off wraps to u in [0, 2^bits)
        if bits == 4:
            u = u.unflatten(-1, (-1, 2))
            u = u[..., 0] | (u[..., 1] << 4)
        # (through a flat view: a size-1 dim may carry any stride, which a dtype view refuses)
        return u.contiguous().reshape(-1).view(torch.int32).view(*u.shape[:-1], u.shape[-1] // 4)
    u = q.to(torch.int64) + off  # [..., n] in [0, 2^bits)
    u = F.pad(u, (0, (-n) % per))  # padded slots hold u = 0, as compressed-tensors pads
    u = u.unflatten(-1, (-1, per))  # [..., W, per]
    shifts = torch.arange(per, dtype=torch.int64, device=q.device) * bits  # element k of a word -> bits [k*b, k*b+b)
    word = (u << shifts).sum(-1)  # [..., W] in [0, 2^32); fields are disjoint, so sum == or
    word = torch.where(word >= 1 << 31, word - (1 << 32), word)  # the same 32 bits read as signed
    return word.to(torch.int32)


def unpack_int32(p: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of `pack_int32`: p int32 [..., W] -> int8 [..., in_features]."""
    per = _per_word(bits)
    if p.dtype != torch.int32:
        raise ValueError(f"unpack_int32 needs int32 words, got {p.dtype}")
    if p.shape[-1] != -(-in_features // per):
        raise ValueError(f"{p.shape[-1]} int32 words cannot hold {in_features} int{bits} values "
                         f"(need {-(-in_features // per)})")
    shifts = torch.arange(per, dtype=torch.int32, device=p.device) * bits
    # arithmetic >> keeps the sign bits above the field; the mask drops them
    u = (p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., W, per]
    u = u.flatten(-2)[..., :in_features]
    return (u - (1 << (bits - 1))).to(torch.int8)


def pack_int32_numpy(q: np.ndarray, bits: int) -> np.ndarray:
    """Bit-exact reference for `pack_int32` on a 2-D array, written the obvious way: per word, OR in
    each value shifted by its position."""
    per = 32 // bits
    rows, n = q.shape
    words = -(-n // per)
    out = np.zeros((rows, words), dtype=np.uint32)
    for j in range(words):
        for k in range(per):
            i = j * per + k
            if i >= n:
                break  # padding stays 0
            u = (q[:, i].astype(np.int64) + (1 << (bits - 1))).astype(np.uint32)
            out[:, j] |= u << np.uint32(k * bits)
    return out.view(np.int32)


def _pack_rows(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack along dim -2 (the output dim), as compressed-tensors packs zero points (`packed_dim=0`)."""
    return pack_int32(z.transpose(-1, -2).contiguous(), bits).transpose(-1, -2).contiguous()


def _unpack_rows(p: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    return unpack_int32(p.transpose(-1, -2).contiguous(), bits, rows).transpose(-1, -2).contiguous()


# ---------------------------------------------------------------------------------------------- one linear


def pack_linear(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: Scheme,
                scale_dtype: torch.dtype = torch.bfloat16, minimum: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One linear's compressed tensors, named, typed and shaped as compressed-tensors writes them.

    q [out, in] int8, scale [out, G] (values must be exact in `scale_dtype`: round the scale before
    computing q, so the stored scale is the one used), zero [out, G] int or None (symmetric);
    a float_min scheme takes `minimum` [out, G] instead of zero, stored in `scale_dtype` (exactly).
    """
    assert q.dim() == 2 and q.dtype == torch.int8, f"q must be int8 [out, in], got {q.dtype} {tuple(q.shape)}"
    out, k = q.shape
    G = scheme.n_groups(k)
    assert tuple(scale.shape) == (out, G), f"scale must be [{out}, {G}], got {tuple(scale.shape)}"
    s = scale.to(scale_dtype)
    for what, v in (("scale", scale), ("minimum", minimum)):
        if v is not None and not torch.equal(v.to(scale_dtype).to(v.dtype), v):
            raise ValueError(f"{what} is not exactly representable in {scale_dtype}; round it to {scale_dtype} "
                             "before computing q so that the stored value is the one used")
    if (q.numel() and (int(q.min()) < scheme.qmin or int(q.max()) > scheme.qmax)):
        raise ValueError(f"q has values outside [{scheme.qmin}, {scheme.qmax}] for int{scheme.bits}")
    t = {
        "weight_packed": pack_int32(q, scheme.bits),  # [out, in * bits / 32]
        "weight_scale": s.contiguous(),  # [out, G]
        "weight_shape": torch.tensor([out, k], dtype=torch.int64),  # torch.tensor(weight.shape)
    }
    if scheme.float_min:
        assert zero is None and minimum is not None and tuple(minimum.shape) == (out, G), \
            f"a float-minimum scheme takes minimum [{out}, {G}] and no zero point"
        t["weight_min"] = minimum.to(scale_dtype).contiguous()
    elif scheme.symmetric:
        assert zero is None, "a symmetric scheme has no zero point"
    else:
        assert zero is not None and tuple(zero.shape) == (out, G), \
            f"zero must be [{out}, {G}] for an asymmetric scheme"
        t["weight_zero_point"] = _pack_rows(zero.to(torch.int8), scheme.bits)  # [ceil(out*bits/32), G]
    return t


class Unpacked(NamedTuple):
    q: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # fp32 [out, G]
    zero: torch.Tensor | None  # int32 [out, G] (asymmetric; qmin everywhere for float_min) or None
    minimum: torch.Tensor | None  # fp32 [out, G] (float_min) or None


def unpack_linear(tensors: dict[str, torch.Tensor], scheme: Scheme) -> Unpacked:
    """Read back `pack_linear`'s tensors."""
    try:
        packed, scale, shape = tensors["weight_packed"], tensors["weight_scale"], tensors["weight_shape"]
    except KeyError as e:
        raise CheckpointError(f"a pack-quantized linear lacks its {e.args[0]} tensor") from None
    if shape.numel() != 2:
        raise CheckpointError(f"weight_shape must hold (out, in), got {shape.tolist()}")
    out, k = (int(v) for v in shape.tolist())
    n_groups = scheme.n_groups(k)
    if tuple(packed.shape) != (out, -(-k * scheme.bits // 32)) or tuple(scale.shape) != (out, n_groups):
        raise CheckpointError(f"weight_packed {tuple(packed.shape)} / weight_scale {tuple(scale.shape)} do not fit "
                              f"weight_shape ({out}, {k}) with int{scheme.bits}, group {scheme.group}")
    q = unpack_int32(packed, scheme.bits, k)
    zero = minimum = None
    if scheme.float_min:
        minimum = tensors.get("weight_min")
        if minimum is None or tuple(minimum.shape) != (out, n_groups):
            raise CheckpointError(f"a float-minimum linear needs weight_min [{out}, {n_groups}], got "
                                  f"{None if minimum is None else tuple(minimum.shape)}")
        zero = torch.full((out, n_groups), scheme.qmin, dtype=torch.int32, device=minimum.device)
        minimum = minimum.float()
    elif not scheme.symmetric:
        if "weight_zero_point" not in tensors:
            raise CheckpointError("an asymmetric pack-quantized linear lacks its weight_zero_point tensor")
        zp = tensors["weight_zero_point"]
        if tuple(zp.shape) != (-(-out * scheme.bits // 32), n_groups):
            raise CheckpointError(f"weight_zero_point {tuple(zp.shape)} does not fit {out} rows x {n_groups} groups")
        zero = _unpack_rows(zp, scheme.bits, out).to(torch.int32)
    return Unpacked(q, scale.float(), zero, minimum)


def dequantize_linear(tensors: dict[str, torch.Tensor], scheme: Scheme) -> torch.Tensor:
    """w [out, in] fp32 = (q - zero) * scale (+ min); the product is exact for bf16 / fp16 scales."""
    u = unpack_linear(tensors, scheme)
    return _dequantize(u.q, u.scale, u.zero, scheme.group_size(u.q.shape[1]), u.minimum)


# ---------------------------------------------------------------------------------------------- config.json


def _weights_args(s: Scheme) -> dict:
    # Only the basic fields (QuantizationArgs forbids unknown keys, so fewer is safer for older
    # readers); these are the keys and values 0.20's own `model_dump` writes for such a scheme.
    a = {"num_bits": s.bits, "type": "int", "symmetric": s.symmetric, "dynamic": False}
    if s.group == -1:
        a.update(strategy="channel", group_size=None)
    else:
        a.update(strategy="group", group_size=s.group)
    return a


def quantization_config(groups: list[tuple[Scheme, list[str]]], ignore: list[str]) -> dict:
    """The `quantization_config` object of config.json. Targets and ignore entries are full module
    names or `re:` regexes (Python `re.match`: anchored at the start, add `$` to anchor the end)."""
    for t in [t for _, ts in groups for t in ts] + list(ignore):
        _check_target(t)
    config_groups = {}
    for s, targets in groups:
        if not targets:
            continue
        config_groups[f"group_{len(config_groups)}"] = {
            "targets": list(targets),
            "weights": _weights_args(s),
            "input_activations": None,
            "output_activations": None,
            "format": FLOAT_MIN_FORMAT if s.float_min else FORMAT,
        }
    formats = {g["format"] for g in config_groups.values()} or {FORMAT}
    return {
        "quant_method": QUANT_METHOD,
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
    }


def _check_target(t: str) -> None:
    if t.startswith("re:"):
        try:
            re.compile(t[3:])
        except re.error as e:
            raise ConfigError(f"quantization target '{t}' is not a valid regex: {e}") from None


def _scheme_of(group: dict, top_format: str | None) -> Scheme | None:
    w = group.get("weights")
    if w is None:
        return None
    fmt = group.get("format") or top_format
    if fmt not in (FORMAT, FLOAT_MIN_FORMAT):
        raise ConfigError(f"quantization format '{fmt}' is not supported (only '{FORMAT}' and m3edge's "
                          f"'{FLOAT_MIN_FORMAT}')")
    if group.get("input_activations") is not None or group.get("output_activations") is not None:
        raise ConfigError("activation quantization is not supported (weight-only schemes only)")
    if w.get("type", "int") != "int":
        raise ConfigError(f"weight type '{w.get('type')}' is not supported (only int)")
    if w.get("dynamic", False):
        raise ConfigError("dynamic weight quantization is not supported")
    if str(w.get("actorder") or "weight").lower() not in ("weight", "static"):
        raise ConfigError(f"actorder '{w.get('actorder')}' (g_idx) is not supported")
    gs, strategy = w.get("group_size"), w.get("strategy")
    strategy = strategy or ("group" if gs and gs > 0 else "channel" if gs == -1 else "tensor")
    if strategy == "channel":
        gs = -1
    elif strategy == "group" and not (isinstance(gs, int) and gs > 0):
        raise ConfigError(f"group strategy needs a positive group_size, got {gs}")
    elif strategy != "group":
        raise ConfigError(f"weight strategy '{strategy}' is not supported (only group and channel)")
    try:
        return Scheme(int(w.get("num_bits", 8)), int(gs), bool(w.get("symmetric", True)), fmt == FLOAT_MIN_FORMAT)
    except M3Error as e:
        raise ConfigError(f"unsupported weight scheme {w}: {e}") from None


@dataclass
class QuantTargets:
    """A parsed quantization_config, for looking up many names (`scheme_for` parses on every call).

    Matching follows compressed-tensors (`utils/match.py`, `lifecycle/apply.py`): a name is skipped if
    any `ignore` entry matches it; otherwise, among the targets that match, an exact name beats a
    regex, regexes are taken in sorted order of their text, and the class target `Linear` (every name
    asked about here is a linear) comes last. `re:X` matches when `re.match(X, name)` does.
    """

    exact: dict[str, Scheme | None] = field(default_factory=dict)
    regex: list[tuple[str, re.Pattern, Scheme | None]] = field(default_factory=list)
    linear: tuple[Scheme | None] | None = None  # scheme of a `Linear` target, boxed (it may be None)
    ignore_exact: set[str] = field(default_factory=set)
    ignore_regex: list[re.Pattern] = field(default_factory=list)
    ignore_all: bool = False

    @classmethod
    def from_config(cls, qcfg: dict) -> "QuantTargets":
        if qcfg.get("quant_method", QUANT_METHOD) != QUANT_METHOD:
            raise ConfigError(f"quant_method '{qcfg.get('quant_method')}' is not '{QUANT_METHOD}'")
        self = cls()
        by_target: dict[str, Scheme | None] = {}  # later groups overwrite a repeated target, as in the library
        for gname, group in (qcfg.get("config_groups") or {}).items():
            if isinstance(group, list):  # preset name -> list of targets
                if gname.upper() not in PRESETS:
                    raise ConfigError(f"preset quantization scheme '{gname}' is not supported")
                scheme, targets = PRESETS[gname.upper()], group
            else:
                scheme, targets = _scheme_of(group, qcfg.get("format")), group.get("targets") or []
            for t in targets:
                _check_target(t)
                by_target[t] = scheme
        for t, s in by_target.items():
            if t.startswith("re:"):
                self.regex.append((t, re.compile(t[3:]), s))
            elif t == "Linear":
                self.linear = (s,)
            else:
                self.exact[t] = s
        self.regex.sort(key=lambda r: r[0])
        for t in qcfg.get("ignore") or []:
            _check_target(t)
            if t.startswith("re:"):
                self.ignore_regex.append(re.compile(t[3:]))
            elif t == "Linear":
                self.ignore_all = True
            else:
                self.ignore_exact.add(t)
        return self

    def scheme_for(self, name: str) -> Scheme | None:
        if self.ignore_all or name in self.ignore_exact or any(r.match(name) for r in self.ignore_regex):
            return None
        if name in self.exact:
            return self.exact[name]
        for _, r, s in self.regex:
            if r.match(name):
                return s
        return self.linear[0] if self.linear else None


def scheme_for(name: str, qcfg: dict | QuantTargets) -> Scheme | None:
    """The scheme of linear `name` (e.g. `model.layers.0.mlp.experts.3.up_proj`, `lm_head`) under a
    parsed quantization_config dict; None = stored unquantized. For many names parse once with
    `QuantTargets.from_config`."""
    t = qcfg if isinstance(qcfg, QuantTargets) else QuantTargets.from_config(qcfg)
    return t.scheme_for(name)


def packed_shapes(out: int, k: int, s: Scheme) -> dict[str, tuple[int, ...]]:
    """Suffix -> shape of the tensors `pack_linear` writes for a weight [out, k]."""
    per = 32 // s.bits
    g = s.n_groups(k)
    shapes = {"weight_packed": (out, -(-k // per)), "weight_scale": (out, g), "weight_shape": (2,)}
    if s.float_min:
        shapes["weight_min"] = (out, g)
    elif not s.symmetric:
        shapes["weight_zero_point"] = (-(-out // per), g)
    return shapes

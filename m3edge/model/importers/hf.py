"""Import HF safetensors checkpoints (Llama, Mistral, Qwen3, Qwen3-MoE, Mixtral) as M3 checkpoints.

Each architecture is a config mapping plus a tensor-name `sanitize` (mlx-lm style): the dense
ones become the spec's dense variant (`mlp.shared_experts` is the MLP), the MoE ones the text
MoE without shared expert. Tensors stream one at a time from the memory-mapped source.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from m3edge.errors import CheckpointError, ImportSourceError
from m3edge.model.checkpoint import CheckpointWriter, TensorFiles, read_json, validate
from m3edge.model.m3lite import M3Config, expected_tensors

DENSE = ("llama", "mistral", "qwen3")
MOE = ("qwen3_moe", "mixtral")
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
              "special_tokens_map.json", "preprocessor_config.json")


def _rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from a transformers v4 (`rope_theta`, `rope_scaling`) or v5
    (`rope_parameters`) config."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = params.pop("rope_theta", raw.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    return float(theta), (params if kind != "default" else None)


def convert_config(raw: dict[str, Any], tensors: TensorFiles) -> dict[str, Any]:
    mt = raw["model_type"]
    if raw.get("mlp_bias"):
        raise ImportSourceError(f"this {mt} checkpoint uses mlp_bias, which M3 has no place for")
    H, nh = raw["hidden_size"], raw["num_attention_heads"]
    theta, scaling = _rope(raw)
    dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
    eos = raw.get("eos_token_id")
    window = raw.get("sliding_window") if raw.get("use_sliding_window", mt != "qwen3") else None
    cfg: dict[str, Any] = {
        "architectures": ["M3LiteForConditionalGeneration"], "model_type": "m3lite",
        "torch_dtype": dtype if dtype in ("float32", "bfloat16", "float16") else "float32",
        "vocab_size": raw["vocab_size"], "hidden_size": H, "num_hidden_layers": raw["num_hidden_layers"],
        "num_attention_heads": nh, "num_key_value_heads": raw.get("num_key_value_heads") or nh,
        "head_dim": raw.get("head_dim") or H // nh, "hidden_act": raw.get("hidden_act", "silu"),
        "rms_norm_eps": raw.get("rms_norm_eps", 1e-6), "attention_bias": bool(raw.get("attention_bias", False)),
        "use_qk_norm": mt in ("qwen3", "qwen3_moe"),
        "max_position_embeddings": raw.get("max_position_embeddings", 4096),
        "rope_theta": theta, "rope_scaling": scaling, "sliding_window": window,
        "tie_word_embeddings": bool(raw.get("tie_word_embeddings", False)),
        "router_modalities": ["text"], "vision_config": None, "audio_config": None,
        "bos_token_id": raw.get("bos_token_id"), "eos_token_id": [eos] if isinstance(eos, int) else (eos or []),
        "pad_token_id": raw.get("pad_token_id"),
    }
    if mt in DENSE:
        cfg.update(num_experts=0, num_shared_experts=1, shared_expert_intermediate_size=raw["intermediate_size"])
        return cfg
    E = raw.get("num_experts") or raw.get("num_local_experts")
    if mt == "qwen3_moe":
        inter = raw["moe_intermediate_size"]
        cfg.update(decoder_sparse_step=raw.get("decoder_sparse_step", 1), mlp_only_layers=raw.get("mlp_only_layers") or [],
                   norm_topk_prob=bool(raw.get("norm_topk_prob", False)), intermediate_size=raw.get("intermediate_size"))
    else:  # mixtral: expert width is `intermediate_size` (v4); read it off the weights to be sure
        inter = tensors.shape("model.layers.0.block_sparse_moe.experts.0.w1.weight")[0]
        cfg.update(norm_topk_prob=True)  # softmax(top-k logits) == Mixtral's routing
    cfg.update(num_experts=E, num_fusion_experts=0, num_experts_per_tok=raw["num_experts_per_tok"],
               moe_intermediate_size=inter, num_shared_experts=0, shared_expert_intermediate_size=0)
    return cfg


_MIXTRAL = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def sanitize(name: str, t: torch.Tensor, cfg: M3Config) -> Iterator[tuple[str, torch.Tensor]]:
    """One source tensor -> zero or more M3 tensors (spec section 6 names)."""
    if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and cfg.tie_word_embeddings):
        return
    m = re.match(r"model\.layers\.(\d+)\.block_sparse_moe\.(.*)", name)
    if m:  # Mixtral
        i, rest = m.groups()
        e = re.match(r"experts\.(\d+)\.(w[123])\.weight", rest)
        if e:
            yield f"model.layers.{i}.mlp.experts.{e[1]}.{_MIXTRAL[e[2]]}.weight", t
        else:
            yield f"model.layers.{i}.mlp.{rest}", t
        return
    m = re.match(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$", name)
    if m:  # transformers v5 fused in-memory layout: [E, 2I, H] / [E, H, I]
        i, kind = m.groups()
        for e in range(t.shape[0]):
            if kind == "down_proj":
                yield f"model.layers.{i}.mlp.experts.{e}.down_proj.weight", t[e]
            else:
                g, u = t[e].chunk(2, dim=0)
                yield f"model.layers.{i}.mlp.experts.{e}.gate_proj.weight", g
                yield f"model.layers.{i}.mlp.experts.{e}.up_proj.weight", u
        return
    m = re.match(r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight", name)
    if m:  # a dense MLP is the spec's shared expert
        yield f"model.layers.{m[1]}.mlp.shared_experts.{m[2]}.weight", t
        return
    yield name, t


def import_hf(src: str | Path, out: str | Path, force: bool = False,
              progress: Callable[[str, int, int], None] | None = None) -> Path:
    src = Path(src)
    if not (src / "config.json").exists():
        raise ImportSourceError(f"'{src}' is not a Hugging Face checkpoint directory (no config.json)")
    raw = read_json(src / "config.json", "config.json")
    if raw.get("model_type") == "m3lite":
        raise ImportSourceError(f"'{src}' is already an M3 checkpoint; nothing to import")
    if raw.get("model_type") not in DENSE + MOE:
        raise ImportSourceError(f"'{src}' holds a '{raw.get('model_type')}' model; m3edge imports "
                                f"{', '.join(DENSE + MOE)} checkpoints")
    if not any(src.glob("*.safetensors")):
        what = "pytorch_model.bin (pickle)" if any(src.glob("*.bin")) else "no weight files"
        raise ImportSourceError(f"'{src}' has {what}; m3edge imports safetensors only")
    try:
        files = TensorFiles(src)
    except CheckpointError as e:
        raise ImportSourceError(str(e)) from None
    cfg_dict = convert_config(raw, files)
    cfg = M3Config.from_dict(cfg_dict)
    want = expected_tensors(cfg)
    names = files.names()
    side = {f: (src / f).read_text() for f in SIDE_FILES if (src / f).exists()}
    with CheckpointWriter(out, overwrite=force) as w:
        seen: set[str] = set()
        for k, name in enumerate(names):
            for new, t in sanitize(name, files.get(name), cfg):
                if new not in want:
                    raise ImportSourceError(f"'{src}': tensor '{name}' has no place in the M3 layout (as '{new}')")
                if tuple(t.shape) != want[new]:
                    raise ImportSourceError(f"'{src}': tensor '{name}' has shape {list(t.shape)}, "
                                            f"its config implies {list(want[new])}")
                w.add(new, t.to(cfg.dtype))
                seen.add(new)
            if progress:
                progress(name, k + 1, len(names))
        missing = [n for n in want if n not in seen]
        if missing:
            raise ImportSourceError(f"'{src}' lacks tensor(s) for '{missing[0]}'" +
                                    (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        out_dir = w.finish(cfg_dict, side)
    validate(cfg, TensorFiles(out_dir))
    return out_dir


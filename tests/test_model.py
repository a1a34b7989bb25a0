"""Tiny M3-Lite: cache, batching, fusion rule, per-modality routers, M-RoPE, config and params."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from m3edge.errors import ConfigError
from m3edge.model.checkpoint import load_model
from m3edge.model.m3lite import KVCache, M3Config, count_params, rope_cos_sin, rope_inv_freq
from m3edge.model.synth import PRESETS, preset_config
from m3edge.prompt import Image, build_prompt, collate


@pytest.fixture(scope="module")
def model(tiny_dir):
    m = load_model(tiny_dir)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # synth's N(0, 0.02) gives near-uniform routing; sharpen it so routing matters
        for layer in m.layers:
            for r in layer.mlp.routers:
                r.weight.copy_(torch.randn(r.weight.shape, generator=g))
    return m


def media_prompt(cfg, text_a, text_b, grid=(2, 3), n_audio=4, seed=0):
    """text_a <image> text_b <audio> as ids, with random patches / audio features."""
    rng = np.random.default_rng(seed)
    ids = (text_a + [cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id] + text_b
           + [cfg.audio_start_token_id, cfg.audio_token_id, cfg.audio_end_token_id] + [5, 6])
    img = Image(rng.uniform(-1, 1, (grid[0] * grid[1], 3072)).astype(np.float32), grid)
    aud = rng.normal(size=(n_audio, 1024)).astype(np.float32)
    return build_prompt(ids, cfg, [img], [aud])


def run(model, p, cache=None):
    return model(p.input_ids[None], p.position_ids[:, None], p.image_patches, p.audio_features, cache=cache)


def test_prompt_expansion_and_positions(model):
    cfg = model.cfg
    p = media_prompt(cfg, [1, 2], [3], grid=(2, 3), n_audio=4)
    ids = p.input_ids.tolist()
    assert ids.count(cfg.image_token_id) == 6 and ids.count(cfg.audio_token_id) == 4
    # text 0,1; vision_start 2; image grid 2x3 at p=3: t=3, h=3+row, w=3+col; then p = 3 + max(2,3) = 6
    img = [i for i, t in enumerate(ids) if t == cfg.image_token_id]
    assert p.position_ids[:, img].T.tolist() == [[3, 3, 3], [3, 3, 4], [3, 3, 5], [3, 4, 3], [3, 4, 4], [3, 4, 5]]
    after = img[-1] + 1  # vision_end
    assert p.position_ids[:, after].tolist() == [6, 6, 6]
    aud = [i for i, t in enumerate(ids) if t == cfg.audio_token_id]
    assert [p.position_ids[0, i].item() for i in aud] == [9, 10, 11, 12]
    assert (p.position_ids[0, aud] == p.position_ids[1, aud]).all()
    assert p.next_position == 12 + 1 + 1 + 2  # audio_end, two text tokens


def test_cache_equals_full_forward(model):
    p = media_prompt(model.cfg, [1, 2, 3], [4, 5])
    with torch.no_grad():
        full = run(model, p)
        cache = KVCache(model.cfg.num_hidden_layers)
        n = len(p) - 3
        first = model(p.input_ids[None, :n], p.position_ids[:, None, :n], p.image_patches, p.audio_features,
                      cache=cache)
        steps = [first] + [model(p.input_ids[None, i:i + 1], cache=cache) for i in range(n, len(p))]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    assert cache.seen_nontext.tolist() == [True]


def test_batch_of_two_equals_each_alone(model):
    cfg = model.cfg
    a = media_prompt(cfg, [1, 2, 3, 4, 5, 6, 7], [8], grid=(2, 2), n_audio=3, seed=1)
    b = build_prompt([9, 10, 11], cfg)
    batch = collate([a, b], cfg.pad_token_id)
    with torch.no_grad():
        cache = KVCache(cfg.num_hidden_layers)
        got = model(batch["input_ids"], batch["position_ids"], batch["image_patches"], batch["audio_features"],
                    cache=cache, attention_mask=batch["attention_mask"])
        step = model(torch.tensor([[20], [21]]), cache=cache)
        for i, p in enumerate((a, b)):
            c = KVCache(cfg.num_hidden_layers)
            alone = run(model, p, cache=c)
            assert torch.allclose(got[i, -len(p):], alone[0], atol=1e-5)
            assert torch.allclose(step[i], model(torch.tensor([[20 + i]]), cache=c)[0], atol=1e-5)


def test_fusion_experts_only_after_nontext(model):
    cfg = model.cfg
    E, F = cfg.num_experts, cfg.num_fusion_experts
    text = list(range(1, 200))
    logs = [layer.mlp for layer in model.layers]
    for mlp in logs:
        mlp.routing_log = []
    with torch.no_grad():
        run(model, build_prompt(text, cfg))
        text_only = [mlp.routing_log.pop()[0] for mlp in logs]
        p = build_prompt([cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id] + text, cfg,
                         [Image(np.zeros((1, 3072), np.float32), (1, 1))])
        run(model, p)
        after_image = [mlp.routing_log.pop()[0] for mlp in logs]
    for mlp in logs:
        mlp.routing_log = None
    assert all((idx < E - F).all() for idx in text_only), "a text-only prompt reached a fusion expert"
    fusion_hits = sum(int((idx[0, 3:] >= E - F).sum()) for idx in after_image)
    assert fusion_hits > 0, "no text token after the image used a fusion expert"


def test_each_modality_uses_its_own_router(model):
    """Perturbing one router changes logits only from that modality's first token on."""
    cfg = model.cfg
    p = media_prompt(cfg, [1, 2, 3], [4, 5, 6], seed=3)
    ids = p.input_ids.tolist()
    first = {1: ids.index(cfg.image_token_id), 2: ids.index(cfg.audio_token_id), 0: 0}
    with torch.no_grad():
        base = run(model, p)[0]
        for m in (0, 1, 2):
            routers = [layer.mlp.routers[m] for layer in model.layers]
            saved = [r.weight.clone() for r in routers]
            for r in routers:
                r.weight.mul_(-1)  # reverses that router's expert ranking
            changed = (run(model, p)[0] - base).abs().amax(-1) > 1e-6  # [S]
            for r, w in zip(routers, saved):
                r.weight.copy_(w)
            assert not changed[:first[m]].any(), f"router {m} changed logits before its first token"
            assert changed[first[m]], f"router {m} is not used by its own modality"
            mod = model.modality(p.input_ids)
            if m == 1:  # image router: text tokens between image and audio change only through attention
                assert changed[mod == 1].all()


def test_mrope_is_1d_rope_on_text(model):
    cfg = model.cfg
    plain = dataclasses.replace(cfg, rope_scaling=None)
    inv = rope_inv_freq(cfg)
    pos = torch.arange(50)[None].expand(1, 50)
    c1, s1 = rope_cos_sin(cfg, inv, pos[None].expand(3, 1, 50), torch.float32)
    c2, s2 = rope_cos_sin(plain, inv, pos[None].expand(3, 1, 50), torch.float32)
    assert torch.equal(c1, c2) and torch.equal(s1, s2)
    # and the sections are used when t, h, w differ: H slots 1,4; W slots 2,5; T the rest
    tpos = torch.stack([torch.full((1, 1), 7), torch.full((1, 1), 11), torch.full((1, 1), 13)])
    c, _ = rope_cos_sin(cfg, inv, tpos, torch.float64)
    expect = [7, 11, 13, 7, 11, 13, 7, 7]
    assert torch.allclose(c[0, 0, :8], torch.cos(torch.tensor(expect, dtype=torch.float64) * inv.double()), atol=1e-6)


def test_lite_parameter_counts():
    total, active = count_params(M3Config.from_dict(PRESETS["lite-24g"]))
    assert abs(total / 1e9 - 32.12) < 0.01
    assert 7.85 < active / 1e9 < 8.0  # spec: ~7.92B active
    total16, _ = count_params(M3Config.from_dict(PRESETS["lite-16g"]))
    assert abs(total16 / 1e9 - 22.45) < 0.01


@pytest.mark.parametrize("key,value,needle", [
    ("hidden_size", -64, "hidden_size must be a positive integer"),
    ("num_key_value_heads", 3, "multiple of num_key_value_heads"),
    ("num_experts_per_tok", 7, "num_experts_per_tok"),
    ("torch_dtype", "int8", "torch_dtype"),
    ("rope_scaling", {"rope_type": "default", "mrope_section": [4, 2, 1]}, "mrope_section"),
])
def test_config_rejects_bad_values(key, value, needle):
    raw = copy.deepcopy(preset_config("tiny"))
    raw[key] = value
    with pytest.raises(ConfigError, match=needle):
        M3Config.from_dict(raw)


def test_config_ignores_unknown_keys_and_requires_sizes():
    raw = preset_config("tiny")
    assert M3Config.from_dict({**raw, "some_future_flag": 3}).hidden_size == 64
    del raw["vocab_size"]
    with pytest.raises(ConfigError, match="vocab_size"):
        M3Config.from_dict(raw)

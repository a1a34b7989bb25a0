"""End of speech to first answer token, on the CPU, with a SmolLM2-sized M3-Lite (one run, one table).

SmolLM2-135M takes no audio, so the model here is an M3-Lite of SmolLM2's shape (hidden 576, 30
layers, 9/3 heads of 64, vocab 49152; 8 experts of 768 + a shared one of 768, top-2: 445M in all, ~170M active)
with random weights and M3-Lite's audio embedder, written to a temp dir. For each utterance
(espeak-ng speech, then silence) the real capture path runs: device-rate audio (44.1 kHz) ->
StreamResampler -> Silero VAD endpointer -> log-mel -> prefill -> first token. Columns:

- hang-over: audio time from the true end of speech to the endpoint (min_silence_s plus the
  VAD's window grid); at a live mic this is wall time too.
- compute: wall time from the endpoint to the first token (frontend + prefill + sample).
- end-of-speech -> first token: the sum, what a user waits.

    python bench/live_latency.py [--threads 2] [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from capture_fixtures import DEVICE_RATE, speech, true_segments  # noqa: E402

SENTENCES = ["Hello there.", "What is on the table in front of me?",
             "Could you tell me, in a few words, what the weather looks like outside this window today?"]


def smol_sized(out: Path) -> Path:
    from m3edge.model.synth import preset_config, write_random

    cfg = preset_config("tiny")
    cfg.update(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, head_dim=64, num_experts=8, num_fusion_experts=2, num_experts_per_tok=2,
               moe_intermediate_size=768, shared_expert_intermediate_size=768, torch_dtype="float32",
               rope_scaling={"rope_type": "default", "mrope_section": [16, 8, 8], "mrope_interleaved": True})
    return write_random(cfg, out, ids="tiny", seed=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from m3edge.capture import Endpointer, Utterance
    from m3edge.frontends.audio import StreamResampler
    from m3edge.runtime.engine import Engine
    from m3edge.runtime.sampling import SamplingParams

    tmp = Path(tempfile.mkdtemp(prefix="m3edge-live-"))
    engine = Engine.load(smol_sized(tmp / "m3-smol"), backend="torch")
    n_params = sum(p.numel() for p in engine.backend.model.parameters()) / 1e6
    rows = []
    block = int(DEVICE_RATE * 0.032)
    for text in SENTENCES:
        x = np.concatenate([np.zeros(DEVICE_RATE // 2), speech(text, tmp), np.zeros(DEVICE_RATE)])
        true_end = true_segments(x, DEVICE_RATE)[-1][1]
        hang, comp = [], []
        for _ in range(args.reps + 1):  # the first run warms up
            ep, rs = Endpointer(), StreamResampler(DEVICE_RATE, 16000)
            utt, t_end, consumed = None, 0.0, 0
            for i in range(0, len(x), block):  # device blocks, as the PortAudio callback delivers them
                consumed = i + block
                evs = [e for e in ep.push(rs.push(x[i : i + block]).astype(np.float32)) if isinstance(e, Utterance)]
                if evs:
                    utt, t_end = evs[0], time.perf_counter()
                    break
            assert utt is not None, "no utterance found"
            chat = engine.chat()
            first = next(chat.send([{"type": "audio", "audio": utt.audio, "sampling_rate": 16000}],
                                   SamplingParams(max_tokens=1)))
            comp.append(time.perf_counter() - t_end)
            hang.append(min(consumed, len(x)) / DEVICE_RATE - true_end)
            assert first.generated_tokens == 1
        hang, comp = hang[1:], comp[1:]
        n_tok = int(np.ceil(len(utt.audio) / 1280)) + 3  # audio tokens (80 ms each) + markers + template
        rows.append((text, len(utt.audio) / 16000, n_tok, statistics.median(hang), statistics.median(comp)))
    print(f"\nSmolLM2-sized M3-Lite ({n_params:.0f}M params), torch CPU backend, {args.threads} threads, "
          f"median of {args.reps}; VAD min_silence {Endpointer().min_silence_s:.2f} s\n")
    print("| utterance | audio s | ~prompt tokens | hang-over ms | compute ms | end-of-speech -> first token ms |")
    print("|---|---|---|---|---|---|")
    for text, dur, n_tok, h, c in rows:
        print(f"| {text[:40]} | {dur:.2f} | {n_tok} | {h * 1000:.0f} | {c * 1000:.0f} | {(h + c) * 1000:.0f} |")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()

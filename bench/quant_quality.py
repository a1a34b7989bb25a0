"""Quantization quality on SmolLM2-135M-Instruct: one run, one table.

Rows: bf16 weights, int8 g128, int4 RTN g32 / g64 / g128, GPTQ g128 (alone and followed by
`--tune-scales 2`, quantize/tune.py), GPTQ g64, AWQ g128 (m3edge quantize),
and bitsandbytes NF4 (blocksize 64, its default) as the outside baseline. Columns: perplexity on a
held-out text (m3edge's stated rule: non-overlapping 512-token windows, no BOS for SmolLM2), the
size of the linear layers' weights on disk, quantize time and the quantizing process's peak RSS.
"gap closed" is the share of the same-group RTN row's perplexity gap to bf16 that a method removes.
`awq` and `gptq` scale up rows -> down and v rows -> o by AWQ's search; `gptq` runs GPTQ on AWQ's
scaled weights and activation-aware grid (see quantize/pipeline.py).

SmolLM2's hidden size is 576 = 4.5 x 128, so g128 rows use --partial-groups (the last group of
each 576-wide row holds 64 inputs); g32 and g64 divide every layer.

    pip install -e ".[bench]"; python bench/quant_quality.py [--text /usr/share/common-licenses/GPL-3] [--work /tmp/qq]
    [--resume]  # after a crash: keep the rows already measured
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

BIN = str(Path(sys.executable).parent / "m3edge")

ROWS = [  # name, quantize args (None = not produced by m3edge quantize)
    ("bf16", None),
    ("int8 g128", ["--bits", "8", "--group", "128", "--partial-groups"]),
    ("int4 RTN g32", ["--bits", "4", "--group", "32"]),
    ("int4 RTN g64", ["--bits", "4", "--group", "64"]),
    ("int4 RTN g128", ["--bits", "4", "--group", "128", "--partial-groups"]),
    ("int4 GPTQ g128", ["--bits", "4", "--group", "128", "--partial-groups", "--method", "gptq", "--act-order"]),
    ("int4 GPTQ+tune g128", ["--bits", "4", "--group", "128", "--partial-groups", "--method", "gptq", "--act-order",
                             "--tune-scales", "2"]),
    ("int4 GPTQ g64", ["--bits", "4", "--group", "64", "--method", "gptq", "--act-order"]),
    ("int4 AWQ g128", ["--bits", "4", "--group", "128", "--partial-groups", "--method", "awq"]),
    ("bnb NF4 b64", None),
]


def timed(cmd: list[str]) -> tuple[float, int]:
    """Run cmd in a child that reports its own child's peak RSS: (seconds, peak bytes)."""
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]);"
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr}")
    return time.perf_counter() - t0, int(r.stdout.strip().splitlines()[-1]) * 1024


def linear_bytes(model_dir: Path) -> int:
    """Bytes of the decoder's linear weights as stored (packed ints + scales + zeros, or floats)."""
    from m3edge.model.checkpoint import TensorFiles

    f = TensorFiles(model_dir)
    return sum(f.nbytes(n) for n in f.names() if ".layers." in n and "_proj." in n)


def ppl(model, tok, ids) -> float:
    from m3edge.eval import perplexity

    return perplexity(model, tok, ids).ppl


def nf4_row(src: Path, tok, ids) -> tuple[float, int, float, int]:
    """bitsandbytes NF4 (its quantize_4bit / dequantize_4bit, blocksize 64) on every decoder linear."""
    import bitsandbytes.functional as bnbf

    from m3edge.model.checkpoint import load_model

    t0 = time.perf_counter()
    m = load_model(src, dtype=torch.float32)
    size = 0
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("layers.") and p.dim() == 2:  # the decoder linears (SmolLM2 is dense)
                q, state = bnbf.quantize_4bit(p.data.to(torch.bfloat16), blocksize=64, quant_type="nf4")
                p.copy_(bnbf.dequantize_4bit(q, state).float())
                size += q.numel() * q.element_size() + state.absmax.numel() * state.absmax.element_size()
    secs = time.perf_counter() - t0
    return ppl(m, tok, ids), size, secs, 0  # runs inside this process: no RSS of its own to report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3", help="held-out text")
    ap.add_argument("--work", default="/tmp/m3edge-quant-quality", help="scratch directory")
    ap.add_argument("--only", nargs="*", help="row names to run (default: all)")
    ap.add_argument("--resume", action="store_true", help="keep the rows WORK/results.json already holds "
                                                          "(same text) and run the rest")
    args = ap.parse_args()

    from m3edge.eval import text_ids
    from m3edge.model.checkpoint import load_model
    from m3edge.model.importers import import_checkpoint
    from m3edge.model.tokenizer import Tokenizer

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    src = work / "smollm2"
    if not (src / "config.json").exists():
        import_checkpoint(None, src, force=src.exists(), dequantize=True)  # the float weights quantize reads
    tok = Tokenizer.from_dir(src)
    ids = text_ids(tok, args.text)
    saved = work / "results.json"
    done = {}
    if args.resume and saved.exists() and json.loads(saved.read_text())["text"] == args.text:
        done = {r[0]: r for r in json.loads(saved.read_text())["rows"]}
    results = []
    for name, qargs in ROWS:
        if args.only and name not in args.only:
            continue
        if name in done:
            results.append(done[name])
            continue
        if name == "bf16":
            m = load_model(src, dtype=torch.float32)
            with torch.no_grad():
                for p in m.parameters():
                    p.copy_(p.to(torch.bfloat16).float())
            size = linear_bytes(src) // 2  # fp32 on disk; bf16 is half
            row = (ppl(m, tok, ids), size, 0.0, 0)
        elif name.startswith("bnb"):
            row = nf4_row(src, tok, ids)
        else:
            out = work / name.replace(" ", "_")
            secs, peak = timed([BIN, "quantize", str(src), "--out", str(out), "--force", *qargs])
            row = (ppl(load_model(out, dtype=torch.float32), tok, ids), linear_bytes(out), secs, peak)
        results.append((name, *row))
        print(f"{name}: ppl {row[0]:.3f}", file=sys.stderr, flush=True)
        saved.write_text(json.dumps({"text": args.text, "tokens": len(ids), "rows": results}, indent=1))  # each row
    print_table(results, args.text, len(ids))


def print_table(results: list, text: str, n_tokens: int) -> None:
    base = next((r[1] for r in results if r[0] == "bf16"), None)
    rtn = {r[0].split()[-1]: r[1] for r in results if r[0].startswith("int4 RTN")}  # group -> ppl
    print(f"\nSmolLM2-135M-Instruct, {n_tokens} tokens of {text}, 512-token windows, no BOS\n")
    print(f"| {'variant':<15} | {'ppl':>8} | {'vs bf16':>8} | {'gap closed':>10} | {'linears':>9} | "
          f"{'quantize':>8} | {'peak RSS':>8} |")
    print(f"|{'-' * 17}|{'-' * 10}|{'-' * 10}|{'-' * 12}|{'-' * 11}|{'-' * 10}|{'-' * 10}|")
    for name, p, size, secs, peak in results:
        rel = f"{100 * (p / base - 1):+.2f}%" if base else "-"
        r = rtn.get(name.split()[-1])
        closed = f"{100 * (r - p) / (r - base):.1f}%" if base and r and ("GPTQ" in name or "AWQ" in name) else ""
        rss = f"{peak / 2**20:5.0f} MiB" if peak else "-"
        print(f"| {name:<15} | {p:8.3f} | {rel:>8} | {closed:>10} | {size / 2**20:6.1f} MiB | "
              f"{secs:6.1f} s | {rss:>8} |")


if __name__ == "__main__":
    main()

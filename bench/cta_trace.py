"""Summary of the CTA timelines that bench/cta_trace.cu writes (trace_<case>.csv, one line per CTA).

    python3 bench/cta_trace.py DIR [--timeline CASE] [--pairs CASE]

Per case: the calls of the traced replay (a CTA's call is the k-th time its (launch, block) starts),
the period from one call's first CTA to the next one's, and per launch (epi 0 GEMM, 1 gate+up, 2 down)
the median of each CTA phase: waiting (entry to its wait done), prologue (to the K loop), K loop,
epilogue (stores), and how many CTAs were resident. The decode attention (epi 3; 4 for the kv heads'
last CTAs, which merge the chunks): prologue = the token's rows, q / k norms and RoPE, "loop" = the
chunk's attention, epilogue = the partial's store and the arrival count (and the merge, epi 4).
--timeline CASE prints one middle call in 1-us bins: CTAs resident, CTAs in their K loop, and the
weight bytes their K loops stream (each CTA's bytes spread evenly over its loop), as GB/s. --pairs CASE
prints a one-token MoE call per pair: when each pair's gate+up CTAs end and its down CTAs wait, stream
and end.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path
from statistics import median

PHASES = ("wait", "prologue", "loop", "epilogue")


def load(path: Path) -> list[dict]:
    with path.open() as f:
        rows = [{k: int(v) for k, v in r.items()} for r in csv.DictReader(f)]
    t0 = min(r["t_entry"] for r in rows)
    for r in rows:
        for k in ("t_entry", "t_wait", "t_loop", "t_loop_end", "t_exit"):
            r[k] = (r[k] - t0) / 1e3  # us
    seen: dict[tuple, int] = defaultdict(int)
    for r in sorted(rows, key=lambda r: r["t_entry"]):
        key = (min(r["epi"], 3), r["bx"], r["by"])  # (attention's merging CTA, epi 4, is a CTA of epi 3)
        r["call"] = seen[key]
        seen[key] += 1
    return rows


def phases(r: dict) -> dict:
    return {"wait": r["t_wait"] - r["t_entry"], "prologue": r["t_loop"] - r["t_wait"],
            "loop": r["t_loop_end"] - r["t_loop"], "epilogue": r["t_exit"] - r["t_loop_end"],
            "total": r["t_exit"] - r["t_entry"]}


def summary(name: str, rows: list[dict]) -> None:
    calls = sorted({r["call"] for r in rows})
    starts = [min(r["t_entry"] for r in rows if r["call"] == c) for c in calls]
    ends = [max(r["t_exit"] for r in rows if r["call"] == c) for c in calls]
    mid = calls[1:-1] or calls
    period = median(b - a for a, b in zip(starts, starts[1:])) if len(starts) > 1 else float("nan")
    span = median(ends[c] - starts[c] for c in mid)
    print(f"{name}: {len(calls)} calls, {len(rows) // len(calls)} CTAs a call; start to start {period:.1f} us, "
          f"first entry to last exit {span:.1f} us")
    for epi in sorted({r["epi"] for r in rows}):
        rs = [r for r in rows if r["epi"] == epi and r["call"] in mid]
        ph = [phases(r) for r in rs]
        sms = len({r["sm"] for r in rs})
        first = median(min(r["t_entry"] for r in rs if r["call"] == c) - starts[c] for c in mid)
        last = median(max(r["t_exit"] for r in rs if r["call"] == c) - starts[c] for c in mid)
        print(f"  epi {epi}: {len(rs) // len(mid)} CTAs a call on {sms} SMs, first entry +{first:.1f}, last exit "
              f"+{last:.1f} us; median " + ", ".join(f"{p} {median(x[p] for x in ph):.2f}" for p in PHASES + ("total",))
              + f"; max loop {max(x['loop'] for x in ph):.2f}")


def timeline(rows: list[dict], nbytes: dict[int, float]) -> None:
    calls = sorted({r["call"] for r in rows})
    c = calls[len(calls) // 2]
    rs = [r for r in rows if r["call"] == c]
    t0 = min(r["t_entry"] for r in rs)
    t1 = max(r["t_exit"] for r in rs)
    print(f"call {c}: us from its first entry | CTAs resident (gemm/gate+up/down) | in K loop | GB/s streamed")
    b = 0.0
    while t0 + b < t1:
        lo, hi = t0 + b, t0 + b + 1
        res = [sum(1 for r in rs if r["epi"] == e and r["t_entry"] < hi and r["t_exit"] > lo) for e in (0, 1, 2)]
        loop = sum(1 for r in rs if r["t_loop"] < hi and r["t_loop_end"] > lo)
        gbs = 0.0
        for r in rs:
            d = r["t_loop_end"] - r["t_loop"]
            ov = min(hi, r["t_loop_end"]) - max(lo, r["t_loop"])
            if d > 0 and ov > 0:
                gbs += nbytes.get(r["epi"], 0.0) * ov / d
        print(f"{b:5.0f} | {res[0]:4d} {res[1]:4d} {res[2]:4d} | {loop:4d} | {gbs / 1e3:6.0f}")
        b += 1


def pairs(rows: list[dict]) -> None:
    """One middle call of a one-token MoE case, per CTA row (blockIdx.y: a pair, in dispatch order):
    gate+up's first entry and last exit, then down's first entry and the medians of its CTAs' wait
    done, K loop start and end, and its last exit, in us from the call's first entry."""
    calls = sorted({r["call"] for r in rows})
    c = calls[len(calls) // 2]
    rs = [r for r in rows if r["call"] == c]
    t0 = min(r["t_entry"] for r in rs)
    print(f"call {c}, per CTA row (us from its first entry): gate+up first entry / last exit | down first entry, "
          "median wait done / loop start / loop end, last exit")
    for y in sorted({r["by"] for r in rs}):
        gu = [r for r in rs if r["epi"] == 1 and r["by"] == y]
        dn = [r for r in rs if r["epi"] == 2 and r["by"] == y]
        if not gu or not dn:
            continue
        print(f"{y:3d} | {min(r['t_entry'] for r in gu) - t0:6.1f} {max(r['t_exit'] for r in gu) - t0:6.1f} | "
              f"{min(r['t_entry'] for r in dn) - t0:6.1f} {median(r['t_wait'] for r in dn) - t0:6.1f} "
              f"{median(r['t_loop'] for r in dn) - t0:6.1f} {median(r['t_loop_end'] for r in dn) - t0:6.1f} "
              f"{max(r['t_exit'] for r in dn) - t0:6.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--timeline", action="append", default=[], help="a case to print in 1-us bins (repeatable)")
    ap.add_argument("--pairs", action="append", default=[], help="a one-token MoE case to print per pair (repeatable)")
    args = ap.parse_args()
    cases = {p.stem[len("trace_"):]: load(p) for p in sorted(args.dir.glob("trace_*.csv"))}
    for name, rows in cases.items():
        summary(name, rows)
    # weight bytes per CTA of each launch (int4 g128, bf16 scales): M3-Lite experts, and the GEMM cases
    # by their name (K x N over the CTAs of a call)
    for name in args.timeline:
        rows = cases[name]
        n_ctas = defaultdict(int)
        for r in rows:
            if r["call"] == 0:
                n_ctas[r["epi"]] += 1
        if name.startswith("moe"):
            slots = int(name[3:].split("_")[0])
            per = {1: slots * 6.49e6 / n_ctas[1], 2: slots * 3.24e6 / n_ctas[2]}
        else:
            k, n = (int(v) for v in name.split("_")[1].split("x"))
            per = {0: (k * n / 2 + k * n / 64) / n_ctas[0]}
        timeline(rows, per)
    for name in args.pairs:
        pairs(cases[name])


if __name__ == "__main__":
    main()

"""W4A16 GEMM benchmark: ours vs cuBLAS fp16 (torch.matmul), torch's tinygemm int4 and bitsandbytes NF4, one table.

Run on the GPU machine (one run; L2 flushed before every timed call):
    PYTHONPATH=. python3 bench/kernels.py [--out DIR]

Shapes (K x N) from the issue: 4096x6144, 4096x4096, 4096x14336, 14336x4096 and the M3-Lite expert
projections 4096x1536 (gate or up) and 1536x4096 (down), M = 1, 4, 16, 64, 256, 1024. Ours and
tinygemm use int4 weights, group 128, bf16 scales, bf16 activations; cuBLAS uses fp16 [N, K] weights.
GB/s counts the bytes each kernel must move at least once (weights + scales + x + out); % copy is
that over a device-to-device copy measured in the same run (bytes read + written). bitsandbytes NF4
(the issue's third baseline; blocksize 64, bf16 weights and activations) runs where `import
bitsandbytes` works: the GPU machine has no copy, so carry its wheel there (`pip download --no-deps
--only-binary=:all: --python-version 3.12 --platform manylinux_2_24_x86_64 bitsandbytes==0.50.2`, 43 MB,
with libbitsandbytes_cuda130) and put it on PYTHONPATH; without it the NF4 columns read nan. Before the table:
what each timing method costs an empty kernel and an 8 MiB copy (the floor under the M = 1 times),
and a sweep of the plan against forced kernels, N tiles and split counts (n_tile 128 = tile kernel).

    PYTHONPATH=. python3 bench/kernels.py --moe [--out DIR]

is the fused MoE section instead (`moe_bench`): the M3-Lite routed experts, T = 1..256 tokens.

    PYTHONPATH=. python3 bench/kernels.py --w8 [--out DIR]

is the W8A16 section (`w8_bench`): symmetric int8 in one pass against the two int4 passes it replaces
and cuBLAS fp16, M = 1 and 4, the shapes above and the M3-Lite lm_head (4096x151936).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from m3edge.runtime import native

SHAPES = [(4096, 6144), (4096, 4096), (4096, 14336), (14336, 4096), (4096, 1536), (1536, 4096)]
MS = [1, 4, 16, 64, 256, 1024]
GROUP = 128
FLUSH = torch.empty(0)
FLUSH_MODE = "read"


def flush_l2() -> None:
    """Evict L2 (50 MB on the H100) by touching 256 MB. "read" sums it, leaving clean lines; "write"
    zeroes it, leaving ~50 MB of dirty lines that the timed kernel's misses must write back first
    (a cost of the flush, not of the kernel: it added ~5-10 us to every kernel here, see NOTES.md)."""
    if FLUSH_MODE == "write":
        FLUSH.zero_()
    else:
        FLUSH.sum(dtype=torch.int32)


def timed(fn, reps: int = 40, warmup: int = 5) -> float:
    """Median microseconds of fn over reps, each after an L2 flush, timed by events."""
    for _ in range(warmup):
        fn()
    ev = []
    for _ in range(reps):
        flush_l2()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        ev.append((s, e))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in ev) * 1e3


def save_results(out: Path | None, rows, table: str) -> None:
    """results.json (the rows) and table.md under `out` (made), when it is given."""
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(rows, indent=1))
        (out / "table.md").write_text(table + "\n")


def graph_us(call, n_sets: int, reps: int = 5) -> float:
    """Steady-state microseconds per call: call(i) for i over n_sets weight sets (together more than
    twice the L2, so every call reads its weights from DRAM) captured in one CUDA graph and replayed;
    launch latency overlaps the previous call, as in a decode loop run from a graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(n_sets):
            call(i)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(2):
            for i in range(n_sets):
                call(i)
    g.replay()
    torch.cuda.synchronize()
    s_, e_ = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s_.record()
    for _ in range(reps):
        g.replay()
    e_.record()
    torch.cuda.synchronize()
    return s_.elapsed_time(e_) * 1e3 / (reps * 2 * n_sets)


def try_graph_us(call, n_sets: int) -> float:
    try:
        return graph_us(call, n_sets)
    except Exception as e:  # noqa: BLE001 - a baseline that cannot be captured: say so, keep the run going
        print(f"graph capture failed: {type(e).__name__}: {e}")
        torch.cuda.synchronize()
        return float("nan")


def n_sets_for(nbytes: int) -> int:
    return max(2, -(-(120 << 20) // nbytes))


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy, bytes read + written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    us = timed(lambda: dst.copy_(src), reps=10, warmup=2)
    return 2 * src.numel() / us / 1e3


def our_weights(n: int, k: int) -> native.W4Weights:
    packed = torch.randint(-(2**31), 2**31 - 1, (n, k // 8), dtype=torch.int32, device="cuda")
    scale = (torch.rand(n, k // GROUP, device="cuda") * 0.02 + 0.001).to(torch.bfloat16)
    return native.W4Weights(native.repack_weight(packed, n, k), native._by_slab(scale), None, None, n, k, GROUP)


def tinygemm(n: int, k: int):
    """(run(x), note): torch._weight_int4pack_mm on [N, K/2] uint8 nibbles, group 128, or (None, why)."""
    try:
        w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
        wp = torch._convert_weight_to_int4pack(w, 8)
        sz = torch.rand(k // GROUP, n, 2, device="cuda").to(torch.bfloat16)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        torch._weight_int4pack_mm(x, wp, GROUP, sz)
        return (lambda x: torch._weight_int4pack_mm(x, wp, GROUP, sz)), ""
    except Exception as e:  # noqa: BLE001 - the API differs across torch versions
        return None, f"{type(e).__name__}: {e}"


def nf4(n: int, k: int):
    """(run(x), note): bitsandbytes NF4 (blocksize 64) of a random bf16 [N, K] weight, x bf16, or (None, why)."""
    try:
        import bitsandbytes as bnb

        wq, state = bnb.functional.quantize_4bit(torch.randn(n, k, device="cuda", dtype=torch.bfloat16),
                                                 blocksize=64, quant_type="nf4")
        bnb.matmul_4bit(torch.randn(1, k, device="cuda", dtype=torch.bfloat16), wq, quant_state=state)
        return (lambda x: bnb.matmul_4bit(x, wq, quant_state=state)), ""
    except Exception as e:  # noqa: BLE001 - not installed, or its CUDA library does not load: say so
        return None, f"{type(e).__name__}: {e}"


def baseline_sets(make, label: str, n: int, k: int, count: int):
    """count instances of an int4 baseline (make(n, k) -> (run(x), why): tinygemm, nf4) for the graph
    method's rotation, or None when it is unavailable here (said why, once)."""
    first, why = make(n, k)
    if first is None:
        print(f"{label} unavailable for {k}x{n}: {why}")
        return None
    return [first] + [make(n, k)[0] for _ in range(count - 1)]


def baseline_us(runs, x: torch.Tensor) -> tuple[float, float]:
    """(flushed, graph) us of a baseline_sets result on x: the first instance, then all in turn; nan
    without the baseline."""
    if runs is None:
        return float("nan"), float("nan")
    return timed(lambda: runs[0](x)), try_graph_us(lambda i: runs[i](x), len(runs))


def w8_planes(n: int, k: int) -> tuple[native.W4Weights, native.W4Weights]:
    """A random symmetric int8 weight as its two int4 planes (runtime/cuda.py split_int8: the high
    plane at scale 16 s, the low one at s with zero point -8), made in the kernels' layout directly
    (random words are random nibbles either way; the repack of a 151936 x 4096 table needs 15 GB)."""
    def plane():
        w = torch.randint(-(2**31), 2**31 - 1, (n // 16, k // 64, 32, 4), dtype=torch.int32, device="cuda")
        return w, (torch.rand(n // 16, k // GROUP, 16, device="cuda") * 0.02 + 0.001).to(torch.bfloat16)

    (wh, sh), (wl, sl) = plane(), plane()
    return (native.W4Weights(wh, sh, None, None, n, k, GROUP),
            native.W4Weights(wl, sl, None, torch.zeros_like(sl, dtype=torch.uint8), n, k, GROUP))


W8_SHAPES = SHAPES + [(4096, 151936)]  # + the M3-Lite lm_head (int8 per 128 as `m3edge quantize` writes it)


def w8_bench(bw: float, out_dir: Path | None) -> None:
    """W8A16 (symmetric int8, group 128, bf16): both int4 planes in one pass of the decode kernel
    (native.w8a16_gemm) against the two int4 GEMMs it replaces (one per plane, fp32 partials summed,
    as W8Linear runs more than 8 rows) and cuBLAS fp16, M = 1 and 4; flushed and graph, one table
    (one pass: nan where x is past the decode kernel's limit, M K 2 > 32 KB)."""
    rows = []
    for k, n in W8_SHAPES:
        nbytes_w = n * k + n * (k // GROUP) * 2
        ns8, ns16 = n_sets_for(nbytes_w), n_sets_for(n * k * 2)
        sets = [w8_planes(n, k) for _ in range(ns8)]
        w16s = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(ns16)]
        for m in (1, 4):
            xb = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xh = xb.half()
            a = torch.empty(m, n, device="cuda")
            b = torch.empty_like(a)

            def one(i, xb=xb, a=a):
                native.w8a16_gemm(xb, sets[i][0], sets[i][1], out=a)

            def two(i, xb=xb, a=a, b=b):
                native.w4a16_gemm(xb, sets[i][0], out=a)
                native.w4a16_gemm(xb, sets[i][1], out=b)
                a.add_(b)

            nbytes = nbytes_w + m * k * 2 + m * n * 4
            if not native.w8_one_pass(sets[0][0], m, "cuda"):  # x past the decode kernel's limit: two passes only
                one = None
            r = {"shape": f"{k}x{n}", "M": m, "two_us": timed(lambda: two(0)),
                 "one_us": timed(lambda: one(0)) if one else float("nan"),
                 "cublas_us": timed(lambda xh=xh: torch.nn.functional.linear(xh, w16s[0])),
                 "g_one_us": try_graph_us(one, ns8) if one else float("nan"), "g_two_us": try_graph_us(two, ns8),
                 "g_cublas_us": try_graph_us(lambda i, xh=xh: torch.nn.functional.linear(xh, w16s[i]), ns16)}
            for p in ("", "g_"):
                r[p + "pct_copy"] = 100 * nbytes / r[p + "one_us"] / 1e3 / bw
            rows.append(r)
        del sets, w16s
        torch.cuda.empty_cache()
    lines = [f"W8A16 (symmetric int8 g128, bf16 x, fp32 out) on {torch.cuda.get_device_name()}, copy {bw:.0f} GB/s; "
             "us flushed / in a graph",
             "| K x N | M | one pass us | % copy | two int4 passes us | cuBLAS fp16 us | x two passes | x cuBLAS |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['M']} | {r['one_us']:.1f} / {r['g_one_us']:.1f} | "
                     f"{r['pct_copy']:.0f}% / {r['g_pct_copy']:.0f}% | {r['two_us']:.1f} / {r['g_two_us']:.1f} | "
                     f"{r['cublas_us']:.1f} / {r['g_cublas_us']:.1f} | {r['two_us'] / r['one_us']:.2f} / "
                     f"{r['g_two_us'] / r['g_one_us']:.2f} | {r['cublas_us'] / r['one_us']:.2f} / "
                     f"{r['g_cublas_us'] / r['g_one_us']:.2f} |")
    table = "\n".join(lines)
    save_results(out_dir, rows, table)
    print(table)


# The M3-Lite routed experts (issue 6): E = 48, H = 4096 <-> I = 1536, top-8.
MOE_E, MOE_H, MOE_I, MOE_K = 48, 4096, 1536, 8
MOE_TS = [1, 4, 16, 64, 256, 1024]


def moe_bench(ext, bw: float, out_dir: Path | None, decode_only: bool = False) -> None:
    """Fused MoE (ours, three launches) vs a bf16 loop over the selected experts (torch, cuBLAS) and vs
    per-expert calls of our w4a16_gemm, T = 1..256 tokens. The loops get their per-expert token lists
    precomputed (outside the timing; a real one would sync to build them). GB/s counts the active
    experts' int4 bytes (weights + scales) plus x and out once; % copy is that over the copy bandwidth."""
    E, H, I, K = MOE_E, MOE_H, MOE_I, MOE_K
    G = GROUP

    def rnd_w4(*lead, n, k):
        return native.W4Weights(torch.randint(-(2**31), 2**31 - 1, (*lead, n // 16, k // 64, 32, 4), dtype=torch.int32,
                                              device="cuda"),
                                (torch.rand(*lead, n // 16, k // G, 16, device="cuda") * 0.02 + 0.001).to(torch.bfloat16),
                                None, None, n, k, G)

    ex = native.W4Experts(rnd_w4(E, n=2 * I, k=H), rnd_w4(E, n=H, k=I), E)
    per_gu = [native.W4Weights(ex.gate_up.w[e], ex.gate_up.scales[e], None, None, 2 * I, H, G) for e in range(E)]
    per_dn = [native.W4Weights(ex.down.w[e], ex.down.scales[e], None, None, H, I, G) for e in range(E)]
    w_gu = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) * 0.02  # gate rows, then up rows
    w_dn = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) * 0.02
    ebytes = ex.expert_nbytes()

    def routing(T, seed):
        g = torch.Generator("cuda").manual_seed(seed)
        vals, ids = torch.randn(T, E, generator=g, device="cuda").topk(K, dim=-1)
        w = torch.softmax(vals, dim=-1).to(torch.bfloat16)  # fp32 softmax, then bf16 (the spec's router)
        lists = []
        for e in ids.unique().tolist():
            t, j = (ids == e).nonzero(as_tuple=True)
            lists.append((e, t, w[t, j][:, None]))
        return ids.int(), w, lists

    def bf16_loop(x, lists, out):
        out.zero_()
        for e, t, wt in lists:
            gu = torch.nn.functional.linear(x[t], w_gu[e])  # [n, 2I]
            a = torch.nn.functional.silu(gu[:, :I]) * gu[:, I:]
            out.index_add_(0, t, torch.nn.functional.linear(a, w_dn[e]) * wt)

    def ours_loop(x, lists, out):
        out.zero_()
        for e, t, wt in lists:
            gu = native.w4a16_gemm(x[t], per_gu[e]).view(-1, I // 16, 2, 16)  # slabs interleaved
            a = (torch.nn.functional.silu(gu[:, :, 0]) * gu[:, :, 1]).reshape(-1, I)
            out.index_add_(0, t, native.w4a16_gemm(a, per_dn[e]) * wt)

    # the slabs-per-CTA sweep (plan: ns_gu, mr_gu, ns_dn, mr_dn, tiles_gu, tiles_dn); a choice whose
    # token tile does not fit shared memory is left out
    sweep = {}
    for T in (1, 4, 16):
        xs = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        ids_s, w_s, _ = routing(T, 1)
        o_s = torch.empty(T, H, device="cuda", dtype=torch.bfloat16)
        for nsg in (2, 4, 8):
            for nsd in (2, 4, 8, 16):
                if not ext.moe_plan(T, K, E, H, I, G, False, nsg, nsd):
                    continue
                sweep[f"T{T} {nsg}/{nsd}"] = timed(
                    lambda xs=xs, ids_s=ids_s, w_s=w_s, o_s=o_s, nsg=nsg, nsd=nsd:
                    native.moe_w4a16(xs, ids_s, w_s, ex, out=o_s, ns_gu=nsg, ns_dn=nsd))
        print(f"moe sweep T={T}, ns_gu/ns_dn: " + ", ".join(f"{k_[len(str(T)) + 2:]}:{v:.1f}us" for k_, v in sweep.items()
                                                          if k_.startswith(f"T{T} ")) +
              f"; plan {ext.moe_plan(T, K, E, H, I, G)}")

    # the kernel sweep: the decode kernel (tiles of <= 8 pairs) against the mma tile kernel at 16, 32
    # and 64 pairs per tile, for the sizes where the plan's choice changes (295: the benchmark's image
    # + audio + text prompt)
    for T in () if decode_only else (8, 16, 32, 64, 128, 295, 1024):
        xs = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        ids_s, w_s, _ = routing(T, 2)
        o_s = torch.empty(T, H, device="cuda", dtype=torch.bfloat16)
        for mr in (-1, 16, 32, 64):
            sweep[f"T{T} mma{mr}"] = timed(lambda xs=xs, ids_s=ids_s, w_s=w_s, o_s=o_s, mr=mr:
                                           native.moe_w4a16(xs, ids_s, w_s, ex, out=o_s, mma_rows=mr))
        print(f"moe kernel sweep T={T} (mma rows, -1 = decode kernel): " +
              ", ".join(f"{k_.split('mma')[1]}:{v:.1f}us" for k_, v in sweep.items() if k_.startswith(f"T{T} mma")) +
              f"; plan picks {ext.moe_plan(T, K, E, H, I, G)[6]}")

    # where the fused call's time goes: each launch's mean device time (torch.profiler, L2 flushed
    # before each call, rotating routings)
    from torch.profiler import ProfilerActivity, profile

    breakdown = {}
    for T in (1, 16) if decode_only else (1, 16, 295):
        xs = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        rs = [routing(T, 7 + i) for i in range(6)]
        o_s = torch.empty(T, H, device="cuda", dtype=torch.bfloat16)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(24):
                flush_l2()
                native.moe_w4a16(xs, rs[i % 6][0], rs[i % 6][1], ex, out=o_s)
            torch.cuda.synchronize()
        for ev in prof.key_averages():
            name = ev.key
            kind = ("group" if "moe_group" in name else "gate+up" if "EPI)1" in name or ", 1>" in name
                    else "down" if "EPI)2" in name or ", 2>" in name else None)
            if kind:
                us = getattr(ev, "device_time", None) or getattr(ev, "cuda_time", 0.0)
                breakdown[f"T{T} {kind}"] = us
        print(f"moe launches T={T} (profiler, mean us): " +
              ", ".join(f"{k_.split(' ', 1)[1]} {v:.1f}" for k_, v in breakdown.items() if k_.startswith(f"T{T} ")))

    rows = []
    n_sets = 6
    for T in [t for t in MOE_TS if t <= 16] if decode_only else MOE_TS:
        sets = [routing(T, 100 * T + i) for i in range(n_sets)]
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(T, H, device="cuda", dtype=torch.bfloat16)
        ids, w, lists = sets[0]
        t_ours = timed(lambda x=x, ids=ids, w=w, out=out: native.moe_w4a16(x, ids, w, ex, out=out))
        t_bf16 = timed(lambda x=x, lists=lists, out=out: bf16_loop(x, lists, out))
        t_loop = timed(lambda x=x, lists=lists, out=out: ours_loop(x, lists, out))
        g_ours = try_graph_us(lambda i, x=x, sets=sets, out=out: native.moe_w4a16(x, sets[i][0], sets[i][1], ex, out=out),
                              n_sets)
        g_bf16 = try_graph_us(lambda i, x=x, sets=sets, out=out: bf16_loop(x, sets[i][2], out), n_sets)
        g_loop = try_graph_us(lambda i, x=x, sets=sets, out=out: ours_loop(x, sets[i][2], out), n_sets)
        active = sum(len(s_[2]) for s_ in sets) / n_sets
        nbytes = len(lists) * ebytes + 2 * T * H * 2  # the timed set's experts (flushed table)
        gbytes = active * ebytes + 2 * T * H * 2  # mean over the rotated sets (graph table)
        plan = ext.moe_plan(T, K, E, H, I, G)
        rows.append({"T": T, "active": len(lists), "ours_us": t_ours, "GBs": nbytes / t_ours / 1e3,
                     "pct_copy": 100 * nbytes / t_ours / 1e3 / bw, "bf16_loop_us": t_bf16, "w4_loop_us": t_loop,
                     "vs_bf16": t_bf16 / t_ours, "vs_w4_loop": t_loop / t_ours, "plan": plan,
                     "g_active": active, "g_ours_us": g_ours, "g_GBs": gbytes / g_ours / 1e3,
                     "g_pct_copy": 100 * gbytes / g_ours / 1e3 / bw, "g_bf16_loop_us": g_bf16, "g_w4_loop_us": g_loop,
                     "g_vs_bf16": g_bf16 / g_ours, "g_vs_w4_loop": g_loop / g_ours})

    # one token with nine slots: the runtime's call (the shared expert as a ninth slot), six routings
    ids9 = [torch.randperm(E, device="cuda")[:K + 1].view(1, K + 1).int() for _ in range(n_sets)]
    w9 = torch.softmax(torch.randn(1, K + 1, device="cuda"), -1).to(torch.bfloat16)
    x9, o9 = torch.randn(1, H, device="cuda", dtype=torch.bfloat16), torch.empty(1, H, device="cuda", dtype=torch.bfloat16)
    t9 = timed(lambda: native.moe_w4a16(x9, ids9[0], w9, ex, out=o9))
    g9 = try_graph_us(lambda i: native.moe_w4a16(x9, ids9[i], w9, ex, out=o9), n_sets)
    b9 = (K + 1) * ebytes + 2 * H * 2
    print(f"moe T=1, {K + 1} slots (the runtime's call): {t9:.1f} us flushed ({100 * b9 / t9 / 1e3 / bw:.0f}% of copy), "
          f"{g9:.1f} us in a graph ({100 * b9 / g9 / 1e3 / bw:.0f}%); plan {ext.moe_plan(1, K + 1, E, H, I, G)}")
    forced = {f"{nsg}/{nsd}": try_graph_us(lambda i, nsg=nsg, nsd=nsd: native.moe_w4a16(
        x9, ids9[i], w9, ex, out=o9, ns_gu=nsg, ns_dn=nsd), n_sets)
        for nsg, nsd in ((2, 2), (2, 4), (2, 8), (4, 2), (4, 4), (4, 8), (8, 4), (8, 8))}
    print(f"moe T=1, {K + 1} slots, graph us by ns_gu/ns_dn: " + ", ".join(f"{k_}:{v:.1f}" for k_, v in forced.items()))

    def md(p: str) -> str:
        lines = ["| T | experts | ours us | GB/s | % copy | bf16 loop us | w4a16 loop us | x bf16 loop | x w4a16 loop |"
                 + (" ns/mr gate+up, down |" if not p else ""), "|---" * (10 if not p else 9) + "|"]
        for r in rows:
            lines.append(f"| {r['T']} | {r[p + 'active']:.0f} | {r[p + 'ours_us']:.1f} | {r[p + 'GBs']:.0f} | "
                         f"{r[p + 'pct_copy']:.0f}% | {r[p + 'bf16_loop_us']:.1f} | {r[p + 'w4_loop_us']:.1f} | "
                         f"{r[p + 'vs_bf16']:.2f} | {r[p + 'vs_w4_loop']:.2f} |"
                         + ((f" {r['plan'][0]}/{r['plan'][1]}, {r['plan'][2]}/{r['plan'][3]} |" if not r['plan'][6]
                             else f" mma {r['plan'][6]} rows |") if not p else ""))
        return "\n".join(lines)

    head = (f"Fused MoE, M3-Lite experts (E={E}, H={H}, I={I}, top-{K}), int4 g{G} bf16, {ebytes / 1e6:.2f} MB per "
            f"expert; median of 40, L2 flushed by a 256 MB {FLUSH_MODE}; copy {bw:.0f} GB/s")
    ghead = (f"Fused MoE steady state (CUDA graph over {n_sets} routings in turn; experts = mean distinct experts "
             "per call)")
    text = head + "\n\n" + md("") + "\n\n" + ghead + "\n\n" + md("g_") + "\n"
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "moe.json").write_text(json.dumps({"copy_GBs": bw, "sweep": sweep, "breakdown": breakdown, "rows": rows}, indent=1))
        (out_dir / "moe.md").write_text(text)
    print(text)


def main() -> None:
    global FLUSH, FLUSH_MODE
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--moe", action="store_true", help="only the fused MoE section (M3-Lite experts)")
    ap.add_argument("--quick", action="store_true", help="two shapes, M = 1 and 16")
    ap.add_argument("--decode", action="store_true", help="the decode kernel's sizes only: every shape, M = 1 and 4, "
                    "no plan sweep (with --moe: T <= 16, the slab sweep, no kernel sweep)")
    ap.add_argument("--w8", action="store_true", help="only the W8A16 section: int8 in one pass vs two int4 passes "
                    "and cuBLAS fp16, M = 1 and 4, the layer shapes and the M3-Lite lm_head")
    ap.add_argument("--flush", choices=["read", "write"], default="read", help="how L2 is flushed (flush_l2)")
    ap.add_argument("--profile", action="store_true", help="a few unflushed calls for ncu (M = 1 and 64, 4096x4096)")
    args = ap.parse_args()
    if args.profile:
        wt = our_weights(4096, 4096)
        for m, s in ((1, 0), (1, 1), (64, 0)):
            x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
            for _ in range(2):
                native.w4a16_gemm(x, wt, splits=s)
        torch.cuda.synchronize()
        return
    torch.manual_seed(0)
    FLUSH = torch.ones(256 << 20, dtype=torch.uint8, device="cuda")
    ext = native.load()
    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth()
    print(f"device: {props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20} MB; "
          f"torch {torch.__version__}; copy bandwidth {bw:.0f} GB/s (1 GiB, read + write)")
    if args.moe:
        moe_bench(ext, bw, args.out, decode_only=args.decode)
        return
    if args.w8:
        w8_bench(bw, args.out)
        return

    # the flush's own cost: M = 1, 4096x4096, each way of flushing, and none (8 weight sets in turn, 64 MB)
    k, n = 4096, 4096
    sets = [our_weights(n, k) for _ in range(8)]
    w16s = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(3)]
    tg, _ = tinygemm(n, k)
    xb = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    xh = xb.half()
    for mode in ("write", "read"):
        FLUSH_MODE = mode
        t = [timed(lambda: native.w4a16_gemm(xb, sets[0])), timed(lambda: torch.nn.functional.linear(xh, w16s[0])),
             timed(lambda: tg(xb)) if tg else float("nan")]
        print(f"M=1 4096x4096, flush by {mode}: ours {t[0]:.1f} us, cuBLAS fp16 {t[1]:.1f} us, tinygemm {t[2]:.1f} us")
    it = [0]

    def rot():
        it[0] += 1
        native.w4a16_gemm(xb, sets[it[0] % 8])
    s_, e_ = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(10):
        rot()
    s_.record()
    for _ in range(200):
        rot()
    e_.record()
    torch.cuda.synchronize()
    us = s_.elapsed_time(e_) * 1e3 / 200
    print(f"M=1 4096x4096, no flush, 8 weight sets in turn (64 MB > L2), back to back: ours {us:.1f} us "
          f"({(n * k // 2 + n * k // GROUP * 2) / us / 1e3:.0f} GB/s, launch gaps included)")
    FLUSH_MODE = args.flush

    # what the two timing methods cost a kernel that does nothing, and one that moves 8 MiB (the
    # 4096x4096 int4 weights) at copy bandwidth: the floor under our M = 1 times
    src, dst = torch.empty(8 << 20, dtype=torch.uint8, device="cuda"), torch.empty(8 << 20, dtype=torch.uint8, device="cuda")
    srcs = [torch.empty(8 << 20, dtype=torch.uint8, device="cuda") for _ in range(16)]
    floor = {"empty_us": timed(lambda: torch.cuda._sleep(0)), "copy8_us": timed(lambda: dst.copy_(src)),
             "g_empty_us": try_graph_us(lambda i: torch.cuda._sleep(0), 16),
             "g_copy8_us": try_graph_us(lambda i: dst.copy_(srcs[i]), 16)}
    print(f"timing floor: empty kernel {floor['empty_us']:.1f} us flushed / {floor['g_empty_us']:.1f} us in a graph; "
          f"8 MiB copy (16 MiB moved) {floor['copy8_us']:.1f} us flushed / {floor['g_copy8_us']:.1f} us in a graph")

    # the plan against forced kernels, N tiles and split counts (n_tile 128 = the mma tile kernel)
    sweep = []
    for m, k, n, tiles in [] if args.decode else [(1, 4096, 4096, (16, 32)), (1, 4096, 14336, (16, 32)), (1, 14336, 4096, (16, 32)),
                           (1, 4096, 1536, (16, 32)), (4, 4096, 4096, (16, 32)), (8, 4096, 4096, (16, 32, 64))]:
        wt = our_weights(n, k)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        auto = ext.w4a16_plan(m, n, k, 0, props.multi_processor_count)
        row = {"shape": f"{k}x{n}", "M": m, "auto": f"{auto[5]}/{auto[1]}",
               "auto_us": timed(lambda x=x, wt=wt: native.w4a16_gemm(x, wt))}
        for nt in tiles + (128,):
            for s in ((0,) if nt == 128 else (1, 2, 4, 8)):
                us = timed(lambda x=x, wt=wt, s=s, nt=nt: native.w4a16_gemm(x, wt, splits=s, n_tile=nt))
                real = ext.w4a16_plan(m, n, k, s, props.multi_processor_count, nt)
                row[f"{nt}/{real[1]}"] = us
        sweep.append(row)
        print(f"sweep M={m} {k}x{n}, n_tile/splits: auto {row['auto']} {row['auto_us']:.1f}us; " +
              ", ".join(f"{kk}:{v:.1f}us" for kk, v in row.items() if "/" in kk and kk != "auto"))

    shapes, ms = (SHAPES[:2], [1, 16]) if args.quick else (SHAPES, [1, 4]) if args.decode else (SHAPES, MS)
    rows = []
    for k, n in shapes:
        wt = our_weights(n, k)
        w16 = torch.randn(n, k, device="cuda", dtype=torch.float16)
        ns4, ns16 = n_sets_for(n * k // 2), n_sets_for(n * k * 2)
        g_ours = [wt] + [our_weights(n, k) for _ in range(ns4 - 1)]
        g_w16 = [w16] + [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(ns16 - 1)]
        bases = {"tinygemm": baseline_sets(tinygemm, "tinygemm", n, k, ns4),
                 "nf4": baseline_sets(nf4, "bitsandbytes NF4", n, k, ns4)}
        for m in ms:
            xb = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xh = xb.to(torch.float16)
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            t_ours = timed(lambda xb=xb, wt=wt, out=out: native.w4a16_gemm(xb, wt, out=out))
            t_cublas = timed(lambda xh=xh, w16=w16: torch.nn.functional.linear(xh, w16))
            nbytes = n * k // 2 + n * (k // GROUP) * 2 + m * k * 2 + m * n * 2
            gbs = nbytes / t_ours / 1e3
            plan = ext.w4a16_plan(m, n, k, 0, props.multi_processor_count)  # m_tile, splits, .., n_tile
            gq_ours = try_graph_us(lambda i, xb=xb, ws=g_ours, out=out: native.w4a16_gemm(xb, ws[i], out=out), ns4)
            gq_cublas = try_graph_us(lambda i, xh=xh, ws=g_w16: torch.nn.functional.linear(xh, ws[i]), ns16)
            g_gbs = nbytes / gq_ours / 1e3
            row = {"shape": f"{k}x{n}", "M": m, "ours_us": t_ours, "GBs": gbs, "pct_copy": 100 * gbs / bw,
                   "cublas_us": t_cublas, "vs_cublas": t_cublas / t_ours, "m_tile": plan[0], "n_tile": plan[5],
                   "splits": plan[1], "g_ours_us": gq_ours, "g_GBs": g_gbs, "g_pct_copy": 100 * g_gbs / bw,
                   "g_cublas_us": gq_cublas, "g_vs_cublas": gq_cublas / gq_ours}
            for name, runs in bases.items():  # tinygemm_us, vs_tinygemm, g_tinygemm_us, g_vs_tinygemm; nf4_*
                t, g = baseline_us(runs, xb)
                row |= {f"{name}_us": t, f"vs_{name}": t / t_ours, f"g_{name}_us": g, f"g_vs_{name}": g / gq_ours}
            rows.append(row)

    def markdown(p: str, plan_column: bool) -> str:
        """One table from the rows' measurements under key prefix p ("" flushed, "g_" graph replay)."""
        lines = ["| K x N | M | ours us | GB/s | % copy | cuBLAS fp16 us | tinygemm us | NF4 us | x cuBLAS | "
                 "x tinygemm | x NF4 |" + (" tile MxN/splits |" if plan_column else ""),
                 "|---" * (12 if plan_column else 11) + "|"]
        for r in rows:
            lines.append(f"| {r['shape']} | {r['M']} | {r[p + 'ours_us']:.1f} | {r[p + 'GBs']:.0f} | "
                         f"{r[p + 'pct_copy']:.0f}% | {r[p + 'cublas_us']:.1f} | {r[p + 'tinygemm_us']:.1f} | "
                         f"{r[p + 'nf4_us']:.1f} | {r[p + 'vs_cublas']:.2f} | {r[p + 'vs_tinygemm']:.2f} | "
                         f"{r[p + 'vs_nf4']:.2f} |"
                         + (f" {r['m_tile']}x{r['n_tile']}/{r['splits']} |" if plan_column else ""))
        return "\n".join(lines)

    table, gtable = markdown("", True), markdown("g_", False)
    ghead = ("Steady state (CUDA graph of calls over weight sets > 2x L2, so weights come from DRAM; "
             "launch latency overlapped, as in a graph-captured decode step)")
    head = (f"{props.name}, copy {bw:.0f} GB/s; int4 g128 bf16 (ours, tinygemm) vs fp16 cuBLAS and bitsandbytes "
            f"NF4 (bf16, blocksize 64); median of 40, L2 flushed by a 256 MB {FLUSH_MODE}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench.json").write_text(json.dumps({"device": props.name, "copy_GBs": bw, "floor": floor,
                                                         "rows": rows, "sweep": sweep}, indent=1))
        (args.out / "bench.md").write_text(head + "\n\n" + table + "\n\n" + ghead + "\n\n" + gtable + "\n")
    print(head)
    print(table)
    print(ghead)
    print(gtable)


if __name__ == "__main__":
    main()

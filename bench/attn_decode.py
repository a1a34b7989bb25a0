"""Decode attention benchmark: native.attn_decode (q/k norm, RoPE, cache write and attention in one
launch) against what it replaced, native.rope_qkv + torch SDPA with the runtime's mask.

Run on the GPU machine:
    PYTHONPATH=. python3 bench/attn_decode.py [--out DIR]

Batch 1, one token, bf16, the heads of M3-Lite (32 q / 4 kv, head_dim 128, q/k norm) and SmolLM2-135M
(9 / 3, 64, none), at cache lengths (keys) 64 .. 8192. Each variant runs as it does in a decode step:
launches over LAYERS layers' caches captured in one CUDA graph and replayed REPS times
(kernels.graph_us; the caches do not all sit in L2); time per launch. GB/s counts the K and V bytes
read (keys x kv heads x D x 2 x 2 bytes), % copy against kernels.copy_bandwidth in the same run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from m3edge.runtime import native  # noqa: E402
from kernels import copy_bandwidth, graph_us, save_results  # noqa: E402

HEADS = {"M3-Lite": (32, 4, 128, True), "SmolLM2": (9, 3, 64, False)}
KEYS = [64, 256, 1024, 4096, 8192]
LAYERS, REPS = 16, 20


def run(name: str, keys: int, bw: float) -> dict:
    nh, nkv, D, qk_norm = HEADS[name]
    dt, dev = torch.bfloat16, "cuda"
    cap, pos = keys, keys - 1
    qkv = torch.randn(1, (nh + 2 * nkv) * D, device=dev).to(dt)
    qn = (1 + 0.1 * torch.randn(D, device=dev)).to(dt) if qk_norm else None
    kn = (1 + 0.1 * torch.randn(D, device=dev)).to(dt) if qk_norm else None
    ang = torch.rand(1, D // 2, device=dev) * 6.28
    cos, sin = torch.cat([ang, ang], -1).cos().to(dt), torch.cat([ang, ang], -1).sin().to(dt)
    kc = [torch.randn(nkv, cap, D, device=dev).to(dt) for _ in range(LAYERS)]
    vc = [torch.randn(nkv, cap, D, device=dev).to(dt) for _ in range(LAYERS)]
    p = torch.tensor([pos], device=dev)
    ws = native.attn_workspace(nh, nkv, D, dev)
    out = torch.empty(nh, D, dtype=dt, device=dev)
    q = torch.empty(nh, 1, D, dtype=dt, device=dev)
    keys_idx = torch.arange(keys, device=dev)
    mask = (keys_idx <= p)[None, None, None]

    def ours(i):
        native.attn_decode(qkv, qn, kn, cos, sin, kc[i], vc[i], p, 0, keys, nh, nkv, 1e-6, ws, out=out)

    def before(i):
        native.rope_qkv(qkv, qn, kn, cos, sin, q, kc[i], vc[i], p, 0, nh, nkv, 1e-6)
        F.scaled_dot_product_attention(q[None], kc[i][None], vc[i][None], attn_mask=mask, enable_gqa=nh != nkv)

    kv_bytes = keys * nkv * D * 2 * 2
    row = {"model": name, "keys": keys, "kv_mb": kv_bytes / 1e6}
    row["ours_us"] = graph_us(ours, LAYERS, reps=REPS)
    row["before_us"] = graph_us(before, LAYERS, reps=REPS)
    row["ours_gbs"] = kv_bytes / row["ours_us"] / 1e3
    row["ours_copy_pct"] = 100 * row["ours_gbs"] / bw
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write results.json and table.md here")
    ap.add_argument("--only", nargs="*", default=list(HEADS), choices=list(HEADS))
    ap.add_argument("--keys", nargs="*", type=int, default=KEYS)
    args = ap.parse_args()
    bw = copy_bandwidth()
    rows = [run(name, k, bw) for name in args.only for k in args.keys]
    lines = [f"{torch.cuda.get_device_name()}, copy bandwidth {bw:.0f} GB/s; us per launch, {LAYERS} layers' caches "
             "in one graph\n",
             "| heads | keys | KV MB | attn_decode us | rope_qkv + SDPA us | speedup | attn_decode GB/s (% copy) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['keys']} | {r['kv_mb']:.2f} | {r['ours_us']:.2f} | {r['before_us']:.2f} | "
                     f"{r['before_us'] / r['ours_us']:.2f}x | {r['ours_gbs']:.0f} ({r['ours_copy_pct']:.0f}%) |")
    table = "\n".join(lines)
    save_results(args.out, rows, table)
    print(table)


if __name__ == "__main__":
    main()

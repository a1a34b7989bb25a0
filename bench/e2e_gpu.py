"""End-to-end decode on the GPU: full-size M3-Lite on the cuda backend against the roofline, one table.

Run on the GPU machine (weights are made on the GPU, nothing is read from disk):
    PYTHONPATH=. python3 bench/e2e_gpu.py [--out DIR] [--smollm2 DIR]

Rows: `lite-24g` and `lite-16g` with random int4 weights (group 128, symmetric or with --zero-points
asymmetric, bf16 scales; lm_head int8 per 128 as `m3edge quantize` writes it; norms, routers and
embeddings bf16) on the cuda backend, and the same configs in bf16 through the plain torch reference
model (the baseline; random bf16 weights, eager, its own KV cache); with --smollm2,
SmolLM2-135M-Instruct as the GGUF stores it (Q4_1 = int4 g32 + float minimums) on both.

Columns:
- decode tok/s: batch 1, a 32-token text prompt then 128 greedy steps. "graph" times the decode
  step's CUDA graph replays alone (events around 128 replays); "step" is the backend's whole
  `forward` per token (input copies, replay, logits to the host), what the engine sees.
- roofline: copy bandwidth (a 1 GiB device-to-device copy, bytes read + written, same run) over the
  bytes one decode step must read: every weight except the embedding table (one row), the
  image/audio embedders and routers (text decode does not run them) and the routed experts not
  selected (k of E per layer), plus the KV cache up to the step's position.
- TTFT: prefill of a 448x448 image (196 patch tokens) + 5 s of audio (62 tokens) + 32 text tokens
  and the first token's logits on the host, median of 5 (features computed beforehand; the CPU
  frontends' time is printed apart).
- peak VRAM: torch's max allocated / reserved while running with an 8K-token cache (decode, the
  TTFT prefill, a decode step at position 8000 attending to 8192 keys); the CUDA context itself is
  not in it. The load's own peak (weights arriving and being repacked) and the memory plan's total
  are printed with each row.

`--timeline` instead traces one replay of the first preset's decode graph with the profiler and
prints a layer's kernels in launch order (median duration over the layers, and the gap from the
previous kernel's end: negative where dependent launches overlap), the layer's start-to-start time
and the launches outside the layers; the trace (chrome JSON) goes to --out.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import copy_bandwidth, save_results  # noqa: E402

from m3edge.model.checkpoint import checkpoint_tensors  # noqa: E402
from m3edge.model.m3lite import KVCache, M3Config, M3Lite, expected_tensors, kv_bytes_per_token  # noqa: E402
from m3edge.model.packing import quantization_config  # noqa: E402
from m3edge.model.scheme import Scheme  # noqa: E402
from m3edge.model.synth import PRESETS  # noqa: E402
from m3edge.prompt import Image, build_prompt  # noqa: E402
from m3edge.runtime.cuda import CudaBackend, NativeDense, NativeMoE, W4Linear, W8Linear  # noqa: E402

CONTEXT = 8192
STEPS = 128
GIB = 2**30


class RandomInt4:
    """Tensor source of a random int4 checkpoint of cfg, every tensor made on the GPU when asked."""

    def __init__(self, cfg: M3Config, seed: int = 0):
        self.cfg = cfg
        self.shapes, packed = checkpoint_tensors(cfg)
        self.weight_shape = {m: expected_tensors(cfg)[n] for n, (m, _) in packed.items()}
        self.gen = torch.Generator(device="cuda").manual_seed(seed)

    def names(self) -> list[str]:
        return list(self.shapes)

    def get(self, name: str) -> torch.Tensor:
        shape, g = self.shapes[name], self.gen
        module, _, part = name.rpartition(".")
        if part == "weight_shape":
            return torch.tensor(self.weight_shape[module], dtype=torch.int64)
        if part in ("weight_packed", "weight_zero_point"):  # any nibbles: q and zero points in range
            return torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int32, device="cuda", generator=g)
        if part == "weight_scale":  # ~ a N(0, 0.02) weight's absmax / 7
            return torch.rand(shape, device="cuda", generator=g, dtype=torch.bfloat16).mul_(0.004).add_(0.006)
        if "norm" in name:
            return torch.ones(shape, dtype=torch.bfloat16, device="cuda")
        # made in bf16 and scaled in place: an fp32 draw of the 151936 x 4096 tables would add 5 GB to the peak
        return torch.randn(shape, device="cuda", generator=g, dtype=torch.bfloat16).mul_(0.02)


def int4_config(preset: str, symmetric: bool = True) -> M3Config:
    """The preset with int4 g128 linears (symmetric, or with zero points as `m3edge quantize` writes them
    without --sym) and the int8 lm_head."""
    raw = dict(PRESETS[preset])
    targets = ["re:model\\.layers\\.\\d+\\.self_attn\\.(q|k|v|o)_proj$",
               "re:model\\.layers\\.\\d+\\.mlp\\.(experts\\.\\d+|shared_experts)\\.(gate|up|down)_proj$"]
    raw["quantization_config"] = quantization_config([(Scheme(4, 128, symmetric), targets),
                                                      (Scheme(8, 128, True), ["lm_head"])],
                                                     [])
    return M3Config.from_dict(raw)


def decode_bytes(be: CudaBackend, position: int) -> int:
    """Bytes one text decode step reads at `position` (module doc), from what sits on the GPU."""
    cfg, m = be.cfg, be.model
    total = 0
    for name, p in m.named_parameters():
        if name.startswith(("vision_embed", "audio_embed")):
            continue
        if name == "embed_tokens.weight":
            total += p.shape[1] * p.element_size()  # one row
            if cfg.tie_word_embeddings:
                total += p.numel() * p.element_size()
            continue
        if ".routers." in name and not name.endswith("routers.0.weight"):
            continue  # image / audio routers: not run on text
        total += p.numel() * p.element_size()
    for mod in m.modules():
        if isinstance(mod, W4Linear):
            total += mod.wt.nbytes() + (0 if mod.bias is None else mod.bias.numel() * mod.bias.element_size())
        elif isinstance(mod, NativeMoE):
            total += (cfg.num_experts_per_tok + mod.shared_slot) * mod.native.expert_nbytes()
        elif isinstance(mod, NativeDense):
            total += mod.native.expert_nbytes()
        elif isinstance(mod, W8Linear):
            total += mod.hi.nbytes() + mod.lo.nbytes()
    return total + kv_bytes_per_token(cfg) * (position + 1)


def text_prompt(cfg: M3Config, n: int):
    ids = torch.randint(100, 20000, (n,), generator=torch.Generator().manual_seed(1)).tolist()
    return build_prompt(ids, cfg)


def media_prompt(cfg: M3Config):
    from m3edge.frontends import audio_tokens, image_patches

    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    patches, grid = image_patches(rng.integers(0, 255, (448, 448, 3), dtype=np.uint8))
    audio = audio_tokens((0.1 * rng.standard_normal(5 * 16000)).astype(np.float32))
    frontend_s = time.perf_counter() - t0
    text = torch.randint(100, 20000, (32,), generator=torch.Generator().manual_seed(2)).tolist()
    ids = [cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id,
           cfg.audio_start_token_id, cfg.audio_token_id, cfg.audio_end_token_id, *text]
    return build_prompt(ids, cfg, [Image(patches, grid)], [audio]), frontend_s


def prefill(be, prompt, cache):
    return be.forward(prompt.input_ids[None], prompt.position_ids[:, None], prompt.image_patches,
                      prompt.audio_features, cache)


def decode_rate(be: CudaBackend, cache, logits, pos: int):
    """STEPS greedy steps through the backend's forward (median step time), then STEPS replays of the
    current length's graph alone -> (step tok/s, graph us a token, last logits, next position)."""
    times = []
    for _ in range(STEPS):  # the backend's forward per token, as the engine calls it
        t = int(logits.argmax())
        t0 = time.perf_counter()
        logits = be.forward(torch.tensor([[t]]), torch.full((3, 1, 1), pos), None, None, cache)
        times.append(time.perf_counter() - t0)
        pos += 1
    step_tps = 1 / statistics.median(times[8:])
    g = cache.graphs[max(cache.graphs)]  # the graph of the current length: replays alone
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    g.replay()
    s.record()
    for _ in range(STEPS):
        g.replay()
    e.record()
    torch.cuda.synchronize()
    return step_tps, s.elapsed_time(e) * 1e3 / STEPS, logits, pos


def set_feature(be: CudaBackend, name: str, on: bool) -> None:
    """A decode fusion on or off for the A/B rows: "attn" the one-launch attention (native.attn_decode;
    off: rope_qkv + SDPA), "norm" the input RMSNorm in the qkv GEMM (off: its own launch), "post"
    attention's residual add in the o GEMM and the second norm in routing and gate+up (off: one
    norm-and-add launch), "early" the shared expert's gate+up starting during routing (off: after it).
    Graphs captured before keep what they captured (clear them)."""
    for layer in be.model.layers:
        if name == "early" and hasattr(layer.mlp, "shared_early"):
            layer.mlp.shared_early = on
        if name == "post":
            if not hasattr(layer, "_fuse_post"):
                layer._fuse_post = layer.fuse_post
            layer.fuse_post = on and layer._fuse_post
        a = layer.self_attn
        if name == "attn" and hasattr(a, "attn_kernel"):
            a.attn_kernel = on
        elif name == "norm" and hasattr(a, "qkv"):
            if not hasattr(a.qkv, "_norm_at_one"):
                a.qkv._norm_at_one = a.qkv.norm_at_one
            a.qkv.norm_at_one = on and a.qkv._norm_at_one


def set_slabs(be: CudaBackend, gu: int, dn: int) -> None:
    """The one-token MoE pair's slabs per CTA (gate+up, down) in every layer; 0 = the plan's."""
    for layer in be.model.layers:
        if hasattr(layer.mlp, "slabs"):
            layer.mlp.slabs = (gu, dn)


def slabs_arg(v: str) -> str:
    """--slabs GU/DN, refused here rather than after the model has loaded."""
    gu, _, dn = v.partition("/")
    if not (gu in ("0", "2", "4", "8") and dn in ("0", "1", "2", "4", "8")):
        raise argparse.ArgumentTypeError(f"{v!r}: GU/DN with GU in 0, 2, 4, 8 and DN in 0, 1, 2, 4, 8")
    return v


def run_cuda(name: str, be: CudaBackend, bw: float, ab: list[str] = (), slabs: list[str] = ()) -> dict:
    cfg = be.cfg
    cache = be.new_cache()
    prompt = text_prompt(cfg, 32)
    logits = prefill(be, prompt, cache)
    pos0 = pos = int(prompt.position_ids.max()) + 1
    logits0 = logits
    step_tps, graph_us, logits, pos = decode_rate(be, cache, logits, pos)
    nbytes = decode_bytes(be, pos)
    roof = bw * 1e9 / nbytes

    def again() -> tuple[torch.Tensor, int]:
        """The cache back to the prompt's end, so that an A/B row decodes the same positions (and the same
        power-of-two graph length, which sets the attention's work) as the row it is compared with."""
        cache.truncate(pos0, torch.zeros(1, dtype=torch.bool))
        cache.graphs.clear()
        return logits0, pos0

    row = {"model": name, "backend": "cuda int4", "graph_tps": 1e6 / graph_us, "step_tps": step_tps,
           "roofline_tps": roof, "bytes_per_token": nbytes, "graph_us": graph_us}
    for feature in ab:  # the same positions again, with one fusion off
        set_feature(be, feature, False)
        logits, pos = again()
        off_step, off_us, logits, pos = decode_rate(be, cache, logits, pos)
        set_feature(be, feature, True)
        cache.graphs.clear()
        row[f"without_{feature}"] = {"graph_tps": 1e6 / off_us, "step_tps": off_step}
    for sl in slabs:  # the one-token MoE pair with forced slabs per CTA "GU/DN" (0 = the plan's)
        set_slabs(be, *(int(v) for v in sl.split("/")))
        logits, pos = again()
        sl_step, sl_us, logits, pos = decode_rate(be, cache, logits, pos)
        row.setdefault("slabs", {})[sl] = {"graph_tps": 1e6 / sl_us, "step_tps": sl_step}
    if slabs:
        set_slabs(be, 0, 0)
        cache.graphs.clear()
    if cfg.vision_config is not None:
        mp, frontend_s = media_prompt(cfg)
        tt = []
        for _ in range(6):
            cache.truncate(0, torch.zeros(1, dtype=torch.bool))
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            prefill(be, mp, cache)
            tt.append(time.perf_counter() - t0)
        row.update(ttft_ms=1e3 * statistics.median(tt[1:]), ttft_tokens=len(mp.input_ids),
                   frontend_ms=1e3 * frontend_s)
        cache.truncate(8000, torch.zeros(1, dtype=torch.bool))  # a decode step over 8192 keys
        be.forward(torch.tensor([[100]]), torch.full((3, 1, 1), 8000), None, None, cache)
    torch.cuda.synchronize()
    row.update(peak_alloc_gib=torch.cuda.max_memory_allocated() / GIB,
               peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB)
    return row


@torch.inference_mode()
def run_bf16(name: str, cfg: M3Config, bw: float, steps: int = 16) -> dict:
    """The plain torch reference in bf16 with random weights (made in place on the GPU)."""
    with torch.device("meta"):
        m = M3Lite(cfg).to(torch.bfloat16)
    m = m.to_empty(device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for n, p in m.named_parameters():
        if "norm" in n:
            p.fill_(1)
        else:
            p.normal_(0, 0.02, generator=gen)
    m.eval()
    cache = KVCache(cfg.num_hidden_layers)
    prompt = text_prompt(cfg, 32)
    logits = m(prompt.input_ids[None].cuda(), prompt.position_ids[:, None].cuda(), cache=cache, last_only=True)
    pos = int(prompt.position_ids.max()) + 1
    times = []
    for _ in range(steps):
        t = logits[0, -1].argmax().view(1, 1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = m(t, torch.full((3, 1, 1), pos, device="cuda"), cache=cache, last_only=True)
        logits[0, -1].float().cpu()
        times.append(time.perf_counter() - t0)
        pos += 1
    act = sum(p.numel() * p.element_size() for n, p in m.named_parameters()
              if not n.endswith(("mlp.gate_up", "mlp.down")) and not n.startswith(("vision", "audio", "embed")))
    experts = sum(p[0].numel() * p.element_size() * cfg.num_experts_per_tok for n, p in m.named_parameters()
                  if n.endswith(("mlp.gate_up", "mlp.down")))
    nbytes = act + experts + kv_bytes_per_token(cfg) * pos
    row = {"model": name, "backend": "torch bf16", "graph_tps": float("nan"), "step_tps": 1 / statistics.median(times[2:]),
           "roofline_tps": bw * 1e9 / nbytes, "bytes_per_token": nbytes,
           "peak_alloc_gib": torch.cuda.max_memory_allocated() / GIB}
    del m, cache
    return row


def run_smollm2(path: Path, bw: float) -> list[dict]:
    from m3edge.runtime.backends import TorchBackend

    be = CudaBackend(path, max_context=CONTEXT)
    rows = [{**run_cuda("SmolLM2-135M Q4_1", be, bw), "model": "SmolLM2-135M Q4_1"}]
    del be
    ref = TorchBackend(path, dtype=torch.bfloat16, device="cuda")
    cache = ref.new_cache()
    prompt = text_prompt(ref.cfg, 32)
    logits = prefill(ref, prompt, cache)
    pos, times = 32, []
    for _ in range(32):
        t0 = time.perf_counter()
        logits = ref.forward(torch.tensor([[int(logits.argmax())]]), torch.full((3, 1, 1), pos), None, None, cache)
        times.append(time.perf_counter() - t0)
        pos += 1
    rows.append({"model": "SmolLM2-135M Q4_1", "backend": "torch bf16 (dequantized)", "graph_tps": float("nan"),
                 "step_tps": 1 / statistics.median(times[2:]), "roofline_tps": float("nan")})
    return rows


def run_load(preset: str, layers: int, work: Path) -> str:
    """Load times of a checkpoint on disk (a `layers`-deep cut of the preset, random int4, written
    first): the repack cache off, cold (repack + writing the cache) and warm (read from the cache).
    The checkpoint's files are in the OS page cache for all three (just written, then read), so the
    numbers compare the loads' own work, not the disk."""
    import os
    import shutil

    from m3edge.model.checkpoint import CheckpointWriter

    raw = {**PRESETS[preset], "num_hidden_layers": layers}
    cfg = M3Config.from_dict({**raw, "quantization_config": int4_config(preset).quantization_config})
    src, ckpt, cache_dir = RandomInt4(cfg), work / "ckpt", work / "cache"
    t0 = time.perf_counter()
    with CheckpointWriter(ckpt, shard_bytes=2 * GIB, overwrite=True) as w:
        for name in src.names():
            w.add(name, src.get(name))
        w.finish({**raw, "quantization_config": cfg.quantization_config})
    write_s = time.perf_counter() - t0
    ckpt_gb = sum(f.stat().st_size for f in ckpt.iterdir()) / 1e9
    os.environ["M3EDGE_CACHE_DIR"] = str(cache_dir)
    times = {}
    # the first load also pays the process's one-time costs (CUDA context, kernels' first launches):
    # a load before the timed ones, not reported
    for label, cached in (("first", False), ("no cache", False), ("cold (repack + write)", True),
                          ("warm (from the cache)", True)):
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        be = CudaBackend(ckpt, max_context=CONTEXT, graphs=False, repack_cache=cached)
        torch.cuda.synchronize()
        times[label] = time.perf_counter() - t0
        del be
    cache_gb = sum(f.stat().st_size for f in cache_dir.rglob("*.safetensors")) / 1e9
    shutil.rmtree(work, ignore_errors=True)
    lines = [f"Load of a {layers}-layer {preset} int4 checkpoint from disk ({ckpt_gb:.2f} GB, written in "
             f"{write_s:.1f} s; in the page cache), repack cache {cache_gb:.2f} GB:", "",
             "| load | seconds |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in times.items() if k != "first"]
    return "\n".join(lines) + "\n"


@torch.inference_mode()
def timeline(preset: str, out: Path | None, symmetric: bool = True) -> None:
    """The kernels of one replay of the decode step's CUDA graph (the whole preset, as the benchmark
    runs it), from the profiler's trace: per kernel of a layer (in launch order) the median duration
    over the layers and the median gap from the previous kernel's end to its start (negative: the
    two overlap, as dependent launches do). What a layer costs beyond its kernels' own time is the
    sum of the positive gaps."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    cfg = int4_config(preset, symmetric)
    be = CudaBackend(cfg=cfg, source=RandomInt4(cfg), max_context=CONTEXT)
    cache = be.new_cache()
    prompt = text_prompt(be.cfg, 32)
    logits = prefill(be, prompt, cache)
    _, graph_us, _, _ = decode_rate(be, cache, logits, int(prompt.position_ids.max()) + 1)
    g = cache.graphs[max(cache.graphs)]
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(3):
            g.replay()
        torch.cuda.synchronize()
    trace = Path(out or "/tmp") / f"timeline_{preset}.json"
    trace.parent.mkdir(parents=True, exist_ok=True)
    p.export_chrome_trace(str(trace))
    ev = sorted((e for e in json.loads(trace.read_text())["traceEvents"] if e.get("cat") == "kernel"),
                key=lambda e: e["ts"])
    n = be.cfg.num_hidden_layers
    if len(ev) < 3 * n:
        print(f"the profiler recorded {len(ev)} kernels of 3 graph replays: too few to time the layers")
        return
    ev = ev[len(ev) * 2 // 3:]  # the last replay
    short = [re.sub(r"^void |\(.*|\w+::", "", e["name"])[:60] for e in ev]  # kernel<template args>
    # a layer: the launches from one start of its first kernel (the one that repeats n times) to the next
    first = next([i for i, s in enumerate(short) if s == name] for name in short if short.count(name) == n)
    per = first[1] - first[0]
    print(f"{preset}: graph {graph_us:.1f} us a token (events); the traced replay: {len(ev)} kernels, "
          f"{ev[-1]['ts'] + ev[-1]['dur'] - ev[0]['ts']:.1f} us first start to last end, {n} layers of {per}")
    print("| kernel (a layer, launch order) | us (median over layers) | gap from the previous end, us |")
    print("|---|---|---|")
    own = gaps = 0.0
    for j in range(per):
        idx = [i + j for i in first[:-1]]
        dur = statistics.median(ev[i]["dur"] for i in idx)
        gap = statistics.median(ev[i]["ts"] - (ev[i - 1]["ts"] + ev[i - 1]["dur"]) for i in idx)
        own, gaps = own + dur, gaps + max(gap, 0.0)
        print(f"| {short[first[0] + j]} | {dur:.2f} | {gap:+.2f} |")
    span = statistics.median(ev[b + per]["ts"] - ev[b]["ts"] for b in first[:-1])
    print(f"a layer, start to the next layer's start: {span:.1f} us (median); its kernels' own time {own:.1f} us; "
          f"positive gaps {gaps:.1f} us")
    rest = [f"{short[i]} {ev[i]['dur']:.1f}" for i in range(len(ev)) if i < first[0] or i >= first[-1] + per]
    print("outside the layers (us):", ", ".join(rest))


def profile(preset: str, layers: int = 4, prefill_media: bool = False) -> None:
    """The GPU kernels of one eager decode step (a `layers`-deep cut of the preset), by total time;
    with prefill_media, of the TTFT prompt's prefill instead."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    raw = {**PRESETS[preset], "num_hidden_layers": layers}
    cfg = int4_config(preset)
    cfg = M3Config.from_dict({**raw, "quantization_config": cfg.quantization_config})
    be = CudaBackend(cfg=cfg, source=RandomInt4(cfg), max_context=CONTEXT, graphs=False)
    cache = be.new_cache()
    prefill(be, text_prompt(cfg, 32), cache)
    def step():
        be.forward(torch.tensor([[100]]), torch.full((3, 1, 1), 40), None, None, cache)

    if prefill_media:
        mp, _ = media_prompt(cfg)

        def step():
            cache.truncate(0, torch.zeros(1, dtype=torch.bool))
            prefill(be, mp, cache)
    for _ in range(3):
        step()
        cache.n -= 0 if prefill_media else 1
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    print(f"{'prefill of the TTFT prompt' if prefill_media else 'decode step'}, {layers} layers: "
          f"{1e3 * (time.perf_counter() - t0):.2f} ms wall")
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        step()
        torch.cuda.synchronize()
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=30))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write results.json and table.md here")
    ap.add_argument("--smollm2", type=Path, help="an imported SmolLM2 checkpoint (m3edge import, Q4_1 carried)")
    ap.add_argument("--only", nargs="*", default=["lite-24g", "lite-16g"])
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 torch baseline")
    ap.add_argument("--zero-points", action="store_true",
                    help="the table's rows and --timeline with int4 zero points (what `m3edge quantize` writes without "
                         "--sym) instead of symmetric weights (--profile and --load stay symmetric)")
    ap.add_argument("--ab", nargs="*", default=[], choices=["attn", "norm", "post", "early"],
                    help="also time decode with each of these fusions off: attn = rope_qkv + SDPA in place of the "
                         "decode attention kernel, norm = the input RMSNorm in its own launch, post = the second "
                         "norm and attention's residual add in their own launch, early = the shared expert's "
                         "gate+up after routing instead of during it")
    ap.add_argument("--slabs", nargs="*", default=[], metavar="GU/DN", type=slabs_arg,
                    help="also time decode with the one-token MoE pair's slabs per CTA forced (gate+up / down, e.g. "
                         "4/8; 0 = the plan's)")
    ap.add_argument("--profile", action="store_true", help="only list the kernels of one decode step")
    ap.add_argument("--timeline", action="store_true",
                    help="only time the kernels of one replay of the first --only preset's decode graph, and the gaps "
                         "between them (the trace is written to --out)")
    ap.add_argument("--profile-prefill", action="store_true", help="only list the kernels of the TTFT prefill")
    ap.add_argument("--load", type=Path, metavar="WORK_DIR",
                    help="only time loads from disk (repack cache off / cold / warm) of a 4-layer cut of the first "
                         "--only preset, written under WORK_DIR (removed after)")
    args = ap.parse_args()
    if args.timeline:
        return timeline(args.only[0], args.out, symmetric=not args.zero_points)
    if args.profile or args.profile_prefill:
        return profile(args.only[0], prefill_media=args.profile_prefill)
    if args.load:
        text = run_load(args.only[0], 4, args.load)
        print(text)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "load.md").write_text(text)
        return
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw:.0f} GB/s", flush=True)
    rows = []
    for preset in args.only:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        cfg = int4_config(preset, symmetric=not args.zero_points)
        be = CudaBackend(cfg=cfg, source=RandomInt4(cfg), max_context=CONTEXT)
        load_s = time.perf_counter() - t0
        load_peak = torch.cuda.max_memory_allocated() / GIB
        torch.cuda.reset_peak_memory_stats()  # the run's peak from here: weights + cache + scratch
        row = run_cuda(preset + (" (zero points)" if args.zero_points else ""), be, bw, args.ab, args.slabs)
        row.update(load_s=load_s, load_peak_gib=load_peak, plan_gib=be.plan.total / GIB)
        rows.append(row)
        print(row, flush=True)
        del be
        if not args.no_bf16:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                rows.append(run_bf16(preset, M3Config.from_dict(PRESETS[preset]), bw))
                print(rows[-1], flush=True)
            except torch.OutOfMemoryError as e:  # say it in the table, keep the run going
                print(f"{preset} bf16: out of memory ({e})".splitlines()[0], flush=True)
    if args.smollm2:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        rows += run_smollm2(args.smollm2, bw)

    lines = [f"{torch.cuda.get_device_name()}, copy bandwidth {bw:.0f} GB/s, batch 1, {CONTEXT}-token cache\n",
             "| model | backend | decode tok/s (graph) | decode tok/s (step) | roofline tok/s | % roofline (graph / step) "
             "| MB read / token | TTFT ms (tokens) | peak VRAM GiB (alloc / reserved) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        roof = r.get("roofline_tps", float("nan"))
        pct = (f"{100 * r['graph_tps'] / roof:.0f}% / {100 * r['step_tps'] / roof:.0f}%"
               if roof == roof and r["graph_tps"] == r["graph_tps"] else
               f"- / {100 * r['step_tps'] / roof:.1f}%" if roof == roof else "-")
        ttft = f"{r['ttft_ms']:.1f} ({r['ttft_tokens']})" if "ttft_ms" in r else "-"
        vram = (f"{r['peak_alloc_gib']:.2f} / {r['peak_reserved_gib']:.2f}" if "peak_reserved_gib" in r else
                f"{r['peak_alloc_gib']:.2f}" if "peak_alloc_gib" in r else "-")
        mb = f"{r['bytes_per_token'] / 1e6:.0f}" if "bytes_per_token" in r else "-"
        num = (lambda v: "-" if v != v else f"{v:.0f}")  # noqa: E731 - nan: not measured for this row
        lines.append(f"| {r['model']} | {r['backend']} | {num(r['graph_tps'])} | {num(r['step_tps'])} | {num(roof)} | "
                     f"{pct} | {mb} | {ttft} | {vram} |")
    for r in rows:
        for feature in args.ab:
            if f"without_{feature}" in r:
                off = r[f"without_{feature}"]
                lines.append(f"\n{r['model']} decode tok/s (graph / step): all fusions {r['graph_tps']:.0f} / "
                             f"{r['step_tps']:.0f}, without {feature} {off['graph_tps']:.0f} / {off['step_tps']:.0f}")
        for sl, v in r.get("slabs", {}).items():
            lines.append(f"\n{r['model']} decode tok/s (graph / step) with the one-token MoE's slabs {sl}: "
                         f"{v['graph_tps']:.0f} / {v['step_tps']:.0f}")
    table = "\n".join(lines)
    save_results(args.out, rows, table)
    print("\n" + table)


if __name__ == "__main__":
    main()

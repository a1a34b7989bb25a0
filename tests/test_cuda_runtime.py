"""The cuda backend (m3edge/runtime/cuda.py): its memory plan on the CPU; on the GPU (-m gpu), greedy
tokens equal to the torch reference on the same dequantized weights, and the refusal of a context that
does not fit."""

import os
import re
from pathlib import Path

import pytest
import torch

from m3edge.errors import M3Error
from m3edge.model.m3lite import M3Config, expected_tensors
from m3edge.model.scheme import Scheme
from m3edge.model.synth import PRESETS


def _int4_packed(cfg: M3Config, scheme: Scheme) -> dict:
    return {n: (n.removesuffix(".weight"), scheme) for n in expected_tensors(cfg)
            if ".layers." in n and n.endswith("_proj.weight")}


def test_memory_plan_names_the_largest_context_that_fits():
    from m3edge.runtime.cuda import ContextTooLarge, plan_memory

    cfg = M3Config.from_dict(PRESETS["lite-24g"])
    packed = _int4_packed(cfg, Scheme(4, 128, False))
    free = 19 * 2**30
    plan = plan_memory(cfg, packed, 32768, free)
    # int4 g128 with zero points: 4.25 + 8 / 128 bits a weight; the rest bf16 (lm_head too: no W8 kernel yet)
    assert 16.5 * 2**30 < plan.weights < 17.9 * 2**30
    with pytest.raises(ContextTooLarge) as e:
        plan.check()
    msg = str(e.value)
    n = int(re.search(r"the largest context that fits is (\d+) tokens", msg).group(1))
    assert "32768-token context needs" in msg and "GiB is free" in msg and "\n" not in msg
    assert 0 < n < 32768
    plan_memory(cfg, packed, n, free).check()  # the named context fits ...
    with pytest.raises(ContextTooLarge):
        plan_memory(cfg, packed, n + 1, free).check()  # ... and one more token does not
    with pytest.raises(ContextTooLarge, match="not even the weights and scratch fit"):
        plan_memory(cfg, packed, 1024, 8 * 2**30).check()


def test_cuda_backend_refused_in_one_sentence_without_a_gpu(tiny_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from m3edge.quantize.pipeline import Options, quantize_checkpoint
    from m3edge.runtime.backends import resolve_backend

    q, _ = quantize_checkpoint(tiny_dir, tmp_path / "q", Options(scheme=Scheme(4, 32, True)))
    with pytest.raises(M3Error, match=r"^the cuda backend cannot run here: .+"):
        resolve_backend("cuda", q)
    with pytest.raises(M3Error, match="is not quantized and the cuda backend runs int4/int8 models"):
        resolve_backend("cuda", tiny_dir)


def test_sync_free_routing_equals_the_reference():
    """NativeMoE.route (every router on every token, no host sync: capturable) picks what route() does."""
    from m3edge.model.m3lite import MoE
    from m3edge.runtime.cuda import NativeMoE

    cfg = M3Config.from_dict(PRESETS["tiny"])
    torch.manual_seed(0)
    moe = MoE(cfg)
    for r in moe.routers:
        torch.nn.init.normal_(r.weight)
    x = torch.randn(64, cfg.hidden_size)
    modality = torch.randint(0, 3, (64,))
    fusion_ok = torch.rand(64) < 0.5
    w0, i0 = moe.route(x, modality, fusion_ok)
    nm = NativeMoE(moe, None)
    nm.prepare()
    w1, i1 = nm.route(x, modality, fusion_ok)
    assert torch.equal(i0, i1)
    torch.testing.assert_close(w1, w0, rtol=1e-5, atol=1e-7)  # fp32 sums in another order
    assert not fusion_ok.all() and (i0[~fusion_ok] < cfg.num_experts - cfg.num_fusion_experts).all()


@pytest.mark.parametrize("bits,n", [(8, 1003), (4, 997), (8, 64)])
def test_dequantize_by_row_blocks_is_exact(bits, n):
    """What the backend dequantizes (lm_head int8, linears the kernels refuse) goes in row blocks, the
    zero points' packed words sliced to match: equal to dequantizing the whole."""
    from m3edge.model.packing import dequantize_linear, pack_linear
    from m3edge.runtime.cuda import _dequantize_into

    s = Scheme(bits, 64, False)
    lo, hi = (-8, 8) if bits == 4 else (-128, 128)
    q = torch.randint(lo, hi, (n, 256), dtype=torch.int8)
    scale = (torch.rand(n, 4) * 0.01 + 1e-3).bfloat16().float()
    t = pack_linear(q, scale, torch.randint(lo, hi, (n, 4), dtype=torch.int32), s, scale_dtype=torch.bfloat16)
    out = torch.empty(n, 256)
    _dequantize_into(out, t, s, rows=64)
    assert torch.equal(out, dequantize_linear(t, s))


def test_dropped_caches_give_their_slot_back():
    from m3edge.runtime.cuda import StaticKVCache, _Slot

    cfg = M3Config.from_dict(PRESETS["tiny"])
    free: list = []
    slot = _Slot.make(cfg, 16, torch.device("cpu"), torch.bfloat16)
    cache = StaticKVCache(cfg, slot, free.append)
    assert cache.capacity == 16 and cache.length == 0 and cache.kbuf is slot.kbuf
    k = torch.ones(1, cfg.num_key_value_heads, 3, cfg.head_dim, dtype=torch.bfloat16)
    kk, _ = cache.update(0, k, k)
    assert kk.shape[2] == 3 and not free
    del cache, kk
    assert free == [slot]


def test_allocator_grows_in_place_unless_the_user_configured_it(monkeypatch):
    """The cuda backend asks torch's allocator for expandable segments (less reserved memory) only
    when the user has not set PYTORCH_CUDA_ALLOC_CONF / PYTORCH_ALLOC_CONF. The setter is replaced
    here (no GPU); the GPU test of the refused context checks the real allocator's segments."""
    from m3edge.runtime import cuda

    calls = []
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", calls.append, raising=False)
    for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(var, raising=False)
    cuda._grow_in_place()
    assert calls == ["expandable_segments:True"]
    for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.setenv(var, "max_split_size_mb:128")
        cuda._grow_in_place()
        monkeypatch.delenv(var)
    assert calls == ["expandable_segments:True"]


@pytest.mark.parametrize("group", [128, -1])
def test_int8_as_two_int4_planes_is_exact(group):
    """W8Linear's split: the two int4 linears dequantize to the int8 one exactly (fp32), through
    the kernels' repack as well (its bit-exact reference is tested in test_cuda_kernels)."""
    from m3edge.model.packing import dequantize_linear, pack_linear
    from m3edge.runtime import native
    from m3edge.runtime.cuda import _w8_linear, split_int8

    s = Scheme(8, group, True)
    n, k = 192, 256
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    q[0, :4] = torch.tensor([-128, 127, -1, 0], dtype=torch.int8)
    scale = (torch.rand(n, s.n_groups(k)) * 0.01 + 1e-4).bfloat16().float()
    t = pack_linear(q, scale, None, s)
    t_hi, t_lo, s_hi, s_lo = split_int8(t, s)
    assert torch.equal(dequantize_linear(t_hi, s_hi) + dequantize_linear(t_lo, s_lo), dequantize_linear(t, s))
    w8 = _w8_linear(t, s, rows=64)  # row blocks, concatenated: the same as one repack
    assert torch.equal(w8.hi.w, native.repack(t_hi, s_hi).w) and torch.equal(w8.lo.zeros, native.repack(t_lo, s_lo).zeros)


# ---------------------------------------------------------------------------------------------- GPU


def _greedy(backend, prompt, steps: int, force: list[int] | None = None):
    """Greedy tokens and each step's logits [V] (fp32, CPU); `force` feeds those tokens instead."""
    cache = backend.new_cache()
    logits = backend.forward(prompt.input_ids[None], prompt.position_ids[:, None], prompt.image_patches,
                             prompt.audio_features, cache).float().cpu()
    pos = int(prompt.position_ids.max()) + 1
    toks, seen = [], []
    for i in range(steps):
        seen.append(logits)
        t = int(logits.argmax()) if force is None else force[i]
        toks.append(t)
        logits = backend.forward(torch.tensor([[t]]), torch.full((3, 1, 1), pos), None, None, cache).float().cpu()
        pos += 1
    return toks, seen


def _check_greedy(model_dir, prompt, dtype, steps: int = 64, equal: bool = True) -> list[int]:
    """The cuda backend's logits with dtype activations, fed the fp32 torch reference's greedy tokens on
    the same dequantized weights, are no further from the reference's than the torch reference's own
    in that dtype; with `equal`, its greedy tokens are the reference's. Equality needs the errors
    below the reference's top-1 / top-2 gaps along the path: bf16's (~0.6 of SmolLM2's logits, torch's
    own bf16 as much) are not, over 64 tokens of any prompt tried; fp16's are. The prompts and seeds
    are fixed; the smallest gap is printed next to the errors."""
    from m3edge.runtime.backends import TorchBackend
    from m3edge.runtime.cuda import CudaBackend

    ref = TorchBackend(model_dir, dtype=torch.float32, device="cuda")
    want, ref_logits = _greedy(ref, prompt, steps)
    del ref
    low = TorchBackend(model_dir, dtype=dtype, device="cuda")
    _, low_logits = _greedy(low, prompt, steps, force=want)
    del low
    cuda = CudaBackend(model_dir, max_context=2048, dtype=dtype)
    got, _ = _greedy(cuda, prompt, steps)
    _, forced = _greedy(cuda, prompt, steps, force=want)

    def err(logits):
        return max(float((a - b).abs().max()) for a, b in zip(logits, ref_logits))

    ours, torch_low = err(forced), err(low_logits)
    gap = min(float(v[0] - v[1]) for v in (lg.topk(2).values for lg in ref_logits))
    print(f"{model_dir.name}: {steps} steps, max logit error vs fp32: cuda {ours:.4f}, torch {dtype} {torch_low:.4f}; "
          f"smallest top-2 gap {gap:.4f}; equal {got == want}")
    assert ours <= 1.5 * torch_low + 1e-3
    assert got == want or not equal
    return got


@pytest.mark.gpu
def test_smollm2_int4_greedy_equals_the_reference(smol_carried):
    """The embedded default as the file stores it (Q4_1: int4 g32 with float minimums, every linear on
    the kernels), decode through the CUDA graphs: fp16 tokens equal, bf16 numerics as torch's bf16."""
    from m3edge.model.checkpoint import read_config
    from m3edge.model.tokenizer import Tokenizer
    from m3edge.prompt import build_prompt
    from m3edge.runtime.cuda import CudaBackend, FusedQKVAttention, NativeDense

    tok = Tokenizer.from_dir(smol_carried)
    cfg = read_config(smol_carried)
    be = CudaBackend(smol_carried, max_context=256)
    assert all(isinstance(layer.self_attn, FusedQKVAttention) and isinstance(layer.mlp, NativeDense)
               for layer in be.model.layers)
    del be
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": SMOL_PROMPT}]))
    prompt = build_prompt(ids, cfg)
    _check_greedy(smol_carried, prompt, torch.bfloat16, equal=False)
    print(tok.decode(_check_greedy(smol_carried, prompt, torch.float16)))


SMOL_PROMPT = "Tell me a long story about a dragon who learns to read."
SEED = 1  # weights of the small model: a seed whose greedy path has clear margins (see _check_greedy)


def _small_m3(tmp_path, scheme: Scheme = Scheme(4, 64, False)):
    """A tiny-shaped M3-Lite whose every linear the kernels take (out / in multiples of 64)."""
    from m3edge.model.synth import write_random
    from m3edge.quantize.pipeline import Options, quantize_checkpoint

    raw = {**PRESETS["tiny"], "hidden_size": 128, "head_dim": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
           "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64, "torch_dtype": "bfloat16",
           "rope_scaling": {"rope_type": "default", "mrope_section": [8, 4, 4], "mrope_interleaved": True}}
    src = write_random(raw, tmp_path / "small", seed=SEED)
    q, _ = quantize_checkpoint(src, tmp_path / f"small-int{scheme.bits}", Options(scheme=scheme))
    return q


def _repacked(model) -> dict[str, torch.Tensor]:
    """Every tensor of the model's kernel-layout weights, by module path and role."""
    from m3edge.runtime import native

    out = {}
    for name, mod in model.named_modules():
        for attr, v in vars(mod).items():
            ws = ([v.gate_up, v.down] if isinstance(v, native.W4Experts) else [v] if isinstance(v, native.W4Weights)
                  else [])
            for j, w in enumerate(ws):
                for f in ("w", "scales", "mins", "zeros"):
                    if getattr(w, f) is not None:
                        out[f"{name}.{attr}.{j}.{f}"] = getattr(w, f)
    return out


def test_memory_plan_counts_what_the_model_holds(tmp_path):
    """The plan's weight bytes are the bytes build_model places, for an int4 and an all-int8 model: int8
    attention / shared-expert linears and the lm_head as W8Linear's two planes, int8 routed experts and
    everything else dequantized (built on the CPU: the repack runs anywhere)."""
    from m3edge.model.checkpoint import TensorFiles, checkpoint_tensors, read_config
    from m3edge.runtime.cuda import W8Linear, build_model, plan_memory

    for scheme in (Scheme(4, 64, False), Scheme(8, 64, True)):
        q = _small_m3(tmp_path / f"b{scheme.bits}", scheme)
        cfg = read_config(q)
        packed = checkpoint_tensors(cfg)[1]
        model = build_model(cfg, TensorFiles(q), packed, torch.device("cpu"), torch.bfloat16)
        held = [*model.parameters(), *_repacked(model).values()]
        held += [m.bias for m in model.modules()
                 if (hasattr(m, "wt") or isinstance(m, W8Linear)) and getattr(m, "bias", None) is not None]
        w8 = [n for n, m in model.named_modules() if isinstance(m, W8Linear)]
        if scheme.bits == 8:
            assert "lm_head" in w8 and any("self_attn.o_proj" in n for n in w8) and any("shared_experts" in n for n in w8)
        assert sum(t.numel() * t.element_size() for t in held) == plan_memory(cfg, packed, 64, 2**40).weights, scheme


class _NoPacked:
    """The checkpoint's tensors, refusing the packed ones: a load that reads the cache must not ask."""

    def __init__(self, files):
        self.files = files

    def names(self):
        return self.files.names()

    def get(self, name):
        assert not name.endswith(("weight_packed", "weight_scale", "weight_zero_point")), f"read {name}"
        return self.files.get(name)


def test_repack_cache_is_made_once_then_read_instead_of_the_checkpoint(tmp_path, capsys):
    """First load: one file per layer (+ the int8 lm_head's) in the cache; second load: the same
    tensors bit for bit, without one packed tensor read; a damaged file is repacked and written again;
    a changed checkpoint gets a new folder and its old one is removed; a folder that cannot be written
    is said once and the load goes on."""
    from m3edge.model.checkpoint import TensorFiles, checkpoint_tensors, read_config
    from m3edge.runtime.cuda import W8Linear, build_model
    from m3edge.runtime.repack_cache import RepackCache

    q = _small_m3(tmp_path)
    cfg = read_config(q)
    packed = checkpoint_tensors(cfg)[1]
    cpu, root = torch.device("cpu"), tmp_path / "cache"

    def load(source=None, cache_root=root):
        return build_model(cfg, source or TensorFiles(q), packed, cpu, torch.bfloat16,
                           cache=RepackCache(q, cpu, 1 << 20, root=cache_root))

    first = load()
    files = sorted((root / "repack").glob("*/*.safetensors"))
    w8 = isinstance(first.lm_head, W8Linear)
    assert [f.name for f in files] == [f"layer-{i:04d}.safetensors" for i in range(cfg.num_hidden_layers)] + \
        (["lm_head.safetensors"] if w8 else [])
    ref = _repacked(first)
    assert len(ref) >= 4 * cfg.num_hidden_layers
    second = load(_NoPacked(TensorFiles(q)))
    got = _repacked(second)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))

    files[0].write_bytes(files[0].read_bytes()[:100])  # a file cut short (a crash mid-write elsewhere)
    got = _repacked(load())
    assert all(torch.equal(got[k], ref[k]) for k in ref) and files[0].stat().st_size > 100

    old_dir = files[0].parent
    (q / "config.json").touch()  # the checkpoint changed: a new key
    os.utime(q / "config.json", ns=(0, 10**18))
    load()
    dirs = list((root / "repack").iterdir())
    assert len(dirs) == 1 and dirs[0] != old_dir

    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder would be")
    capsys.readouterr()
    got = _repacked(load(cache_root=blocked))
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    err = capsys.readouterr().err
    assert err.count("m3edge: cannot write the repack cache") == 1 and "loading without it" in err


@pytest.mark.gpu
def test_m3lite_image_audio_greedy_equals_the_reference(tmp_path):
    """Image + audio prompt (fusion experts open), routed experts in the fused MoE kernels. fp16
    activations: a random model's logits are nearly flat (top-2 gaps ~1% of their spread), finer
    than bf16's rounding resolves."""
    from m3edge.frontends import audio_tokens, image_patches
    from m3edge.model.checkpoint import read_config
    from m3edge.prompt import Image, build_prompt
    from m3edge.quantize.calib import generated_audio, generated_image
    from m3edge.runtime.cuda import CudaBackend, NativeMoE

    q = _small_m3(tmp_path)
    cfg = read_config(q)
    be = CudaBackend(q, max_context=256)
    assert all(isinstance(layer.mlp, NativeMoE) and layer.mlp.shared_slot for layer in be.model.layers)
    del be
    patches, grid = image_patches(generated_image(0))
    ids = [1, 2, cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id, 3,
           cfg.audio_start_token_id, cfg.audio_token_id, cfg.audio_end_token_id, 4, 5]
    prompt = build_prompt(ids, cfg, [Image(patches, grid)], [audio_tokens(generated_audio(0))])
    assert len(set(_check_greedy(q, prompt, torch.float16))) > 2


@pytest.mark.gpu
def test_decode_step_returns_the_callers_own_logits(tmp_path):
    """Each decode step (a graph replay writing one static logits buffer) returns an ordinary CPU
    tensor of its own, which later steps leave alone (the engine keeps a step's logits while it samples)."""
    from m3edge.model.checkpoint import read_config
    from m3edge.prompt import build_prompt
    from m3edge.runtime.cuda import CudaBackend

    q = _small_m3(tmp_path)
    be = CudaBackend(q, max_context=64)
    _, seen = _greedy(be, build_prompt([1, 2, 3, 4], read_config(q)), 4)
    steps = seen[1:]  # the decode graph's
    assert all(s.device.type == "cpu" and s.dtype == torch.float32 and not s.is_pinned() for s in steps)
    assert len({s.data_ptr() for s in steps}) == len(steps)
    assert not torch.equal(steps[0], steps[1])


@pytest.mark.gpu
def test_m3lite_int8_greedy_equals_the_reference(tmp_path, capsys):
    """An all-int8 model: attention and shared-expert linears and the lm_head as W8Linear (one pass of
    the decode kernel at one token), the routed experts dequantized through the reference MoE, so the
    decode runs without graphs and says so once; greedy tokens equal the reference's."""
    from m3edge.model.checkpoint import read_config
    from m3edge.prompt import build_prompt
    from m3edge.runtime.cuda import CudaBackend, W8Linear

    q = _small_m3(tmp_path, Scheme(8, 64, True))
    be = CudaBackend(q, max_context=256)
    assert not be.use_graphs and "decoding without CUDA graphs" in capsys.readouterr().err
    assert isinstance(be.model.lm_head, W8Linear) and isinstance(be.model.layers[0].self_attn.q_proj, W8Linear)
    del be
    prompt = build_prompt([1, 2, 3, 4, 5, 6, 7], read_config(q))
    assert len(set(_check_greedy(q, prompt, torch.float16, steps=32))) > 2


@pytest.mark.gpu
def test_decode_attention_kernel_and_sdpa_paths_agree(tmp_path):
    """The two decode attention paths of FusedQKVAttention (native.attn_decode; rope_qkv + SDPA, taken
    past ATTN_KERNEL_MAX_KV_BYTES) on the same weights: the same greedy tokens, logits within fp16
    rounding of each other, over 24 steps through the decode graphs."""
    from m3edge.model.checkpoint import read_config
    from m3edge.prompt import build_prompt
    from m3edge.runtime.cuda import CudaBackend, FusedQKVAttention

    q = _small_m3(tmp_path)
    prompt = build_prompt([1, 2, 3, 4, 5, 6, 7], read_config(q))
    kernel = CudaBackend(q, max_context=256, dtype=torch.float16)
    assert all(isinstance(x.self_attn, FusedQKVAttention) and x.self_attn.attn_kernel for x in kernel.model.layers)
    want, with_kernel = _greedy(kernel, prompt, 24)
    del kernel
    sdpa = CudaBackend(q, max_context=256, dtype=torch.float16, graphs=False)  # no graph captured at load
    for layer in sdpa.model.layers:
        layer.self_attn.attn_kernel = False
    sdpa.use_graphs = True
    got, without = _greedy(sdpa, prompt, 24)
    err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(with_kernel, without))
    print(f"max logit difference / max logit, attn_decode vs rope_qkv + SDPA: {err:.2e}")
    assert got == want and 0 < err < 1e-2  # 0: the same path ran twice


@pytest.mark.gpu
def test_context_that_does_not_fit_is_refused_on_the_gpu(tmp_path):
    """The real GPU's free memory: a context whose KV cache cannot fit is refused, naming the largest."""
    from m3edge.model.checkpoint import read_config
    from m3edge.model.m3lite import kv_bytes_per_token
    from m3edge.runtime.cuda import ContextTooLarge, CudaBackend

    q = _small_m3(tmp_path)
    too_many = 2 * torch.cuda.mem_get_info()[0] // kv_bytes_per_token(read_config(q))  # twice the free memory
    with pytest.raises(ContextTooLarge, match=r"the largest context that fits is \d+ tokens"):
        CudaBackend(q, max_context=too_many)
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
        x = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")  # a new segment, after the backend's setting
        assert any(seg["is_expandable"] for seg in torch.cuda.memory_snapshot()), "expandable segments are off"
        del x


@pytest.mark.gpu
@pytest.mark.parametrize("norm_topk", [True, False])
def test_route_kernel_matches_the_reference(norm_topk):
    """native.route_topk against m3lite.route: same experts, weights to the activations' rounding."""
    from m3edge.model.m3lite import route
    from m3edge.runtime import native

    cfg = M3Config.from_dict({**PRESETS["lite-24g"], "norm_topk_prob": norm_topk, "routed_scaling_factor": 2.5})
    g = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2**31, ())))
    T, H, E = 37, cfg.hidden_size, cfg.num_experts
    x = torch.randn(T, H, device="cuda", generator=g).bfloat16()
    routers = (0.02 * torch.randn(3, E, H, device="cuda", generator=g)).bfloat16()
    modality = torch.randint(0, 4, (T,), device="cuda", generator=g)  # 3: no router, zero logits
    fusion_ok = torch.rand(T, device="cuda", generator=g) < 0.5
    w_ref, i_ref = route(cfg, list(routers), x, modality, fusion_ok)
    ids, w = native.route_topk(x, routers, modality, fusion_ok, cfg.num_experts_per_tok, cfg.num_fusion_experts,
                               norm_topk, cfg.routed_scaling_factor, extra_id=E)
    zero = modality == 3  # all logits 0: every order is a top-k, compare the weights only
    assert torch.equal(ids[~zero, :-1].long(), i_ref[~zero])
    k = cfg.num_experts_per_tok  # ... and ties go to the lower expert id
    assert (ids[zero, :-1] == torch.arange(k, device="cuda", dtype=ids.dtype)).all()
    torch.testing.assert_close(w[:, :-1], w_ref.float(), rtol=1e-2, atol=1e-3)
    assert (ids[:, -1] == E).all() and (w[:, -1] == 1).all()
    # the layer's RMSNorm in the kernel: as routing native.rmsnorm's output
    nw = (1 + 0.1 * torch.randn(H, device="cuda", generator=g)).bfloat16()
    xs = 3 * x
    ids_n, w_n = native.route_topk(xs, routers, modality, fusion_ok, cfg.num_experts_per_tok, cfg.num_fusion_experts,
                                   norm_topk, cfg.routed_scaling_factor, extra_id=E, norm=(nw, 1e-6))
    ids_r, w_r = native.route_topk(native.rmsnorm(xs, nw, 1e-6), routers, modality, fusion_ok,
                                   cfg.num_experts_per_tok, cfg.num_fusion_experts, norm_topk,
                                   cfg.routed_scaling_factor, extra_id=E)
    assert torch.equal(ids_n[~zero], ids_r[~zero])
    torch.testing.assert_close(w_n, w_r, rtol=1e-2, atol=1e-3)
    fus = ids[~fusion_ok, :-1]
    assert (fus < E - cfg.num_fusion_experts).all()
    # a NaN row (a broken model upstream) still gives k distinct experts, no slot left unset
    x[0] = float("nan")
    ids_nan, _ = native.route_topk(x, routers, modality, fusion_ok, cfg.num_experts_per_tok, cfg.num_fusion_experts,
                                   norm_topk, cfg.routed_scaling_factor)
    assert ((ids_nan[0] >= 0) & (ids_nan[0] < E)).all() and ids_nan[0].unique().numel() == ids_nan.shape[1]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim,qk_norm", [(128, True), (64, False)])
def test_rope_kernel_matches_the_reference(dtype, head_dim, qk_norm):
    """native.rope_qkv against the reference's ops (F.rms_norm, apply_rope in the activations' type):
    q out, k and v into the cache at the device position, the rest of the cache untouched."""
    import torch.nn.functional as F

    from m3edge.model.m3lite import apply_rope
    from m3edge.runtime import native

    g = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2**31, ())))
    T, nh, nkv, D, cap, pos = 5, 8, 2, head_dim, 64, 17
    qkv = torch.randn(T, (nh + 2 * nkv) * D, device="cuda", generator=g).to(dtype)
    qn = (1 + 0.1 * torch.randn(D, device="cuda", generator=g)).to(dtype) if qk_norm else None
    kn = (1 + 0.1 * torch.randn(D, device="cuda", generator=g)).to(dtype) if qk_norm else None
    ang = torch.rand(T, D // 2, device="cuda", generator=g) * 6.28
    cos, sin = torch.cat([ang, ang], -1).cos().to(dtype), torch.cat([ang, ang], -1).sin().to(dtype)
    q_out = torch.full((nh, T, D), float("nan"), dtype=dtype, device="cuda")
    kc = torch.full((nkv, cap, D), 7.0, dtype=dtype, device="cuda")
    vc = kc.clone()
    native.rope_qkv(qkv, qn, kn, cos, sin, q_out, kc, vc, torch.tensor([pos], device="cuda"), 0, nh, nkv, 1e-6)

    q, k, v = qkv.view(T, nh + 2 * nkv, D).split([nh, nkv, nkv], 1)
    if qk_norm:
        q, k = F.rms_norm(q, (D,), qn, 1e-6), F.rms_norm(k, (D,), kn, 1e-6)
    q_ref = apply_rope(q.transpose(0, 1)[None], cos[None], sin[None])[0]  # [nh, T, D]
    k_ref = apply_rope(k.transpose(0, 1)[None], cos[None], sin[None])[0]
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(q_out, q_ref, **tol)
    torch.testing.assert_close(kc[:, pos:pos + T], k_ref, **tol)
    assert torch.equal(vc[:, pos:pos + T], v.transpose(0, 1))
    rest = torch.ones(cap, dtype=torch.bool)
    rest[pos:pos + T] = False
    assert (kc[:, rest] == 7).all() and (vc[:, rest] == 7).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim,nh,nkv,qk_norm", [(128, 32, 4, True), (64, 9, 3, False), (256, 4, 4, True),
                                                     (32, 16, 2, False), (256, 16, 2, True)])
@pytest.mark.parametrize("pos,keys,on_device", [(0, 1, False), (17, 64, True), (3000, 4096, True), (4095, 4096, False)])
def test_attn_decode_kernel_matches_the_reference(dtype, head_dim, nh, nkv, qk_norm, pos, keys, on_device):
    """native.attn_decode against native.rope_qkv (tested above against the reference's ops) followed by
    fp32 SDPA over slots 0..pos: the output, the new slot's k and v in the cache, the rest of the cache
    untouched, the counters left zero, a repeat bit-identical. Shapes: M3-Lite's heads (32 / 4, 128),
    SmolLM2's (9 / 3, 64) and three more (8 q heads of 256: two output quads a thread in the merge); one
    chunk, an empty chunk (17 of 64 slots), many chunks."""
    import torch.nn.functional as F

    from m3edge.runtime import native

    g = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2**31, ())))
    D, cap, eps = head_dim, 4096, 1e-6
    qkv = torch.randn(1, (nh + 2 * nkv) * D, device="cuda", generator=g).to(dtype)
    qn = (1 + 0.1 * torch.randn(D, device="cuda", generator=g)).to(dtype) if qk_norm else None
    kn = (1 + 0.1 * torch.randn(D, device="cuda", generator=g)).to(dtype) if qk_norm else None
    ang = torch.rand(1, D // 2, device="cuda", generator=g) * 6.28
    cos, sin = torch.cat([ang, ang], -1).cos().to(dtype), torch.cat([ang, ang], -1).sin().to(dtype)
    kc = torch.randn(nkv, cap, D, device="cuda", generator=g).to(dtype)
    vc = torch.randn(nkv, cap, D, device="cuda", generator=g).to(dtype)
    k0, v0 = kc.clone(), vc.clone()

    kr, vr, q = kc.clone(), vc.clone(), torch.empty(nh, 1, D, dtype=dtype, device="cuda")
    native.rope_qkv(qkv, qn, kn, cos, sin, q, kr, vr, None, pos, nh, nkv, eps)
    want = F.scaled_dot_product_attention(q[None].float(), kr[None, :, :pos + 1].float(), vr[None, :, :pos + 1].float(),
                                          enable_gqa=nh != nkv)[0, :, 0]  # [nh, D]

    ws = native.attn_workspace(nh, nkv, D, "cuda")
    dev_pos = torch.tensor([pos], device="cuda") if on_device else None
    out = torch.full((nh, D), float("nan"), dtype=dtype, device="cuda")
    native.attn_decode(qkv, qn, kn, cos, sin, kc, vc, dev_pos, pos, keys, nh, nkv, eps, ws, out=out)
    tol = dict(rtol=2e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(out.float(), want, **tol)
    torch.testing.assert_close(kc[:, pos], kr[:, pos], **tol)  # the q/k norms' sums run in another order
    assert (kc[:, pos] != kr[:, pos]).float().mean() < 0.02
    assert torch.equal(vc[:, pos], vr[:, pos])
    rest = torch.ones(cap, dtype=torch.bool)
    rest[pos] = False
    assert torch.equal(kc[:, rest], k0[:, rest]) and torch.equal(vc[:, rest], v0[:, rest])
    assert (ws[1] == 0).all()
    again = native.attn_decode(qkv, qn, kn, cos, sin, kc, vc, dev_pos, pos, keys, nh, nkv, eps, ws)
    assert torch.equal(again, out)


@pytest.mark.gpu
def test_attn_decode_refuses_misaligned_inputs():
    """cos / sin at an odd offset (a view): one sentence, not a misaligned-address fault."""
    from m3edge.runtime import native

    D, nh, nkv, bf = 64, 4, 2, torch.bfloat16
    qkv = torch.zeros(1, (nh + 2 * nkv) * D, dtype=bf, device="cuda")
    cs = torch.zeros(1, D + 1, dtype=bf, device="cuda")[:, 1:]
    kc = torch.zeros(nkv, 16, D, dtype=bf, device="cuda")
    with pytest.raises(ValueError, match="attn_decode: every pointer must be 16-byte aligned"):
        native.attn_decode(qkv, None, None, cs, cs, kc, kc.clone(), None, 3, 8, nh, nkv, 1e-6,
                           native.attn_workspace(nh, nkv, D, "cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rmsnorm_kernel_matches_f_rms_norm(dtype):
    import torch.nn.functional as F

    from m3edge.runtime import native

    g = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2**31, ())))
    for T, H in ((1, 4096), (7, 576), (3, 64)):
        x = (3 * torch.randn(T, H, device="cuda", generator=g)).to(dtype)
        w = (1 + 0.1 * torch.randn(H, device="cuda", generator=g)).to(dtype)
        got = native.rmsnorm(x, w, 1e-6)
        want = F.rms_norm(x.float(), (H,), w.float(), 1e-6).to(dtype)
        torch.testing.assert_close(got, want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-3, atol=1e-3)
        assert (got != want).float().mean() < 0.02  # off by one rounding at most, and rarely
        # with a residual: x becomes x + r (torch's add, bit for bit), normed as above
        r = torch.randn(T, H, device="cuda", generator=g).to(dtype)
        x0 = x.clone()
        got = native.rmsnorm(x, w, 1e-6, residual=r)
        assert torch.equal(x, x0 + r)
        want = F.rms_norm(x.float(), (H,), w.float(), 1e-6).to(dtype)
        torch.testing.assert_close(got, want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-3, atol=1e-3)
        assert (got != want).float().mean() < 0.02


@pytest.mark.slow
def test_small_ops_binder_checks_name_the_shapes():
    """The binder's checks of the decode ops (built without CUDA: on any machine)."""
    from m3edge.runtime import native

    ext = native.load_checks_only()
    bf = torch.bfloat16
    with pytest.raises(ValueError, match=r"rmsnorm: x must be .* multiple of 8, got \[3, 100\] BFloat16"):
        native.raise_for(ext.rmsnorm(torch.zeros(3, 100, dtype=bf), torch.zeros(100, dtype=bf),
                                     torch.zeros(3, 100, dtype=bf), 1e-6))
    with pytest.raises(ValueError, match=r"rmsnorm: w must be \[64\] of x's dtype, got \[64\] Float"):
        native.raise_for(ext.rmsnorm(torch.zeros(3, 64, dtype=bf), torch.zeros(64), torch.zeros(3, 64, dtype=bf), 1e-6))
    with pytest.raises(ValueError, match=r"rmsnorm: residual must be like x \[3, 64\] BFloat16, got \[3, 64\] Half"):
        native.raise_for(ext.rmsnorm(torch.zeros(3, 64, dtype=bf), torch.zeros(64, dtype=bf),
                                     torch.zeros(3, 64, dtype=bf), 1e-6, torch.zeros(3, 64, dtype=torch.float16)))
    x, mod, fus = torch.zeros(2, 256, dtype=bf), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.bool)
    ids, w = torch.zeros(2, 9, dtype=torch.int32), torch.zeros(2, 9)
    with pytest.raises(ValueError, match=r"route_topk: routers must be \[R, E, 256\] of x's dtype .* got \[3, 48, 128\]"):
        native.raise_for(ext.route_topk(x, torch.zeros(3, 48, 128, dtype=bf), mod, fus, ids, w, 8, 8, True, 48, 1.0))
    with pytest.raises(ValueError, match=r"route_topk: ids must be int32 \[2, 8\], got \[2, 9\] Int"):
        native.raise_for(ext.route_topk(x, torch.zeros(3, 48, 256, dtype=bf), mod, fus, ids, w, 8, 8, True, -1, 1.0))
    with pytest.raises(ValueError, match=r"route_topk: x \[2, 256\] BFloat16 is on cpu"):
        native.raise_for(ext.route_topk(x, torch.zeros(3, 48, 256, dtype=bf), mod, fus, ids, w, 8, 8, True, 48, 1.0))
    qkv = torch.zeros(5, 12 * 64, dtype=bf)
    cs = torch.zeros(5, 64, dtype=bf)
    cache = torch.zeros(2, 32, 64, dtype=bf)
    with pytest.raises(ValueError, match=r"rope_qkv: q_out must be \[8, 5, 64\], got \[8, 4, 64\]"):
        native.raise_for(ext.rope_qkv(qkv, None, None, cs, cs, torch.zeros(8, 4, 64, dtype=bf), cache, cache.clone(),
                                      None, 0, 8, 2, 1e-6))
    with pytest.raises(ValueError, match=r"rope_qkv: slots 30..34 are outside the cache's 32"):
        native.raise_for(ext.rope_qkv(qkv, None, None, cs, cs, torch.zeros(8, 5, 64, dtype=bf), cache, cache.clone(),
                                      None, 30, 8, 2, 1e-6))
    one, c1 = qkv[:1].clone(), cs[:1].clone()
    ws, cnt = torch.zeros(8 * 256 * 66), torch.zeros(2, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"attn_decode: one token \(qkv \[1, \.\.\.\]\), got \[5, 768\]"):
        native.raise_for(ext.attn_decode(qkv, None, None, cs, cs, torch.zeros(8, 64, dtype=bf), cache, cache.clone(),
                                         None, 0, 1, 8, 2, 1e-6, ws, cnt))
    with pytest.raises(ValueError, match=r"attn_decode: keys 40 must be in 1..32 \(the cache\)"):
        native.raise_for(ext.attn_decode(one, None, None, c1, c1, torch.zeros(8, 64, dtype=bf), cache, cache.clone(),
                                         None, 3, 40, 8, 2, 1e-6, ws, cnt))
    with pytest.raises(ValueError, match=r"attn_decode: workspace must be float32 of >= 135168 elements, got \[100\]"):
        native.raise_for(ext.attn_decode(one, None, None, c1, c1, torch.zeros(8, 64, dtype=bf), cache, cache.clone(),
                                         None, 3, 8, 8, 2, 1e-6, torch.zeros(100), cnt))
    with pytest.raises(ValueError, match=r"attn_decode: keys 40000 past the most one launch reads \(32768 at head_dim 64\)"):
        big = torch.zeros(2, 40000, 64, dtype=bf)
        native.raise_for(ext.attn_decode(one, None, None, c1, c1, torch.zeros(8, 64, dtype=bf), big, big.clone(),
                                         None, 3, 40000, 8, 2, 1e-6, ws, cnt))
    with pytest.raises(ValueError, match=r"attn_decode: at most 8 q heads per kv head, got 16 / 1"):
        native.raise_for(ext.attn_decode(torch.zeros(1, 18 * 64, dtype=bf), None, None, c1, c1,
                                         torch.zeros(16, 64, dtype=bf), cache[:1].clone(), cache[:1].clone(), None, 3,
                                         8, 16, 1, 1e-6, ws, cnt))


@pytest.mark.gpu
def test_engine_chats_on_the_cuda_backend(smol_carried):
    """The engine end to end on the cuda backend (auto picks it): two turns of one session, the second
    reusing the first's KV cache."""
    from m3edge.runtime.engine import Engine

    with Engine.load(smol_carried, max_context=1024) as engine:
        assert engine.backend.name == "cuda" and engine.max_context == 1024
        chat = engine.chat()
        first = chat.reply("What is the capital of France? Answer in one sentence.", max_tokens=24)
        assert "Paris" in first.text and first.tokens_per_s > 0
        second = chat.reply("And of Italy?", max_tokens=24)
        assert second.generated_tokens > 0 and second.text.strip()
        print(first.text, "|", second.text, f"| {first.tokens_per_s:.0f} tok/s")
        del chat  # its cache's slot (buffers and decode graphs) goes back to the backend
        (slot,) = engine.backend._free
        captured = dict(slot.graphs)
        again = engine.complete("What is the capital of France? Answer in one sentence.", max_tokens=24)
        assert again.text == first.text  # greedy, same prompt, on the reused slot
        assert engine.backend._free == [slot] and slot.graphs == captured  # reused: nothing captured anew


@pytest.mark.gpu
def test_long_prompt_prefills_in_chunks(smol_carried):
    """A prompt longer than PREFILL_CHUNK goes in chunks through the static cache: its logits (fp16), and
    the next decode step's, agree with the fp32 reference as closely as torch's own fp16 does."""
    from m3edge.model.checkpoint import read_config
    from m3edge.model.tokenizer import Tokenizer
    from m3edge.prompt import build_prompt
    from m3edge.runtime.backends import TorchBackend
    from m3edge.runtime.cuda import PREFILL_CHUNK, CudaBackend

    tok = Tokenizer.from_dir(smol_carried)
    text = open("/usr/share/common-licenses/GPL-3").read() if Path("/usr/share/common-licenses/GPL-3").exists() \
        else " ".join(f"Paragraph {i} says the number {i * 7} twice: {i * 7}." for i in range(400))
    ids = tok.encode(text)[: 2 * PREFILL_CHUNK + 77]
    prompt = build_prompt(ids, read_config(smol_carried))
    out = {}
    for name, be in (("fp32", TorchBackend(smol_carried, dtype=torch.float32, device="cuda")),
                     ("torch fp16", TorchBackend(smol_carried, dtype=torch.float16, device="cuda")),
                     ("cuda fp16", CudaBackend(smol_carried, max_context=4096, dtype=torch.float16))):
        out[name] = _greedy(be, prompt, 2, force=[int(ids[-1]), int(ids[-2])])[1]
        del be
    err = {k: max(float((a - b).abs().max()) for a, b in zip(v, out["fp32"])) for k, v in out.items()}
    print(f"{len(ids)}-token prompt: max logit error vs fp32 {err}")
    assert err["cuda fp16"] <= 1.5 * err["torch fp16"] + 1e-3


@pytest.mark.gpu
def test_w8linear_matches_the_int8_matmul():
    """The int8 lm_head as two int4 GEMMs against x @ W^T in fp64 on the dequantized int8 weight."""
    from m3edge.model.packing import dequantize_linear, pack_linear
    from m3edge.runtime.cuda import _w8_linear

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    s = Scheme(8, 128, True)
    n, k = 2048 + 64, 1024
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    scale = (torch.rand(n, k // 128, generator=g) * 0.01 + 1e-4).bfloat16().float()
    t = {name: v.cuda() for name, v in pack_linear(q, scale, None, s).items()}
    w8 = _w8_linear(t, s, rows=1024)
    for M in (1, 3, 17):
        x = torch.randn(M, k, device="cuda").bfloat16()
        ref = x.double() @ dequantize_linear(t, s).double().T
        out = w8(x)
        assert out.dtype == torch.float32
        assert float((out.double() - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.gpu
def test_failed_moe_call_clears_the_shared_experts_flag(tmp_path):
    """At one token routing raises the flag the shared expert's gate+up starts on; if the MoE call
    after it fails, the flag is cleared, so the next call's shared pair still waits for its input."""
    from m3edge.runtime.cuda import CudaBackend, NativeMoE

    be = CudaBackend(_small_m3(tmp_path), max_context=64)
    moe = be.model.layers[0].mlp
    assert isinstance(moe, NativeMoE) and moe._early is not None
    dt, H = be.dtype, be.cfg.hidden_size
    x = torch.randn(1, 1, H, device="cuda").to(dt)
    mod, fus = torch.zeros(1, 1, dtype=torch.int64, device="cuda"), torch.ones(1, 1, dtype=torch.bool, device="cuda")
    ref = moe(x, mod, fus)
    moe.slabs = (3, 3)  # refused by the kernel's checks, after routing ran
    with pytest.raises(ValueError, match="ns_gu must be"):
        moe(x, mod, fus)
    torch.cuda.synchronize()
    assert moe._early.tolist() == [0, 0]
    moe.slabs = (0, 0)
    assert torch.equal(moe(x, mod, fus), ref) and moe._early.tolist() == [0, 0]

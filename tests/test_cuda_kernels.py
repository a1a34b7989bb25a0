"""The native int4 kernels (native/cuda): compile checks and layout references on the CPU, parity on
the GPU (`-m gpu`, run on the GPU machine).

CPU: nvcc compiles every .cu for sm_80/86/89/90 with warnings as errors; the repack is bit-exact
against its numpy reference and, read back through the PTX mma fragment table, gives the canonical
weights; the binder's tensor checks (built without CUDA) name the shapes.
GPU: relative error <= 1e-3 against dequantize-then-fp32-matmul over M in (1, 3, 17, 118, 1024),
every group size, fp16 and bf16, symmetric / zero point / float minimum, fresh random inputs and a
NaN-poisoned output every run; W8A16 (symmetric int8 as two int4 planes in one pass) likewise over
M in (1, 3, 8) and layer shapes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from m3edge.errors import M3Error
from m3edge.model.packing import dequantize_linear, pack_linear
from m3edge.model.scheme import Scheme
from m3edge.runtime import native

CUDA_DIR = Path(native.ROOT) / "cuda"
ARCHS = ["sm_80", "sm_86", "sm_89", "sm_90"]
NVCC_FLAGS = ["-std=c++17", "-O3", "--Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror",
              "-Xptxas", "-warn-double-usage,-warn-lmem-usage,-warn-spills,-Werror"]


# One PTX (compute_80) assembled for the three consumer cards, and compute_90 for the H100: the sources
# have no path between sm_80 and sm_90 (`__CUDA_ARCH__` is only tested against 900), so compute_86 and
# compute_89 would compile the same code as compute_80; ptxas (registers, spills) still runs for every
# card. Half the front-end passes of one gencode per card.
TARGETS = ["-gencode=arch=compute_80,code=[sm_80,sm_86,sm_89]", "-gencode=arch=compute_90,code=sm_90"]


# ---------------------------------------------------------------------------------------------- compile (CPU)


def _nvcc() -> str:
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    assert nvcc is not None, "nvcc is not installed: the CUDA sources must compile here (CI has it)"
    return nvcc


@pytest.mark.slow
def test_nvcc_compiles_every_cu(tmp_path):
    """Every kernel file compiles for every target card (one nvcc per file, the four targets on all
    cores); any warning (spills and local memory included) fails."""
    nvcc = _nvcc()
    sources = sorted(CUDA_DIR.glob("*.cu"))
    assert sources, f"no .cu files in {CUDA_DIR}"
    for src in sources:
        r = subprocess.run([nvcc, *NVCC_FLAGS, *TARGETS, "--threads", "0", "-c", str(src),
                            "-o", str(tmp_path / (src.stem + ".o"))], capture_output=True, text=True, check=False)
        assert r.returncode == 0 and not r.stderr.strip(), f"nvcc {' '.join(ARCHS)} {src.name}:\n{r.stderr}"


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["cta_trace.cu", "stream_probe.cu", "layer_probe.cu"])
def test_nvcc_compiles_the_bench_tools(tmp_path, tool):
    """The profiling tools under bench/ compile for every target card with warnings as errors:
    cta_trace.cu (the kernels with -DM3E_TRACE, one translation unit, and the harness) and
    stream_probe.cu (the weight ring alone) and layer_probe.cu (a decode layer's launches with ideal
    kernels). Register spills are allowed there only: the trace's stamps
    cost the affine MoE down kernel (64 registers without them) 4 bytes of spill in that profiling
    build; the product's kernels are held to no spill above."""
    nvcc = _nvcc()
    src = Path(__file__).resolve().parents[1] / "bench" / tool
    flags = NVCC_FLAGS[:-2] + ["-Xptxas", "-warn-double-usage,-Werror"]  # the ptxas flags without the spill ones
    trace = ["-DM3E_TRACE"] if tool == "cta_trace.cu" else []
    r = subprocess.run([nvcc, *flags, *TARGETS, "--threads", "0", *trace, f"-I{CUDA_DIR}", "-c", str(src),
                        "-o", str(tmp_path / (src.stem + ".o"))], capture_output=True, text=True, check=False)
    assert r.returncode == 0 and not r.stderr.strip(), f"nvcc {' '.join(ARCHS)} {src.name}:\n{r.stderr}"


# ---------------------------------------------------------------------------------------------- layout (CPU)


def _random_packed(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    from m3edge.model.packing import pack_int32

    return pack_int32(q, 4)


@pytest.mark.parametrize("n,k", [(64, 64), (128, 192), (192, 128)])
def test_repack_matches_numpy_reference(n, k):
    packed = _random_packed(n, k, seed=n * 1000 + k)
    got = native.repack_weight(packed, n, k)
    ref = native.repack_numpy(packed.numpy(), n, k)
    assert got.shape == (n // 16, k // 64, 32, 4) and got.dtype == torch.int32
    np.testing.assert_array_equal(got.numpy(), ref)


def test_repack_reads_back_through_the_mma_fragment_table():
    """Reading each lane's word the way the kernel does (register i = nibbles i and i + 4, low half
    first) and placing it by the PTX m16n8k16 A-fragment table gives back the canonical weights."""
    n, k = 64, 128
    packed = _random_packed(n, k, seed=7)
    w = native.repack_weight(packed, n, k).numpy().view(np.uint32)
    u = np.full((n, k), -1, dtype=np.int64)
    for s in range(n // 16):
        for kb in range(k // 64):
            for lane in range(32):
                g, t = lane // 4, lane % 4
                for j in range(4):
                    word = int(w[s, kb, lane, j])
                    # PTX ISA: a0 (row g, k 2t..2t+1), a1 (row g+8), a2 (row g, k 2t+8..), a3 (row g+8, k 2t+8..)
                    for i, (dr, dk) in enumerate([(0, 0), (8, 0), (0, 8), (8, 8)]):
                        lo, hi = (word >> (4 * i)) & 15, (word >> (16 + 4 * i)) & 15
                        r, c = 16 * s + g + dr, 64 * kb + 16 * j + 2 * t + dk
                        u[r, c], u[r, c + 1] = lo, hi
    assert (u >= 0).all(), "some weight was never placed"
    np.testing.assert_array_equal(u, native._nibbles(packed, k).numpy())


@pytest.mark.parametrize("kind", ["sym", "zp", "fmin"])
def test_repack_scales_zeros_mins(kind):
    n, k, group = 64, 256, 64
    tensors, scheme = _make_linear(n, k, group, kind, torch.bfloat16, seed=3)
    wt = native.repack(tensors, scheme)
    G = k // group
    assert wt.scales.shape == (n // 16, G, 16) and wt.scales.dtype == torch.bfloat16
    for r in (0, 17, 63):
        for gi in range(G):
            assert wt.scales[r // 16, gi, r % 16] == tensors["weight_scale"][r, gi]
    if kind == "zp":
        from m3edge.model.packing import _unpack_rows

        z = _unpack_rows(tensors["weight_zero_point"], 4, n)
        assert torch.equal(wt.zeros.transpose(1, 2).reshape(n, G).to(torch.int32), z.to(torch.int32) + 8)
    if kind == "fmin":
        assert torch.equal(wt.mins.transpose(1, 2).reshape(n, G), tensors["weight_min"])


def test_repack_refuses_bad_shapes():
    with pytest.raises(M3Error, match=r"multiples of 64.*\[64, 100\]"):
        native.repack_weight(torch.zeros(64, 13, dtype=torch.int32), 64, 100)
    with pytest.raises(M3Error, match=r"\[96, 64\]"):
        native.repack_weight(torch.zeros(96, 8, dtype=torch.int32), 96, 64)
    tensors, _ = _make_linear(64, 64, 32, "sym", torch.bfloat16, seed=0)
    with pytest.raises(M3Error, match="int8"):
        native.repack(tensors, Scheme(8, 32, True))


# ---------------------------------------------------------------------------------------------- binder checks (CPU)


@pytest.fixture(scope="module")
def checks():
    return native.load_checks_only()  # needs a C++ compiler and ninja (the test extra): a failure is a failure


def _args(M=3, N=128, K=256, group=64, dtype=torch.float16, **over):
    G = K // group if group > 0 else 1
    a = {"x": torch.zeros(M, K, dtype=dtype), "w": torch.zeros(N // 16, K // 64, 32, 4, dtype=torch.int32),
             "scales": torch.zeros(N // 16, G, 16, dtype=torch.bfloat16), "mins": None, "zeros": None,
             "out": torch.zeros(M, N, dtype=dtype), "group": group, "splits": 0, "n_tile": 0}
    a.update(over)
    return a


@pytest.mark.slow
@pytest.mark.parametrize("over,pattern", [
    ({"x": torch.zeros(3, 100, dtype=torch.float16)}, r"x \[3, 100\]"),
    ({"x": torch.zeros(3, 256, dtype=torch.float32)}, r"float16 or bfloat16.*\[3, 256\] Float"),
    ({"x": torch.zeros(0, 256, dtype=torch.float16)}, r"M >= 1.*\[0, 256\]"),
    ({"w": torch.zeros(8, 3, 32, 4, dtype=torch.int32)}, r"K = 192.*x \[3, 256\].*K = 256"),
    ({"w": torch.zeros(8, 4, 32, 4, dtype=torch.int16)}, r"repacked int32.*\[8, 4, 32, 4\] Short"),
    ({"w": torch.zeros(5, 4, 32, 4, dtype=torch.int32), "out": torch.zeros(3, 80, dtype=torch.float16)}, r"N = 80"),
    ({"group": 48}, r"group must be 32, 64, 128 or -1, got 48|group must be 32, 64, 128 or -1 \(per channel\), got 48"),
    ({"scales": torch.zeros(8, 2, 16, dtype=torch.bfloat16)}, r"scales must be \[8, 4, 16\].*\[8, 2, 16\]"),
    ({"scales": torch.zeros(8, 4, 16, dtype=torch.float32)}, r"float16 or bfloat16.*\[8, 4, 16\] Float"),
    ({"zeros": torch.zeros(8, 4, 16, dtype=torch.int32)}, r"zeros must be uint8.*Int"),
    ({"mins": torch.zeros(8, 4, 16, dtype=torch.float16)}, r"mins \[8, 4, 16\] Half must have the scales' dtype"),
    ({"out": torch.zeros(3, 128, dtype=torch.bfloat16)}, r"out must be \[3, 128\] Half or Float, got \[3, 128\] BFloat16"),
    ({"out": torch.zeros(4, 128, dtype=torch.float16)}, r"out must be \[3, 128\]"),
    ({"x": torch.zeros(256, 3, dtype=torch.float16).t()}, r"x \[3, 256\] Half must be contiguous"),
    ({"n_tile": 48}, r"n_tile must be 0 \(automatic\), 16, 32, 64 \(decode kernel\) or 128 \(tile kernel\), got 48"),
    ({"x": torch.zeros(9, 256, dtype=torch.float16), "out": torch.zeros(9, 128, dtype=torch.float16), "n_tile": 16},
     r"decode kernel \(n_tile 16\) takes M <= 8, got x \[9, 256\]"),
    ({"norm_w": torch.zeros(100, dtype=torch.float16)}, r"norm_w must be \[256\] of x's dtype, got \[100\] Half"),
    ({}, r"x \[3, 256\] Half is on cpu; every tensor must be on the same CUDA device"),
    ({"w_lo": torch.zeros(8, 4, 32, 2, dtype=torch.int32)}, r"w_lo .*must be int32 like w \[8, 4, 32, 4\] Int, got "
                                                              r"\[8, 4, 32, 2\] Int"),
    ({"w_lo": torch.zeros(8, 4, 32, 4, dtype=torch.int32), "zeros": torch.zeros(8, 4, 16, dtype=torch.uint8)},
     r"int8 weight in one pass \(w_lo\) is symmetric: no mins or zeros"),
    ({"w_lo": torch.zeros(8, 4, 32, 4, dtype=torch.int32), "n_tile": 128},
     r"int8 weight in one pass \(w_lo\) runs on the decode kernel, not n_tile 128"),
])
def test_binder_checks_name_the_shapes(checks, over, pattern):
    with pytest.raises(ValueError, match=pattern):
        native.raise_for(checks.w4a16_gemm(**_args(**over)))


# ---------------------------------------------------------------------------------------------- GPU parity

KINDS = ["sym", "zp", "fmin"]


def _make_linear(n, k, group, kind, scale_dtype, seed, device="cpu"):
    """Random q / scales (/ zero points / minimums) packed by packing.pack_linear, as a checkpoint holds them."""
    g = torch.Generator().manual_seed(seed)
    scheme = Scheme(4, group, kind == "sym", kind == "fmin")
    G = scheme.n_groups(k)
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(n, G, generator=g) * 0.02 + 0.001).to(scale_dtype).float()
    zero = torch.randint(-8, 8, (n, G), generator=g, dtype=torch.int32) if kind == "zp" else None
    mn = (torch.randn(n, G, generator=g) * 0.05).to(scale_dtype).float() if kind == "fmin" else None
    t = pack_linear(q, scale, zero, scheme, scale_dtype=scale_dtype, minimum=mn)
    return {name: v.to(device) for name, v in t.items()}, scheme


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


@pytest.fixture(scope="module")
def ext():
    return native.load()


def _parity(ext, M, n, k, group, kind, act, scale_dtype, splits=0, seed=0, n_tile=0):
    """(error of the fp32 output vs the fp32 reference, error of the act-dtype output vs the reference
    rounded once to that dtype). The second is what a perfect kernel scores 0 on: a bf16 output alone
    is 2^-9 off the fp32 value (~1.6e-3 relative RMS), so it cannot be held to 1e-3 against fp32."""
    tensors, scheme = _make_linear(n, k, group, kind, scale_dtype, seed=seed)
    w_ref = dequantize_linear(tensors, scheme).cuda()  # fp32 [N, K]
    wt = native.repack({name: v.cuda() for name, v in tensors.items()}, scheme)
    x = torch.randn(M, k, device="cuda", generator=torch.Generator("cuda").manual_seed(seed + 1)).to(act)
    return _poisoned_errors(lambda out: native.w4a16_gemm(x, wt, out=out, splits=splits, n_tile=n_tile),
                            x.double() @ w_ref.double().T, act, f"M={M} N={n} K={k} group={group} {kind}")


def _poisoned_errors(run, ref: torch.Tensor, act: torch.dtype, what: str) -> tuple[float, float]:
    """run(out) into an fp32 and an act-dtype out, each NaN-poisoned first (every element must be
    written): their relative errors against ref (fp64), the second against ref rounded to act."""
    errs = []
    for dt in (torch.float32, act):
        out = torch.full(tuple(ref.shape), float("nan"), dtype=dt, device="cuda")
        run(out)
        torch.cuda.synchronize()
        assert not out.isnan().any(), f"unwritten (NaN) outputs for {what} out {dt}"
        errs.append(_rel_err(out, ref.to(dt)))
    return tuple(errs)


@gpu
@needs_cuda
@pytest.mark.parametrize("act", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("M", [1, 3, 17, 118, 1024])
def test_w4a16_parity(ext, M, group, kind, act):
    if kind == "fmin" and group == -1:
        pytest.skip("the float-minimum form is grouped (Scheme)")
    seed = int(torch.randint(0, 2**30, ()).item())  # fresh inputs every run
    n, k = 192, 1024  # N % 128 == 64: the last CTA has idle warps
    scale_dtype = torch.bfloat16 if act == torch.bfloat16 else torch.float16
    e32, e16 = _parity(ext, M, n, k, group, kind, act, scale_dtype, seed=seed)
    print(f"parity M={M} group={group} {kind} {str(act)[6:]} rel_err_fp32_out={e32:.2e} rel_err_{str(act)[6:]}_out={e16:.2e}")
    assert e32 <= 1e-3 and e16 <= 1e-3, \
        f"relative error {e32:.2e} / {e16:.2e} > 1e-3 (M={M}, group={group}, {kind}, {act}, seed={seed})"


@gpu
@needs_cuda
@pytest.mark.parametrize("M,n,k,group,splits,n_tile", [
    (1, 64, 576, 64, 0, 0), (5, 4096, 4096, 128, 0, 0), (33, 1536, 4096, 128, 3, 0), (118, 256, 1536, -1, 5, 0),
    (1, 14336, 4096, 32, 0, 0), (2, 4096, 14336, 128, 0, 0), (64, 128, 64, 32, 0, 0),
    (8, 256, 14336, 32, 0, 16), (8, 128, 4096, 64, 1, 32)])
@pytest.mark.parametrize("act", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_w4a16_parity_shapes_and_splits(ext, M, n, k, group, splits, n_tile, act):
    """Odd K / 128 (a last chunk of one 64-block), real layer shapes, forced split-K, tiny K, the
    decode kernel forced where its shared memory needs more slices than asked; scales in the other
    16-bit type than the activations."""
    seed = int(torch.randint(0, 2**30, ()).item())
    other = torch.float16 if act == torch.bfloat16 else torch.bfloat16
    for kind in KINDS:
        if kind == "fmin" and group == -1:
            continue
        e32, e16 = _parity(ext, M, n, k, group, kind, act, other, splits=splits, seed=seed, n_tile=n_tile)
        print(f"parity M={M} N={n} K={k} group={group} {kind} splits={splits} {str(act)[6:]} "
              f"rel_err_fp32_out={e32:.2e} rel_err_{str(act)[6:]}_out={e16:.2e}")
        assert e32 <= 1e-3 and e16 <= 1e-3, \
            f"relative error {e32:.2e} / {e16:.2e} (M={M} N={n} K={k} group={group} {kind} splits={splits})"


@gpu
@needs_cuda
@pytest.mark.parametrize("n_tile,splits", [(16, 0), (16, 7), (32, 3), (64, 0), (64, 18), (128, 0)])
@pytest.mark.parametrize("M", [1, 3, 5, 8])
def test_w4a16_decode_paths(ext, M, n_tile, splits):
    """Every N tile of the decode kernel, and the tile kernel forced at small M, over M = 1..8: K = 18
    blocks of 64, so 7 slices of 3 blocks start mid group 128 and 18 slices hold one block each (warps
    with no block); every form, both activation dtypes."""
    seed = int(torch.randint(0, 2**30, ()).item())
    for act in (torch.float16, torch.bfloat16):
        for group in (32, 128, -1):
            for kind in KINDS:
                if kind == "fmin" and group == -1:
                    continue
                e32, e16 = _parity(ext, M, 256, 1152, group, kind, act, act, splits=splits, seed=seed, n_tile=n_tile)
                assert e32 <= 1e-3 and e16 <= 1e-3, (f"relative error {e32:.2e} / {e16:.2e} (M={M} n_tile={n_tile} "
                                                     f"splits={splits} group={group} {kind} {act} seed={seed})")


@gpu
@needs_cuda
def test_w4a16_repeatable_and_split_invariant(ext):
    """Same inputs twice: bit-identical (the split-K reductions are ordered), decode and tile kernels;
    split counts and kernels agree to fp32 rounding."""
    tensors, scheme = _make_linear(512, 2048, 128, "zp", torch.bfloat16, seed=11)
    wt = native.repack({k: v.cuda() for k, v in tensors.items()}, scheme)
    x = torch.randn(4, 2048, device="cuda", dtype=torch.bfloat16)
    ref = native.w4a16_gemm(x, wt, splits=1, out=torch.empty(4, 512, device="cuda"))
    for n_tile in (16, 128):
        a = native.w4a16_gemm(x, wt, splits=4, n_tile=n_tile, out=torch.empty(4, 512, device="cuda"))
        b = native.w4a16_gemm(x, wt, splits=4, n_tile=n_tile, out=torch.empty(4, 512, device="cuda"))
        assert torch.equal(a, b)
        assert _rel_err(a, ref) < 1e-3


@gpu
@needs_cuda
def test_w4a16_errors_name_shapes_on_gpu(ext):
    tensors, scheme = _make_linear(128, 256, 64, "sym", torch.float16, seed=1)
    wt = native.repack({k: v.cuda() for k, v in tensors.items()}, scheme)
    with pytest.raises(ValueError, match=r"x \[2, 192\]"):
        native.w4a16_gemm(torch.zeros(2, 192, device="cuda", dtype=torch.float16), wt)
    with pytest.raises(ValueError, match=r"float16 or bfloat16.*\[2, 256\] Float"):
        native.w4a16_gemm(torch.zeros(2, 256, device="cuda"), wt)
    with pytest.raises(ValueError, match="16-byte aligned"):
        native.w4a16_gemm(torch.zeros(2 * 256 + 1, device="cuda", dtype=torch.float16)[1:].view(2, 256), wt)
    with pytest.raises(ValueError, match="same CUDA device"):
        native.w4a16_gemm(torch.zeros(2, 256, dtype=torch.float16), wt)


def _w8_parity(M, n, k, group, act, seed, splits=0, n_tile=0):
    """w8a16_gemm (one pass over both int4 planes of a symmetric int8 weight) against x @ W^T in fp64
    on the dequantized int8 weight: the errors of the fp32 and the act-dtype output, as _parity's."""
    from m3edge.runtime.cuda import _w8_linear

    g = torch.Generator().manual_seed(seed)
    s = Scheme(8, group, True)
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    q[0, :4] = torch.tensor([-128, 127, -1, 0], dtype=torch.int8)
    scale_dtype = torch.bfloat16 if act == torch.bfloat16 else torch.float16
    scale = (torch.rand(n, s.n_groups(k), generator=g) * 0.001 + 1e-4).to(scale_dtype).float()
    t = {name: v.cuda() for name, v in pack_linear(q, scale, None, s, scale_dtype=scale_dtype).items()}
    w8 = _w8_linear(t, s)
    x = torch.randn(M, k, device="cuda", generator=torch.Generator("cuda").manual_seed(seed + 1)).to(act)
    return _poisoned_errors(lambda out: native.w8a16_gemm(x, w8.hi, w8.lo, out=out, splits=splits, n_tile=n_tile),
                            x.double() @ dequantize_linear(t, s).double().T, act, f"M={M} N={n} K={k} group={group} int8")


@gpu
@needs_cuda
@pytest.mark.parametrize("act", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("M", [1, 3, 8])
def test_w8a16_parity(ext, M, group, act):
    """W8A16 in one pass of the decode kernel (symmetric int8, every group size, both activation
    dtypes, M = 1..8) within 1e-3 of the fp64 product on the dequantized weight; fresh inputs each run."""
    seed = int(torch.randint(0, 2**30, ()).item())
    e32, e16 = _w8_parity(M, 192, 1024, group, act, seed)
    print(f"w8 parity M={M} group={group} {str(act)[6:]} rel_err_fp32_out={e32:.2e} rel_err_{str(act)[6:]}_out={e16:.2e}")
    assert e32 <= 1e-3 and e16 <= 1e-3, f"relative error {e32:.2e} / {e16:.2e} (M={M}, group={group}, {act}, seed={seed})"


@gpu
@needs_cuda
@pytest.mark.parametrize("M,n,k,group,splits,n_tile", [
    (1, 4096, 4096, 128, 0, 0), (2, 14336, 4096, 128, 0, 0), (1, 4096, 14336, 32, 0, 0), (4, 256, 1152, 128, 7, 16),
    (8, 128, 4096, 64, 1, 32), (5, 1024, 1152, -1, 18, 64)])
@pytest.mark.parametrize("act", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_w8a16_parity_shapes_and_splits(ext, M, n, k, group, splits, n_tile, act):
    """Layer shapes (the plan's choice, split-K included at K = 14336), every N tile, forced slices that
    start mid group and slices of one block."""
    seed = int(torch.randint(0, 2**30, ()).item())
    e32, e16 = _w8_parity(M, n, k, group, act, seed, splits=splits, n_tile=n_tile)
    print(f"w8 parity M={M} N={n} K={k} group={group} splits={splits} n_tile={n_tile} {str(act)[6:]} "
          f"rel_err_fp32_out={e32:.2e} rel_err_{str(act)[6:]}_out={e16:.2e}")
    assert e32 <= 1e-3 and e16 <= 1e-3, f"relative error {e32:.2e} / {e16:.2e} (M={M} N={n} K={k} seed={seed})"


@gpu
@needs_cuda
def test_w8a16_refuses_the_tile_kernel(ext):
    """More rows than the decode kernel takes: w8_one_pass says so, and the call names the shapes."""
    from m3edge.runtime.cuda import _w8_linear

    s = Scheme(8, 128, True)
    t = {name: v.cuda() for name, v in
         pack_linear(torch.zeros(128, 512, dtype=torch.int8), torch.full((128, 4), 2.0**-7), None, s).items()}
    w8 = _w8_linear(t, s)
    assert native.w8_one_pass(w8.hi, 8, "cuda") and not native.w8_one_pass(w8.hi, 9, "cuda")
    with pytest.raises(ValueError, match=r"int8 weight in one pass \(w_lo\) needs the decode kernel.*x \[9, 512\]"):
        native.w8a16_gemm(torch.zeros(9, 512, device="cuda", dtype=torch.bfloat16), w8.hi, w8.lo)


@gpu
@needs_cuda
@pytest.mark.parametrize("act", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("M,n,k,group", [(1, 5120, 4096, 128), (3, 2048, 1024, 32), (8, 4096, 576, 64),
                                         (1, 4096, 14336, 128)])
def test_w4a16_fused_rmsnorm(ext, M, n, k, group, kind, act):
    """The decode GEMM with the RMSNorm of x in its prologue (M3-Lite's q/k/v shape first) against
    native.rmsnorm and then the GEMM: the same result up to normed elements that round the other way
    (the sum of squares runs in another order), x itself untouched; a plan with split-K refuses the norm
    in one sentence, and fuses_norm says so beforehand. At K = 14336 the norm's weights do not fit the
    shared memory next to x, and the kernel reads them from global memory instead (one slab per CTA
    since R24: the affine forms' scale metadata fits one K slice there too)."""
    tensors, scheme = _make_linear(n, k, group, kind, torch.bfloat16, seed=3)
    wt = native.repack({name: v.cuda() for name, v in tensors.items()}, scheme)
    assert native.fuses_norm(wt, M, "cuda")
    g = torch.Generator("cuda").manual_seed(int(torch.randint(0, 2**31, ())))
    x = (3 * torch.randn(M, k, device="cuda", generator=g)).to(act)
    w = (1 + 0.1 * torch.randn(k, device="cuda", generator=g)).to(act)
    x0 = x.clone()
    fused = torch.full((M, n), float("nan"), device="cuda")
    native.w4a16_gemm(x, wt, out=fused, norm=(w, 1e-6))
    assert torch.equal(x, x0)
    ref = native.w4a16_gemm(native.rmsnorm(x, w, 1e-6), wt, out=torch.empty(M, n, device="cuda"))
    assert _rel_err(fused, ref) < 1e-3

    small, scheme = _make_linear(64, 4096, 128, "sym", torch.bfloat16, seed=4)
    wt = native.repack({name: v.cuda() for name, v in small.items()}, scheme)
    assert not native.fuses_norm(wt, 1, "cuda")  # 4 CTAs of N: the plan cuts K into slices
    with pytest.raises(ValueError, match=r"fused RMSNorm needs the decode kernel with one K slice.*slices"):
        native.w4a16_gemm(torch.ones(1, 4096, device="cuda", dtype=act), wt, norm=(torch.ones(4096, device="cuda",
                                                                                           dtype=act), 1e-6))


@gpu
@needs_cuda
@pytest.mark.parametrize("act", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("M,n,k,splits,n_tile", [(1, 4096, 4096, 0, 0), (3, 256, 2048, 5, 16), (64, 1024, 512, 0, 0),
                                                   (17, 256, 1024, 3, 128)])
def test_w4a16_residual_epilogue(ext, M, n, k, splits, n_tile, act):
    """The residual add in the GEMM's store (the decode kernel, split-K's last slice, the tile kernel):
    bit for bit the reference's `residual + (x W^T rounded)`; an fp32 out refuses it."""
    tensors, scheme = _make_linear(n, k, 64, "zp", torch.bfloat16, seed=5)
    wt = native.repack({name: v.cuda() for name, v in tensors.items()}, scheme)
    g = torch.Generator("cuda").manual_seed(int(torch.randint(0, 2**31, ())))
    x = torch.randn(M, k, device="cuda", generator=g).to(act)
    res = torch.randn(M, n, device="cuda", generator=g).to(act)
    plain = native.w4a16_gemm(x, wt, splits=splits, n_tile=n_tile)
    fused = native.w4a16_gemm(x, wt, splits=splits, n_tile=n_tile, residual=res)
    assert torch.equal(fused, res + plain)
    with pytest.raises(ValueError, match=r"residual must be \[.*\] of x's dtype with an out of x's dtype"):
        native.w4a16_gemm(x, wt, out=torch.empty(M, n, device="cuda"), residual=res)

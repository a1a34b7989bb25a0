"""GPTQ and AWQ against round-to-nearest on a synthetic layer with outlier input channels.

Quality is the relative output error ||X W^T - X Wq^T|| / ||X W^T|| on held-out rows; format
checks make sure (q, scale, zero) is exactly what the algorithms used and what a file can store.
"""

import pytest
import torch

from m3edge.errors import M3Error
from m3edge.model.scheme import Scheme, dequantize, quantize
from m3edge.quantize.awq import ActStats, awq_quantize, search_input_scale
from m3edge.quantize.gptq import HessianAccumulator, _gptq, gptq_quantize, rtn_quantize

N, K = 256, 512
SCHEMES = [Scheme(4, 128, True), Scheme(4, 128, False), Scheme(4, 32, True)]
IDS = ["int4-g128-sym", "int4-g128-asym", "int4-g32-sym"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These shapes are too small to gain from threads, and OpenMP threads on a busy shared CPU
    make the many small ops 5x slower; restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _layer(seed: int, outliers: bool, decay: bool = True):
    """W [N, K]; activations = randn @ random mixing (decaying spectrum: correlated channels),
    times 20 on 8 random 'outlier' channels; 2048 calibration rows and 1024 held-out rows."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.02
    mix = torch.randn(K, K, generator=g) / K ** 0.5
    if decay:
        mix = mix * 3 * torch.exp(-torch.arange(K) / (K / 8))[:, None]
    x = torch.randn(3072, K, generator=g) @ mix
    if outliers:
        x[:, torch.randperm(K, generator=g)[:8]] *= 20
    return w, x[:2048], x[2048:]


def _stats(cls, x, chunk=500):
    st = cls(x.shape[1])
    for i in range(0, len(x), chunk):  # the pipeline adds prompt by prompt
        st.add(x[i:i + chunk])
    return st


@pytest.fixture(scope="module")
def outlier_layer():
    w, xc, xt = _layer(0, outliers=True)
    return w, xc, xt, _stats(HessianAccumulator, xc), _stats(ActStats, xc)


def _rel(w, xt, q, scale, zero, group=None):
    y = xt @ w.T
    return float((y - xt @ dequantize(q, scale, zero, group).T).norm() / y.norm())


def _check_format(q, scale, zero, s: Scheme, shape):
    n, k = shape
    G = k // s.group_size(k)
    assert q.dtype == torch.int8 and q.shape == (n, k)
    assert int(q.min()) >= s.qmin and int(q.max()) <= s.qmax
    assert scale.dtype == torch.float32 and scale.shape == (n, G) and bool((scale > 0).all())
    assert torch.equal(scale.to(torch.bfloat16).float(), scale), "scale must be exactly representable in bf16"
    if s.symmetric:
        assert zero is None
    else:
        assert zero.dtype == torch.int32 and zero.shape == (n, G)
        assert int(zero.min()) >= s.qmin and int(zero.max()) <= s.qmax


# -- quality against RTN

@pytest.mark.parametrize("s", SCHEMES, ids=IDS)
def test_gptq_beats_rtn(outlier_layer, s):
    w, _, xt, hs, _ = outlier_layer
    rtn = _rel(w, xt, *rtn_quantize(w, s))
    gptq = _rel(w, xt, *gptq_quantize(w, hs.hessian(), s))
    act = _rel(w, xt, *gptq_quantize(w, hs.hessian(), s, act_order=True))
    assert gptq <= 0.8 * rtn, (rtn, gptq)
    assert act <= 0.8 * rtn, (rtn, act)
    assert act < gptq, "act-order should help most with outlier channels"


@pytest.mark.parametrize("s", SCHEMES, ids=IDS)
def test_awq_beats_rtn_on_outliers(outlier_layer, s):
    w, xc, xt, _, st = outlier_layer
    q0, s0, z0 = rtn_quantize(w, s)
    q1, s1, z1 = awq_quantize(w, st, s)
    assert _rel(w, xt, q1, s1, z1) <= 0.9 * _rel(w, xt, q0, s0, z0)
    assert _rel(w, xc, q1, s1, z1) <= 0.9 * _rel(w, xc, q0, s0, z0)


def test_awq_never_worse_than_rtn_without_outliers():
    w, xc, xt = _layer(1, outliers=False, decay=False)  # isotropic-ish: little to gain
    st = _stats(ActStats, xc)
    for s in SCHEMES + [Scheme(8, 128, True), Scheme(4, -1, True)]:
        rtn = rtn_quantize(w, s)
        awq = awq_quantize(w, st, s)
        _check_format(*awq, s, w.shape)
        for x in (xc, xt):
            assert _rel(w, x, *awq) <= _rel(w, x, *rtn), s


# -- format: what is returned is what the algorithm used, and storable

@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("s", SCHEMES + [Scheme(8, -1, False)], ids=IDS + ["int8-channel-asym"])
def test_gptq_format_and_internal_consistency(outlier_layer, s, act_order):
    w, _, _, hs, _ = outlier_layer
    q, scale, zero, dq = _gptq(w, hs.hessian(), s, 0.01, 128, act_order, torch.bfloat16, keep_dq=True)
    _check_format(q, scale, zero, s, w.shape)
    # the weights the error propagation assumed are exactly the stored grid's
    assert torch.equal(dequantize(q, scale, zero), dq)


@pytest.mark.parametrize("s", SCHEMES, ids=IDS)
def test_rtn_and_awq_format(outlier_layer, s):
    w, _, _, _, st = outlier_layer
    q, scale, zero = rtn_quantize(w, s)
    _check_format(q, scale, zero, s, w.shape)
    assert torch.equal(q, quantize(w, scale, zero, s))  # q is RTN on the stored (bf16) scale
    _check_format(*awq_quantize(w, st, s), s, w.shape)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("s", SCHEMES, ids=IDS)
def test_gptq_with_diagonal_hessian_is_rtn(s, act_order):
    """No correlations -> no error propagation: GPTQ must reduce to RTN bit for bit."""
    w, _, _ = _layer(2, outliers=False)
    h = torch.diag(torch.rand(K, generator=torch.Generator().manual_seed(3)) + 0.1)
    for a, b in zip(gptq_quantize(w, h, s, act_order=act_order), rtn_quantize(w, s)):
        assert (a is None and b is None) or torch.equal(a, b)


def test_deterministic(outlier_layer):
    w, _, _, hs, st = outlier_layer
    s = Scheme(4, 128, False)
    for f in (lambda: gptq_quantize(w, hs.hessian(), s), lambda: gptq_quantize(w, hs.hessian(), s, act_order=True),
              lambda: awq_quantize(w, st, s)):
        a, b = f(), f()
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_inputs_not_modified(outlier_layer):
    w, _, _, hs, _ = outlier_layer
    w0, h = w.clone(), hs.hessian()
    h0 = h.clone()
    gptq_quantize(w, h, Scheme(4, 128, True), act_order=True)
    assert torch.equal(w, w0) and torch.equal(h, h0)


# -- statistics and edge cases

def test_hessian_accumulator():
    x = torch.randn(300, 64, generator=torch.Generator().manual_seed(4))
    st = HessianAccumulator(64)
    st.add(x[:100].to(torch.bfloat16).float())
    st.add(x[100:].reshape(4, 50, 64))  # [..., K] is flattened
    assert st.n_tokens == 300
    xr = torch.cat([x[:100].to(torch.bfloat16).float(), x[100:]])
    torch.testing.assert_close(st.hessian(), 2 / 300 * xr.T @ xr, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="63 features"):
        st.add(torch.zeros(2, 63))
    assert torch.equal(HessianAccumulator(8).hessian(), torch.zeros(8, 8))


def test_dead_input_columns(outlier_layer):
    w, xc, xt, _, _ = outlier_layer
    dead = [5, 200, 201]
    xc, xt = xc.clone(), xt.clone()
    xc[:, dead] = 0
    xt[:, dead] = 0
    for s in (Scheme(4, 128, True), Scheme(4, 128, False)):
        for act_order in (False, True):
            q, scale, zero = gptq_quantize(w, _stats(HessianAccumulator, xc).hessian(), s, act_order=act_order)
            wq = dequantize(q, scale, zero)
            assert torch.isfinite(wq).all()
            assert bool((wq[:, dead] == 0).all()), "dead inputs are zeroed, as in the reference"
            assert _rel(w, xt, q, scale, zero) < 0.8 * _rel(w, xt, *rtn_quantize(w, s))
        awq = awq_quantize(w, _stats(ActStats, xc), s)
        assert _rel(w, xt, *awq) < _rel(w, xt, *rtn_quantize(w, s))


def test_partial_last_group():
    """K = 96 with group 64: two groups, the second 32 wide; its grid comes from those 32 inputs only."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 96, generator=g)
    x = torch.randn(512, 96, generator=g) @ torch.randn(96, 96, generator=g)  # correlated inputs: GPTQ has room
    for s in (Scheme(4, 64, True), Scheme(4, 64, False)):
        q, scale, zero = rtn_quantize(w, s)
        assert q.shape == (16, 96) and scale.shape == (16, 2)
        assert torch.equal(scale[:, 1:], rtn_quantize(w[:, 64:], Scheme(4, 32, s.symmetric))[1])
        for q2, sc2, z2 in (gptq_quantize(w, _stats(HessianAccumulator, x).hessian(), s),
                            awq_quantize(w, _stats(ActStats, x), s)):
            assert q2.shape == (16, 96) and sc2.shape == (16, 2)
            assert _rel(w, x, q2, sc2, z2, 64) < _rel(w, x, q, scale, zero, 64)


def test_errors():
    s = Scheme(4, 64, True)
    with pytest.raises(M3Error, match="--group 64 does not divide the 96 inputs"):
        s.check("w", (16, 96))
    s.check("w", (16, 96), partial_groups=True)
    with pytest.raises(ValueError, match=r"Hessian is \(64, 64\), expected \[128, 128\]"):
        gptq_quantize(torch.randn(16, 128), torch.eye(64), s)
    with pytest.raises(M3Error, match="all zero"):
        gptq_quantize(torch.randn(16, 128), torch.zeros(128, 128), s)
    with pytest.raises(M3Error, match="no calibration tokens"):
        awq_quantize(torch.randn(16, 128), ActStats(128), s)
    with pytest.raises(M3Error, match="not positive definite"):
        gptq_quantize(torch.randn(16, 128), -torch.eye(128), s)


def test_gptq_retries_with_more_damping():
    """Slightly indefinite H (eigenvalue -0.05): damping 0.01 fails, the 10x retry (0.1) works."""
    h = torch.eye(128)
    h[0, 1] = h[1, 0] = 1.05
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(5))
    s = Scheme(4, 64, True)
    _check_format(*gptq_quantize(w, h, s), s, w.shape)


@pytest.mark.parametrize("s", SCHEMES, ids=IDS)
def test_awq_never_worse_than_rtn_per_row_on_calibration(s):
    """The search only accepts changes that lower a row's exact calibration error (cross terms
    between groups included), so no output channel may end up worse than RTN."""
    w, xc, _ = _layer(6, outliers=False, decay=False)
    xc = xc[:256]  # few tokens: per-group-only scoring would misjudge some rows
    st = _stats(ActStats, xc)

    def row_err(q, scale, zero):
        return ((xc @ (w - dequantize(q, scale, zero)).T) ** 2).sum(0)  # [N]

    rtn, awq = row_err(*rtn_quantize(w, s)), row_err(*awq_quantize(w, st, s, damp=0.0))
    assert bool((awq <= rtn * (1 + 1e-4)).all()), float((awq / rtn).max())
    assert float(awq.sum()) < 0.97 * float(rtn.sum())


def test_gptq_on_awq_grid():
    """GPTQ's integers on AWQ's activation-aware grid: the grid is kept exactly, and the output
    error is below both AWQ alone and RTN on correlated inputs."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(64, 256, generator=g)
    x = torch.randn(2048, 256, generator=g) @ torch.randn(256, 256, generator=g)
    xt, xe = x[::2], x[1::2]
    s = Scheme(4, 64, False)
    st = _stats(ActStats, xt)
    _, sc, z = awq_quantize(w, st, s)
    q, sc2, z2 = gptq_quantize(w, st.hessian(), s, static_grid=(sc, z))
    assert torch.equal(sc2, sc) and torch.equal(z2, z)
    both = _rel(w, xe, q, sc2, z2)
    assert both < _rel(w, xe, *awq_quantize(w, st, s)) and both < _rel(w, xe, *rtn_quantize(w, s))


# -- AWQ's input-channel scaling

def test_input_scale_helps_outlier_channels_and_alpha_zero_is_rtn(outlier_layer):
    w, xc, xt, _, st = outlier_layer
    s = Scheme(4, 128, False)
    a = search_input_scale([w], st, s)
    assert float(a.max() / a.min()) > 2, "outlier channels should be scaled up"
    q, sc, z = rtn_quantize(w * a, s)
    scaled = dequantize(q, sc, z) / a

    def rel(wh, x):
        return float(((x @ (w - wh).T).norm() / (x @ w.T).norm()))

    rtn = dequantize(*rtn_quantize(w, s))
    assert rel(scaled, xc) < 0.8 * rel(rtn, xc) and rel(scaled, xt) < 0.8 * rel(rtn, xt)
    # nothing to gain (identical channels): no scaling
    x = torch.randn(2048, K, generator=torch.Generator().manual_seed(4))
    assert torch.equal(search_input_scale([w], _stats(ActStats, x * 0 + 1), s), torch.ones(K))

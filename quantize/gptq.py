"""GPTQ (Frantar et al. 2022) for one weight matrix, and the round-to-nearest fallback.

The maths follows the reference implementation (IST-DASLab `gptq.py`, `fasterquant`):
H = 2/n sum x x^T over the calibration inputs; dead inputs (H[i, i] == 0) get H[i, i] = 1 and
W[:, i] = 0; damping adds `damp * mean(diag(H))` to the diagonal; U = chol(H^-1) (upper); columns
are quantized left to right and each column's error, divided by U[i, i], is pushed onto the
columns not yet quantized (inside a block of 128 at once, onto the rest of the matrix lazily when
the block ends).

Grouping, and how it stays a plain group-wise grid (no g_idx in the file):
  - act_order=False: a group's scale / zero come from the *current* (error-updated) weights when
    its first column is reached (reference `static_groups=False`). The block must be a multiple of
    the group so that the whole group lies inside the block copy that holds those updates (the
    reference reads the not-yet-updated full matrix there when group < block; we don't).
  - act_order=True: static groups. Every group's scale / zero is computed up front from the
    original weights; columns are then processed in descending diag(H) order, each with the scale
    of its ORIGINAL group, so the result is the ordinary [N, K/group] layout.
  - group == -1 (one scale per row): computed up front from the original weights, as the
    reference does with groupsize=-1.

Scales are rounded to `scale_dtype` (bf16, what is stored) BEFORE any q is computed, and each
column's error uses exactly (q - zero) * scale in fp32, i.e. `scheme.dequantize(q, scale, zero)`.
Work is done on the transposed weight [K, N] so each per-column step reads contiguous memory.
Memory: about five [K, K] / [N, K] fp32 buffers at the peak (the weight copy, H, its Cholesky
factor, U and an identity for the triangular solve): ~320 MB at 4096 x 4096.
Time: 4096 x 4096, int4 g128: ~3.5 s on 2 CPU threads (~1.5 s of it the Cholesky + solve).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from m3edge.errors import M3Error
from m3edge.model.scheme import Scheme, pad_to_groups, quantize, scale_zero

DAMP_RETRIES = 3  # Cholesky failure: retry with 10x, 100x, 1000x the damping, then raise


class HessianAccumulator:
    """Calibration statistics of one linear layer's input: sum of x x^T [K, K] fp32 and a count.

    Stored as a plain sum (not the reference's running average); `hessian()` returns
    2/n * sum x x^T, which equals the reference's `H *= n/(n+m); H += 2/(n+m) x x^T` recursion.
    """

    def __init__(self, in_features: int):
        self.in_features = in_features
        self._xtx = torch.zeros(in_features, in_features, dtype=torch.float32)  # [K, K]
        self._n = 0

    def add(self, x: torch.Tensor) -> None:
        """x [..., K] (any float dtype): the inputs of some tokens."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"inputs have {x.shape[-1]} features, the layer has {self.in_features}")
        x = x.detach().reshape(-1, self.in_features).to(torch.float32)  # [n, K]
        self._xtx.addmm_(x.T, x)
        self._n += x.shape[0]

    @property
    def n_tokens(self) -> int:
        return self._n

    def hessian(self) -> torch.Tensor:
        """[K, K] fp32, a fresh tensor (callers may modify it): 2/n sum x x^T, zeros if n == 0."""
        if self._n == 0:
            return torch.zeros_like(self._xtx)
        return self._xtx * (2.0 / self._n)


def round_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 scale -> the nearest value of `dtype`, back in fp32, kept > 0 (fp16 can underflow)."""
    r = scale.to(dtype)
    r = torch.where(r > 0, r, torch.full_like(r, torch.finfo(dtype).tiny))
    return r.to(torch.float32)


def grid(w: torch.Tensor, s: Scheme, scale_dtype: torch.dtype):
    """RTN grid of w [N, K]: (scale fp32 [N, G], zero int32 [N, G] | None).

    The scale is already rounded to scale_dtype; the zero is the scheme's, from the unrounded scale.
    """
    scale, zero = scale_zero(w, s)
    return round_scale(scale, scale_dtype), zero


def rtn_quantize(w: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype = torch.bfloat16):
    """Round to nearest: w [N, K] -> (q int8 [N, K], scale fp32 [N, G], zero int32 [N, G] | None)."""
    check_weight(w, scheme, partial_groups=True)
    w = w.detach().to(torch.float32)
    scale, zero = grid(w, scheme, scale_dtype)
    return quantize(w, scale, zero, scheme), scale, zero


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, scheme: Scheme, damp: float = 0.01, block: int = 128,
                  act_order: bool = False, scale_dtype: torch.dtype = torch.bfloat16,
                  static_grid: tuple[torch.Tensor, torch.Tensor | None] | None = None):
    """GPTQ of w [N, K] given H [K, K] -> (q int8 [N, K], scale fp32 [N, G], zero int32 [N, G] | None).

    `static_grid` = (scale, zero) fixes every group's grid up front (e.g. AWQ's activation-aware
    clip search); GPTQ then only chooses the integers. w and H are not modified. Deterministic:
    the same inputs give bit-identical outputs.
    """
    k = w.shape[1]
    w, H = pad_problem(w, H, scheme)
    q, scale, zero, _ = _gptq(w, H, scheme, damp, block, act_order, scale_dtype, keep_dq=False,
                              static_grid=static_grid)
    return q[:, :k].contiguous(), scale, zero


def pad_problem(w: torch.Tensor, H: torch.Tensor, s: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """A partial last group becomes a whole one: zero weight columns, which quantize to exactly 0
    (no error to spread) and change no scale (see `pad_to_groups`), with uncorrelated Hessian rows
    whose diagonal is the mean of the real one, so the damping (a fraction of the mean diagonal)
    stays what it would be without padding."""
    K, K2 = w.shape[1], pad_to_groups(w, s).shape[1]
    if K2 == K:
        return w, H
    Hp = F.pad(H, (0, K2 - K, 0, K2 - K))
    Hp.diagonal()[K:] = H.diagonal().mean()
    return pad_to_groups(w, s), Hp


def _gptq(w, H, s: Scheme, damp, block, act_order, scale_dtype, keep_dq: bool, static_grid=None):
    """gptq_quantize, also returning the dequantized weights the error updates used (or None)."""
    check_weight(w, s)
    N, K = w.shape
    if H.shape != (K, K):
        raise ValueError(f"Hessian is {tuple(H.shape)}, expected [{K}, {K}] for weight [{N}, {K}]")
    g = s.group_size(K)
    static = act_order or g == K or static_grid is not None
    if not static and block % g:
        raise ValueError(f"GPTQ block {block} must be a multiple of the group {g}")
    W = w.detach().to(torch.float32, copy=True)  # [N, K]
    H = H.detach().to(torch.float32, copy=True)  # [K, K]
    if not torch.isfinite(H.diagonal()).all():
        raise M3Error("GPTQ: the Hessian has non-finite entries (NaN/inf in the calibration activations)")
    dead = H.diagonal() == 0
    if dead.all():
        raise M3Error("GPTQ: the Hessian is all zero (no calibration tokens reached this layer); use RTN for it")
    H.diagonal()[dead] = 1.0
    W[:, dead] = 0.0

    G = s.n_groups(K)
    if static_grid is not None:
        scale = static_grid[0].clone()
        zero = None if static_grid[1] is None else static_grid[1].clone()
    elif static:
        scale, zero = grid(W, s, scale_dtype)  # [N, G] from the original (dead-zeroed) weights
    else:
        scale = torch.empty(N, G, dtype=torch.float32)
        zero = None if s.symmetric else torch.empty(N, G, dtype=torch.int32)

    perm = torch.arange(K)
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        H = H[perm][:, perm]
    col_group = (perm // g).tolist()  # original group of the j-th processed column

    Hinv = _inverse_cholesky(H, damp)  # [K, K] upper
    del H

    # Transposed ([K, N], one row per input) so every per-column step touches contiguous memory.
    Wt = (W.T[perm] if act_order else W.T).contiguous()  # [K, N], in processing order
    del W
    Qt = torch.empty(K, N, dtype=torch.int8)
    DQt = torch.empty(K, N, dtype=torch.float32) if keep_dq else None
    scale_t = scale.T.contiguous()  # [G, N]; filled per group when not static
    zero_t = None if zero is None else zero.T.to(torch.float32).contiguous()  # [G, N]
    qmin, qmax = float(s.qmin), float(s.qmax)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = Wt[i1:i2].clone()  # [B, N] current weights of this block
        Err1 = torch.zeros_like(W1)  # [B, N] scaled errors, pushed onto Wt[i2:] when the block ends
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if not static and j % g == 0:  # a group starts: its grid from the current weights
                sc, zc = grid(W1[i:i + g].T, s, scale_dtype)  # [N, 1]
                scale_t[j // g] = sc[:, 0]
                if zc is not None:
                    zero[:, j // g] = zc[:, 0]
                    zero_t[j // g] = zc[:, 0].to(torch.float32)
            gi = col_group[j]
            sc = scale_t[gi]  # [N]
            wc = W1[i]  # [N]
            # same op order as scheme.quantize / dequantize, so the stored q, scale, zero reproduce dq
            if zero_t is None:
                qf = torch.round(wc / sc).clamp_(qmin, qmax)
                dq = qf * sc
            else:
                zf = zero_t[gi]
                qf = torch.round(wc / sc + zf).clamp_(qmin, qmax)
                dq = (qf - zf) * sc
            Qt[j] = qf.to(torch.int8)
            if DQt is not None:
                DQt[j] = dq
            err = (wc - dq) / Hinv1[i, i]  # [N]
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1.0)  # W1[:, i:] -= err Hinv1[i, i:] (transposed)
            Err1[i] = err
        if i2 < K:
            Wt[i2:].addmm_(Hinv[i1:i2, i2:].T, Err1, alpha=-1.0)
    del Wt, Hinv
    if not static:
        scale = scale_t.T.contiguous()

    if act_order:
        inv = torch.argsort(perm)
        Qt, DQt = Qt[inv], None if DQt is None else DQt[inv]
    Q = Qt.T.contiguous()
    DQ = None if DQt is None else DQt.T.contiguous()
    return Q, scale, zero, DQ


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Damp H in place and return U = chol(H^-1), upper (U^T U = H^-1); retry with 10x damping.

    Computed without forming H^-1: with J the reversal permutation, chol(J H J) = L gives
    H = R R^T with R = J L J upper, so U = R^-1 (one Cholesky and one triangular solve; the
    reference's cholesky -> cholesky_inverse -> cholesky gives the same U, ~10x slower on CPU).
    """
    K = H.shape[0]
    mean = float(H.diagonal().mean())
    d = damp
    added = 0.0
    for attempt in range(DAMP_RETRIES + 1):
        H.diagonal().add_(d * mean - added)  # total damping d * mean(diag(H))
        added = d * mean
        L, info = torch.linalg.cholesky_ex(H.flip(0, 1))
        if int(info) == 0 and bool(torch.isfinite(L.diagonal()).all()):
            R = L.flip(0, 1)  # upper, H = R R^T
            del L
            U = torch.linalg.solve_triangular(R, torch.eye(K, dtype=R.dtype), upper=True)
            if bool(torch.isfinite(U.diagonal()).all()):
                return U
        d = d * 10 if d > 0 else 0.01
    raise M3Error(f"GPTQ: the Hessian is not positive definite even with damping {added / mean:g} x mean(diag(H)); "
                  "raise --damp or use more calibration data")


def check_weight(w: torch.Tensor, s: Scheme, partial_groups: bool = False) -> None:
    """w must be [out, in] and fit the scheme (group divides in, packing); M3Error names what failed."""
    if w.dim() != 2:
        raise ValueError(f"weight must be [out, in], got shape {tuple(w.shape)}")
    s.check("weight", tuple(w.shape), partial_groups)

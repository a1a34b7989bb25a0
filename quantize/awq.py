"""Activation-aware scale search (after AWQ, Lin et al. 2023), restricted to what a plain
group-wise int grid of the ORIGINAL weight can hold.

Why not AWQ's per-input-channel scaling: AWQ quantizes w * s (s = mean|x|^alpha per input channel)
and folds 1/s into the previous op (a norm or linear). Here the exported layer is only
(q, scale, zero) per [row, group]: Q(w * s) / s varies inside a group, so it is not on such a
grid, and the previous op is not ours to change (experts share their input, and one norm feeds
several consumers). A constant s per group is representable but does nothing: the RTN grid scales
with the group's range. So the alpha search is dropped.

What is kept is the part that IS representable: choosing each [row, group]'s scale / zero by the
output error it causes on the calibration activations (AWQ's `auto_clip`). For a row with weight
error d = w - w_hat, the output error over the calibration tokens is ||X d||^2 = n d^T H d with
H = X^T X / n [K, K]. Candidates per [row, group] are AWQ's clip ratios 1, 1 - 1/n_grid, ...,
1 - max_shrink (the group's range shrunk by the ratio, then RTN; ratio 1 is plain RTN). AWQ scores
a group in isolation (d_g^T H_gg d_g); we add the cross term with the other groups' current
errors, 2 d_g^T H_g,rest d_rest, so the score is the exact change of the row's total output
error. Starting from RTN, groups are visited in order (Gauss-Seidel, `sweeps` passes) and a
[row, group] only changes when a candidate scores strictly lower than its current choice, so every
row's output error on the calibration statistics only goes down: never worse than RTN there.
Channels with large activations dominate H, so the chosen scales put their weights close to grid
points, which is what AWQ's scaling aims at.

H gets `damp * mean(diag(H))` on its diagonal (default 0.1), mixing in some plain weight error so
that an expert with few tokens (low-rank H) does not over-fit its scales to those tokens.

Statistics: ActStats keeps the sum of x x^T over ALL calibration tokens, [K, K] fp32 (64 MB at
K = 4096: the size of a GPTQ Hessian, and of the 4096-row subsample it replaces), so it is exact
and random-free; its diagonal is the per-channel sum of squares.
Cost per sweep: N K^2 (cross terms) + len(ratios) N K g flops (candidates); group -1 (one group,
no cross terms) costs len(ratios) N K^2.
"""

from __future__ import annotations

import torch

from m3edge.errors import M3Error
from m3edge.model.scheme import Scheme, dequantize, quantize
from m3edge.quantize.gptq import HessianAccumulator, check_weight, grid, pad_problem

CANDIDATE_BUDGET = 1 << 24  # elements of one batch of clip candidates [ratios, N, g] (64 MB fp32)


class ActStats(HessianAccumulator):
    """Calibration statistics for AWQ: sum of x x^T [K, K] fp32 over all tokens and a count.

    `add(x [..., K])`, `n_tokens`, `hessian()` (= 2/n sum x x^T) as in HessianAccumulator;
    `second_moment()` is diag(X^T X) / n, the per-channel mean of x^2.
    """

    def second_moment(self) -> torch.Tensor:
        """[K] fp32: mean of x^2 per input channel (zeros with no tokens)."""
        return self.hessian().diagonal() / 2


def awq_quantize(w: torch.Tensor, x_stats: ActStats, scheme: Scheme, scale_dtype: torch.dtype = torch.bfloat16,
                 n_grid: int = 20, max_shrink: float = 0.5, sweeps: int = 1, damp: float = 0.1):
    """Activation-aware clip search: w [N, K] -> (q int8 [N, K], scale fp32 [N, G], zero int32 [N, G] | None).

    Candidates per [row, group]: ratios 1 - i/n_grid for i = 0 .. max_shrink * n_grid. Deterministic.
    """
    check_weight(w, scheme, partial_groups=True)
    N, K = w.shape
    if x_stats.in_features != K:
        raise ValueError(f"activation statistics have {x_stats.in_features} features, weight has {K} inputs")
    if x_stats.n_tokens == 0:
        raise M3Error("AWQ: no calibration tokens reached this layer; use RTN for it")
    if n_grid < 1 or not 0 <= max_shrink < 1:
        raise ValueError(f"need n_grid >= 1 and 0 <= max_shrink < 1, got {n_grid}, {max_shrink}")
    H = x_stats.hessian()  # [K, K], a fresh copy
    if not torch.isfinite(H.diagonal()).all():
        raise M3Error("AWQ: the activation statistics have non-finite entries (NaN/inf in the calibration inputs)")
    H.diagonal().add_(damp * float(H.diagonal().mean()))
    ratios = [1.0 - i / n_grid for i in range(int(round(max_shrink * n_grid)) + 1)]

    s = scheme
    k_in = K
    W, H = pad_problem(w.detach().to(torch.float32), H, s)  # [N, K] (read only), whole groups
    K = W.shape[1]
    g = s.group_size(k_in)
    G = K // g
    scale, zero = grid(W, s, scale_dtype)  # RTN start: [N, G]
    Q = quantize(W, scale, zero, s)  # [N, K] int8
    D = W - dequantize(Q, scale, zero)  # [N, K] weight error of the current choice

    rc = max(1, min(len(ratios), CANDIDATE_BUDGET // (N * g)))  # ratios evaluated per batch
    for _ in range(sweeps if G > 1 else 1):  # one group: no cross terms, one pass is exact
        for gi in range(G):
            a, b = gi * g, (gi + 1) * g
            Hgg = H[a:b, a:b].contiguous()  # [g, g]
            Wg = W[:, a:b].contiguous()  # [N, g]
            if G > 1:  # cross term with the other groups' current errors: sum_{h != g} D_h H_hg
                c = D @ H[:, a:b]  # [N, g]
                c.addmm_(D[:, a:b], Hgg, alpha=-1.0)
            else:
                c = None
            best = _group_err(D[:, a:b], Hgg, c)  # [N] current choice: kept unless strictly beaten
            for r0 in range(0, len(ratios), rc):
                q, sc, zc, d = _candidates(Wg, ratios[r0:r0 + rc], s, scale_dtype)  # [r, N, g], [r, N]
                e, k = _group_err(d, Hgg, c).min(0)  # [N]: best ratio of this batch per row
                rows = (e < best).nonzero()[:, 0]
                if len(rows):
                    k = k[rows]
                    best[rows] = e[rows]
                    Q[rows, a:b] = q[k, rows]
                    D[rows, a:b] = d[k, rows]
                    scale[rows, gi] = sc[k, rows]
                    if zc is not None:
                        zero[rows, gi] = zc[k, rows]

    return Q[:, :k_in].contiguous(), scale, zero


def _candidates(Wg: torch.Tensor, ratios: list[float], s: Scheme, scale_dtype: torch.dtype):
    """RTN of Wg [N, g] on the grid of its range shrunk by each ratio (values outside clamp).

    -> q int8 [r, N, g], scale fp32 [r, N], zero int32 [r, N] | None, error Wg - w_hat [r, N, g].
    """
    N, g = Wg.shape
    r = len(ratios)
    rt = torch.tensor(ratios, dtype=torch.float32)[:, None, None]
    sc, zc = grid((Wg[None] * rt).reshape(r * N, g), s, scale_dtype)  # [r N, 1]; ratio 1 = RTN exactly
    wr = Wg.expand(r, N, g).reshape(r * N, g)
    q = quantize(wr, sc, zc, s)
    d = (wr - dequantize(q, sc, zc)).reshape(r, N, g)
    return q.reshape(r, N, g), sc.reshape(r, N), None if zc is None else zc.reshape(r, N), d


def _group_err(d: torch.Tensor, Hgg: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """Row error terms that depend on group g: d^T H_gg d + 2 d^T c; d [..., N, g] -> [..., N]."""
    e = (d * (d @ Hgg)).sum(-1)
    if c is not None:
        e += 2 * (d * c).sum(-1)
    return e

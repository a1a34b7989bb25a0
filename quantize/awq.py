"""Activation-aware quantization (after AWQ, Lin et al. 2023): input-channel scaling where a
previous op can absorb it exactly, then a clip search of each group's grid.

1. Scaling (`search_input_scale`). A linear y = x W^T equals (x / s) (W s)^T for any positive s [K]:
   quantizing W s instead of W puts the channels with large activations on a finer share of the
   grid, and 1/s goes into whatever produced x, so the file stays an ordinary group-wise grid of the
   scaled weight. Where it goes (the pipeline does it), per decoder layer:
     up rows   -> down columns  (per expert: silu(g) * (x u^T) is linear in u's rows)
     v rows    -> o columns     (attention is linear in v; with GQA the q heads that read one v
                                 channel share its scale; powers of two, see the pipeline)
   A row-wise quantized producer is indifferent to its rows' scale (each row has its own grid), so
   these scalings only help the consumer; the candidates are scored by the consumer's own output
   error, which is what they change. Not done: AWQ's fold into the RMSNorm before q/k/v and
   gate/up. Measured on SmolLM2-135M with this linear-output score it made held-out perplexity
   worse (AWQ g128 27.45 -> 28.13 for input_layernorm, 28.24 for post_attention_layernorm, and
   also worse on the calibration text itself), while up -> down alone improved it (26.89).
   Scoring both folds by the whole block's output instead, as AWQ does (attention output for
   q/k/v, SwiGLU output for gate/up, 4096 calibration tokens, on top of up -> down and v -> o),
   made it worse as well: 26.91 -> 27.91. On this model the norm folds stay out.
   Candidates are AWQ's: s = rms(x)^alpha normalised to a geometric mean of 1, alpha = 0,
   1/n_grid, ..., (n_grid - 1)/n_grid; alpha = 0 is no scaling, so the choice is never worse than
   RTN on the calibration statistics. The score of a candidate is tr(E H E^T) with
   E = W - Q(W s) / s (the output error over the calibration tokens, H = X^T X), on an evenly
   strided subset of `max_rows` rows when there are more.

2. Clip search (`awq_quantize`, AWQ's `auto_clip`): each [row, group]'s scale / zero chosen by
   the output error it causes on the calibration activations. For a row with weight error
   d = w - w_hat, that error over the calibration tokens is ||X d||^2 = n d^T H d with
   H = X^T X / n [K, K]. Candidates per [row, group] are AWQ's clip ratios 1, 1 - 1/n_grid, ...,
   1 - max_shrink (the group's range shrunk by the ratio, then RTN; ratio 1 is plain RTN). AWQ
   scores a group in isolation (d_g^T H_gg d_g); we add the cross term with the other groups'
   current errors, 2 d_g^T H_g,rest d_rest, so the score is the exact change of the row's total
   output error. Starting from RTN, groups are visited in order (Gauss-Seidel, `sweeps` passes)
   and a [row, group] only changes when a candidate scores strictly lower than its current
   choice, so every row's output error on the calibration statistics only goes down: never worse
   than RTN there.

H gets `damp * mean(diag(H))` on its diagonal (default 0.1), mixing in some plain weight error so
that an expert with few tokens (low-rank H) does not over-fit its scales to those tokens.

Statistics: ActStats keeps the sum of x x^T over ALL calibration tokens, [K, K] fp32 (64 MB at
K = 4096: the size of a GPTQ Hessian, and of the 4096-row subsample it replaces), so it is exact
and random-free; its diagonal is the per-channel sum of squares.
Cost per sweep: N K^2 (cross terms) + len(ratios) N K g flops (candidates); group -1 (one group,
no cross terms) costs len(ratios) N K^2. The scale search costs n_grid * min(N, max_rows) * K^2.
"""

from __future__ import annotations

import torch

from m3edge.errors import M3Error
from m3edge.model.scheme import Scheme, dequantize, quantize
from m3edge.quantize.gptq import HessianAccumulator, check_weight, grid, pad_problem, rtn_quantize

CANDIDATE_BUDGET = 1 << 24  # elements of one batch of clip candidates [ratios, N, g] (64 MB fp32)


class ActStats(HessianAccumulator):
    """Calibration statistics for AWQ: sum of x x^T [K, K] fp32 over all tokens and a count.

    `add(x [..., K])`, `n_tokens`, `hessian()` (= 2/n sum x x^T) as in HessianAccumulator;
    `second_moment()` is diag(X^T X) / n, the per-channel mean of x^2.
    """

    def second_moment(self) -> torch.Tensor:
        """[K] fp32: mean of x^2 per input channel (zeros with no tokens)."""
        return self.hessian().diagonal() / 2

    def scaled(self, s: torch.Tensor) -> "ActStats":
        """The statistics of x / s (s [K] > 0), without the tokens: sum (x/s)(x/s)^T = X^T X / (s s^T)."""
        out = ActStats(self.in_features)
        out._xtx = self._xtx / (s[:, None] * s[None, :])
        out._n = self._n
        return out


def search_input_scale(ws: list[torch.Tensor], stats: ActStats, scheme: Scheme, n_grid: int = 20,
                       max_rows: int = 1024, scale_dtype: torch.dtype = torch.bfloat16,
                       tie: torch.Tensor | None = None, pow2: bool = False) -> torch.Tensor:
    """AWQ's per-input-channel scale for the consumers ws ([N_i, K] fp32, one input x): s [K] fp32 > 0.

    s = rms(x)^alpha / geometric-mean, alpha on AWQ's grid, chosen by the summed output error of RTN
    on w * s (module docstring). Returns ones when no candidate beats alpha = 0. Deterministic.
    tie [K] (int): channels with the same id get one scale (their rms pooled), e.g. the o_proj
    inputs that one GQA v channel feeds. pow2: every scale a power of two, so dividing a bf16 /
    fp16 value by it is exact.
    """
    if stats.n_tokens == 0:
        raise M3Error("AWQ: no calibration tokens reached this layer; use RTN for it")
    K = stats.in_features
    W = torch.cat([w.detach().to(torch.float32) for w in ws])  # [N, K]
    if W.shape[1] != K:
        raise ValueError(f"activation statistics have {K} features, weights have {W.shape[1]} inputs")
    if W.shape[0] > max_rows:  # an evenly strided subset of rows scores the candidates
        W = W[torch.linspace(0, W.shape[0] - 1, max_rows).round().long()]
    H = stats.hessian()
    rms = (H.diagonal() / 2).clamp_min(0).sqrt()
    if not torch.isfinite(rms).all():
        raise M3Error("AWQ: the activation statistics have non-finite entries (NaN/inf in the calibration inputs)")
    if float(rms.max()) == 0:
        return torch.ones(K)
    rms = rms.clamp_min(1e-5 * float(rms.max()))  # dead channels: a finite scale
    if tie is not None:
        ms = torch.zeros(int(tie.max()) + 1).index_add_(0, tie, rms ** 2)
        rms = (ms / torch.bincount(tie).float()).sqrt()[tie]
    g = scheme.group_size(K)
    best, best_s = None, torch.ones(K)
    for i in range(n_grid):
        s = rms ** (i / n_grid)
        s = s / (s.max() * s.min()).sqrt()
        if pow2:
            s = torch.exp2(torch.log2(s).round())
        q, sc, z = rtn_quantize(W * s, scheme, scale_dtype)
        E = W - dequantize(q, sc, z, g) / s  # [N, K] error in the original weight's units
        err = float((E * (E @ H)).sum())
        if best is None or err < best:
            best, best_s = err, s
    return best_s


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

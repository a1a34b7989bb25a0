"""What a quantized weight is: bits, group size, symmetry, and the integer grid they imply.

The grid is compressed-tensors' (`type: int`): signed integers q in [-2^(b-1), 2^(b-1) - 1];
symmetric: w ~ q * scale; asymmetric: w ~ (q - zero) * scale with an integer zero in the same
range. One scale (and zero) per output row per `group` consecutive inputs (`group == -1`: one per
row, "channel" strategy). A third form, `float_min`, carries GGUF's Q4_1 / Q4_K blocks as stored:
w = (q - qmin) * scale + min with a float minimum per group (q - qmin is llama.cpp's unsigned u);
compressed-tensors has no such form, so m3edge writes it under its own format name (packing.py).
G = ceil(in / group), so when group does not divide in the last group of a row is shorter
(compressed-tensors and ONNX Runtime's MatMulNBits read it the same way: input k uses scale
column k // group). Experts are quantized one by one, so scales are never
shared across them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from m3edge.errors import M3Error


@dataclass(frozen=True)
class Scheme:
    bits: int = 4
    group: int = 128  # inputs per scale; -1 = per output channel
    symmetric: bool = True
    float_min: bool = False  # w = (q - qmin) * scale + min (GGUF Q4_1 / Q4_K); needs symmetric=False

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise M3Error(f"--bits must be 4 or 8, got {self.bits}")
        if self.group not in (-1, 32, 64, 128):
            raise M3Error(f"--group must be 32, 64, 128 or -1 (per channel), got {self.group}")
        if self.float_min and (self.symmetric or self.group == -1):
            raise M3Error("a float-minimum scheme is asymmetric and grouped")

    def describe(self) -> str:
        """e.g. 'int4 g32, scale + float minimum' (import reports, `m3edge info`)."""
        form = "scale + float minimum" if self.float_min else "symmetric" if self.symmetric else "zero points"
        return f"int{self.bits} {'per channel' if self.group == -1 else f'g{self.group}'}, {form}"

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def group_size(self, in_features: int) -> int:
        return in_features if self.group == -1 else self.group

    def n_groups(self, in_features: int) -> int:
        return -(-in_features // self.group_size(in_features))

    def check(self, name: str, shape: tuple[int, ...], partial_groups: bool = False) -> None:
        """The group must divide K (in_features) unless partial last groups are allowed; K must
        fill whole int32 words when packed."""
        k = shape[-1]
        if self.group != -1 and k % self.group and not partial_groups:
            hint = ", ".join(str(g) for g in (64, 32) if g < self.group and k % g == 0)
            raise M3Error(f"--group {self.group} does not divide the {k} inputs of '{name}' "
                          f"({'use --group ' + hint + ', or ' if hint else ''}pass --partial-groups to let "
                          "the last group of each row be shorter)")
        if k % (32 // self.bits):
            raise M3Error(f"'{name}' has {k} inputs, not a multiple of {32 // self.bits} (needed to pack int{self.bits})")


def pad_to_groups(w: torch.Tensor, s: Scheme) -> torch.Tensor:
    """w [out, K] -> [out, G * group], zero columns appended. Zeros change no group's grid (the
    symmetric range is max |w| and the asymmetric one always includes 0) and quantize to 0."""
    k = w.shape[-1]
    pad = s.n_groups(k) * s.group_size(k) - k
    return F.pad(w, (0, pad)) if pad else w


def scale_zero(w: torch.Tensor, s: Scheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RTN grid of w [out, in] (fp32): scale [out, G] (fp32), zero [out, G] (int) or None."""
    out, k = w.shape
    g = s.group_size(k)
    wg = pad_to_groups(w, s).reshape(out, -1, g)
    if s.symmetric:
        amax = wg.abs().amax(-1)  # [out, G]
        scale = amax / ((s.qmax - s.qmin) / 2)  # map [-amax, amax] onto [-(2^b - 1)/2, (2^b - 1)/2]
        return torch.where(scale > 0, scale, torch.ones_like(scale)), None
    lo = wg.amin(-1).clamp(max=0)
    hi = wg.amax(-1).clamp(min=0)
    scale = (hi - lo) / (s.qmax - s.qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = (s.qmin - torch.round(lo / scale)).clamp(s.qmin, s.qmax)
    return scale, zero.to(torch.int32)


def _per_input(t: torch.Tensor, k: int, group: int) -> torch.Tensor:
    """[out, G] per-group values -> [out, k] per input (input j takes column j // group)."""
    return t.repeat_interleave(group, dim=1)[:, :k]


def _grouped(t: torch.Tensor, k: int, group: int) -> torch.Tensor | None:
    """[out, k] viewed [out, G, group] when the groups tile k and t is contiguous (else None: the callers
    then expand per input with `_per_input`)."""
    return t.view(t.shape[0], k // group, group) if k % group == 0 and t.is_contiguous() else None


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, s: Scheme) -> torch.Tensor:
    """w [out, in] -> q [out, in] int8 on the grid given by scale / zero [out, G]."""
    k = w.shape[1]
    g = s.group_size(k)
    wg = _grouped(w, k, g)
    if wg is not None:  # the same elementwise ops, by broadcasting rather than [out, in] copies of scale / zero
        x = wg / scale[:, :, None]
        if zero is not None:
            x = x + zero[:, :, None]
        return torch.round(x).clamp_(s.qmin, s.qmax).to(torch.int8).view(w.shape)
    x = w / _per_input(scale, k, g)
    if zero is not None:
        x = x + _per_input(zero, k, g)
    return torch.round(x).clamp(s.qmin, s.qmax).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int | None = None,
               minimum: torch.Tensor | None = None) -> torch.Tensor:
    """q [out, in] int, scale / zero / minimum [out, G] -> w [out, in] fp32: (q - zero) * scale (+ minimum).

    With a float minimum (`float_min`, zero = qmin) this is GGUF's own `d * u + m` in fp32: u * d is
    exact (an fp16 or 17-bit d times a 4-bit u), so the one rounding is the addition, as in gguf-py.
    `group` may be left out when it divides `in` (it is then in / G); a partial last group needs it."""
    k = q.shape[1]
    if group is None:
        assert k % scale.shape[1] == 0, f"{scale.shape[1]} groups do not tile {k} inputs: pass the group size"
        group = k // scale.shape[1]
    x = q.float()
    xg = _grouped(x, k, group)
    if xg is not None:  # the same elementwise ops, broadcast per group
        if zero is not None:
            xg = xg - zero.float()[:, :, None]
        xg = xg * scale.float()[:, :, None]
        if minimum is not None:
            xg = xg + minimum.float()[:, :, None]
        return xg.reshape(q.shape)
    if zero is not None:
        x = x - _per_input(zero, k, group).float()
    x = x * _per_input(scale, k, group).float()
    return x if minimum is None else x + _per_input(minimum, k, group).float()

"""What a quantized weight is: bits, group size, symmetry, and the integer grid they imply.

The grid is compressed-tensors' (`type: int`): signed integers q in [-2^(b-1), 2^(b-1) - 1];
symmetric: w ~ q * scale; asymmetric: w ~ (q - zero) * scale with an integer zero in the same
range. One scale (and zero) per output row per `group` consecutive inputs (`group == -1`: one per
row, "channel" strategy). Experts are quantized one by one, so scales are never shared across them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from m3edge.errors import M3Error


@dataclass(frozen=True)
class Scheme:
    bits: int = 4
    group: int = 128  # inputs per scale; -1 = per output channel
    symmetric: bool = True

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise M3Error(f"--bits must be 4 or 8, got {self.bits}")
        if self.group not in (-1, 32, 64, 128):
            raise M3Error(f"--group must be 32, 64, 128 or -1 (per channel), got {self.group}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def group_size(self, in_features: int) -> int:
        return in_features if self.group == -1 else self.group

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        """The group must divide K (in_features); K must be a multiple of 32 // bits * ... for packing."""
        k = shape[-1]
        if self.group != -1 and k % self.group:
            raise M3Error(f"--group {self.group} does not divide the {k} inputs of '{name}'")
        if k % (32 // self.bits):
            raise M3Error(f"'{name}' has {k} inputs, not a multiple of {32 // self.bits} (needed to pack int{self.bits})")


def scale_zero(w: torch.Tensor, s: Scheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RTN grid of w [out, in] (fp32): scale [out, G] (fp32), zero [out, G] (int) or None."""
    out, k = w.shape
    g = s.group_size(k)
    wg = w.reshape(out, k // g, g)
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


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, s: Scheme) -> torch.Tensor:
    """w [out, in] -> q [out, in] int8 on the grid given by scale / zero [out, G]."""
    out, k = w.shape
    g = k // scale.shape[1]
    x = w.reshape(out, -1, g) / scale[..., None]
    if zero is not None:
        x = x + zero[..., None]
    return torch.round(x).clamp(s.qmin, s.qmax).to(torch.int8).reshape(out, k)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """q [out, in] int, scale / zero [out, G] -> w [out, in] fp32: (q - zero) * scale."""
    out, k = q.shape
    g = k // scale.shape[1]
    x = q.reshape(out, -1, g).float()
    if zero is not None:
        x = x - zero[..., None].float()
    return (x * scale[..., None].float()).reshape(out, k)

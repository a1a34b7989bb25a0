"""Re-lay m3edge's packed integers into ONNX Runtime's `com.microsoft.MatMulNBits` inputs.

MatMulNBits (ORT contrib op, `docs/ContribOperators.md`): Y = A @ dequant(B)^T with

    B            uint8 [N, n_blocks, block_size * bits / 8]   (N outputs, K inputs, n_blocks = ceil(K / block))
    scales       float [N, n_blocks]
    zero_points  uint8 [N, ceil(n_blocks * bits / 8)]  (optional; default 2^(bits-1))

Values are unsigned: w = (u - zu) * scale. Within a block, element 2i sits in the low nibble of
byte i and 2i+1 in the high nibble (4-bit); 8-bit is one byte per element. Zero points pack two
per byte the same way (low nibble = even block), each row padded to whole bytes.

m3edge stores signed q on [-2^(b-1), 2^(b-1)-1] as u = q + 2^(b-1) (packing.py), with signed zero z
(w = (q - z) * scale), so u and zu = z + 2^(b-1) are the same integers shifted: the dequantized
weights are identical, not re-quantized. For 4-bit with block | K the bytes of B are exactly the
little-endian bytes of `weight_packed` (tested). A per-channel scale (group -1) becomes blocks of
128 sharing the row's scale; a partial last group is a partial last block (the same k // group
rule), padded with u = zu so that the padding dequantizes to 0.

A float minimum (GGUF Q4_1 / Q4_K carried as stored: w = u * scale + min) has no MatMulNBits form
that stays on ORT's fast path: float zero points are accepted but take a dequantize-then-GEMM
fallback (measured 1.5 ms vs 0.17 ms for 576 -> 1536 at M = 1, int8 compute). So it is split
exactly into an integer zero point and a residual: zu = round(-min / scale) clamped to the grid,
r = min + zu * scale (exact in fp32: checked per group, zu = 0 where it would not be), so that
w = (u - zu) * scale + r. MatMulNBits computes the first part; the exporter adds the residual's
share, sum_g (x summed over block g) * r[:, g], as a small fp32 MatMul (`mins`; export/onnx.py).
Centring matters: with zu = 0 the MatMulNBits weights u * scale are all positive, and the int8
quantization error of the activations (accuracy level 4) scales with them, not with w.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from m3edge.model.scheme import Scheme

PER_CHANNEL_BLOCK = 128  # MatMulNBits needs a power-of-2 block >= 16; a row scale is repeated per block


@dataclass
class NBits:
    """One MatMulNBits weight: B, scales, optional zero points and the attributes they imply."""

    B: np.ndarray  # uint8 [N, n_blocks, blob]
    scales: np.ndarray  # float32 [N, n_blocks]
    zero_points: np.ndarray | None  # uint8 [N, ceil(n_blocks * bits / 8)]
    K: int
    N: int
    bits: int
    block: int
    mins: np.ndarray | None = None  # float32 [N, n_blocks]: w = (u - zu) * scale + min (added outside MatMulNBits)


def relayout(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, s: Scheme,
             minimum: np.ndarray | None = None) -> NBits:
    """q int8 [N, K], scale float [N, G], zero int [N, G] or None, minimum float [N, G] or None
    -> MatMulNBits tensors."""
    n, k = q.shape
    if minimum is not None:
        assert s.group != -1 and k % s.group == 0, "a float minimum needs whole groups"
        zero, minimum = centre(scale, minimum, s)
    block = PER_CHANNEL_BLOCK if s.group == -1 else s.group
    nb = -(-k // block)
    if s.group == -1:  # one scale per row -> the same scale in every block
        scale = np.repeat(scale, nb, axis=1)
        zero = None if zero is None else np.repeat(zero, nb, axis=1)
    assert scale.shape == (n, nb), f"scale {scale.shape} does not fit [{n}, {nb}]"
    off = 1 << (s.bits - 1)
    zu = None if zero is None else (zero.astype(np.int16) + off).astype(np.uint8)  # [N, nb]
    u = (q.astype(np.int16) + off).astype(np.uint8)  # [N, K]
    pad = nb * block - k
    if pad:  # padding dequantizes to 0: u = zu (or the default zero point)
        fill = np.repeat(zu[:, -1:], pad, axis=1) if zu is not None else np.full((n, pad), off, np.uint8)
        u = np.concatenate([u, fill], axis=1)
    u = u.reshape(n, nb, block)
    if s.bits == 4:
        B = u[..., 0::2] | (u[..., 1::2] << 4)
    else:
        B = u
    zp = None
    if zu is not None:
        if s.bits == 4:
            if nb % 2:
                zu = np.concatenate([zu, np.full((n, 1), off, np.uint8)], axis=1)
            zp = zu[:, 0::2] | (zu[:, 1::2] << 4)
        else:
            zp = zu
    return NBits(np.ascontiguousarray(B), np.ascontiguousarray(scale, dtype=np.float32),
                 None if zp is None else np.ascontiguousarray(zp), k, n, s.bits, block,
                 None if minimum is None else np.ascontiguousarray(minimum, dtype=np.float32))


def centre(scale: np.ndarray, minimum: np.ndarray, s: Scheme) -> tuple[np.ndarray, np.ndarray]:
    """w = (q - qmin) * scale + min  ->  w = (q - z) * scale + r with an integer zero z (signed grid)
    near -min / scale and the residual r = min + (z - qmin) * scale, exact in fp32 (else z = qmin, r = min).
    Measured alternatives on SmolLM2 (int8 activations): z = 0 everywhere needs no zero points (51-52
    vs 42-48 tok/s decode, interleaved) but q * scale is then off w by each block's midpoint: perplexity
    +0.3%; the block sums taken from the same MatMulNBits (extra rows of ones, so of the int8
    activations): +0.13%."""
    sc, mn = scale.astype(np.float64), minimum.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        zu = np.where(sc != 0, np.clip(np.rint(-mn / np.where(sc != 0, sc, 1)), 0, (1 << s.bits) - 1), 0)
    r64 = mn + zu * sc
    r = r64.astype(np.float32)
    exact = r.astype(np.float64) == r64
    return (np.where(exact, zu, 0) + s.qmin).astype(np.int32), np.where(exact, r, minimum).astype(np.float32)


def concat_rows(parts: list[NBits]) -> NBits:
    """Stack linears that read the same input (q|k|v, gate|up) into one MatMulNBits along N."""
    a = parts[0]
    assert all(p.K == a.K and p.bits == a.bits and p.block == a.block for p in parts)
    assert all((p.zero_points is None) == (a.zero_points is None) for p in parts)
    assert all((p.mins is None) == (a.mins is None) for p in parts)
    zp = None if a.zero_points is None else np.concatenate([p.zero_points for p in parts])
    mins = None if a.mins is None else np.concatenate([p.mins for p in parts])
    return NBits(np.concatenate([p.B for p in parts]), np.concatenate([p.scales for p in parts]), zp,
                 a.K, sum(p.N for p in parts), a.bits, a.block, mins)


def unpacked_zero_points(w: NBits) -> np.ndarray:
    """[N, n_blocks] uint8 zero points, one per block (the default 2^(bits-1) when there are none)."""
    nb = w.B.shape[1]
    if w.zero_points is None:
        return np.full((w.N, nb), 1 << (w.bits - 1), np.uint8)
    if w.bits == 8:
        return w.zero_points
    zu = np.empty((w.N, w.zero_points.shape[1] * 2), np.uint8)
    zu[:, 0::2], zu[:, 1::2] = w.zero_points & 0xF, w.zero_points >> 4
    return np.ascontiguousarray(zu[:, :nb])


def dequantize_nbits(w: NBits) -> np.ndarray:
    """The weights MatMulNBits computes with (plus the minimum term), [N, K] float32 (reference for tests)."""
    n, nb, _ = w.B.shape
    if w.bits == 4:
        u = np.empty((n, nb, w.block), np.uint8)
        u[..., 0::2], u[..., 1::2] = w.B & 0xF, w.B >> 4
    else:
        u = w.B
    zu = unpacked_zero_points(w).astype(np.float32)
    deq = (u.astype(np.float32) - zu[..., None]) * w.scales[..., None]
    if w.mins is not None:
        deq = deq + w.mins[..., None]
    return deq.reshape(n, nb * w.block)[:, : w.K]


def quantize_rows(w: np.ndarray, bits: int, block: int) -> NBits:
    """Symmetric int8 / int4 per block of `block` inputs for a float table that the artifact keeps in
    bf16 (the embedding table, used by the lookup and by a tied lm_head). llama.cpp's grids: Q8_0
    (scale = max|w| / 127) and Q4_0 (scale = -w_m / 8 for the w_m of largest magnitude, so the
    whole [-8, 7] range is used)."""
    n, k = w.shape
    s = Scheme(bits, block, True)
    nb = -(-k // block)
    wp = np.pad(w.astype(np.float32), ((0, 0), (0, nb * block - k))).reshape(n, nb, block)
    if bits == 8:
        scale = np.abs(wp).max(-1) / 127.0
    else:
        i = np.abs(wp).argmax(-1)
        scale = -np.take_along_axis(wp, i[..., None], -1)[..., 0] / 8.0
    scale = np.where(scale != 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(wp / scale[..., None]), s.qmin, s.qmax).astype(np.int8).reshape(n, -1)[:, :k]
    return relayout(q, scale, None, s)

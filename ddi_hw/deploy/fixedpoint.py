"""Bit-exact numpy reference of one ddi_engine layer: the oracle for C-simulation and the fallback
backend when no board is present.

Format choice: int16 activations and weights with a power-of-two Q format per tensor (value =
int / 2**f), 48-bit accumulators, rounding = add half then arithmetic right shift (round half up),
then saturate to int16. Why 16-bit Q formats rather than int8 with float scales: rescaling is a
shift (no multiplier, no float), so HLS, the C test bench and numpy agree bit for bit by
construction; a 16x16 multiply fits one DSP48E1, and 16 bits keep the accuracy drop of a CIFAR
ResNet negligible without quantisation-aware training.

The arithmetic (also in regmap.yaml and fpga/hls/ddi_engine.cpp):
    x'  = pre_affine ? max(0, sat16((x*scale + offset + half) >> pre_shift)) : x   (padding is 0)
    acc = bias + sum_{c,ky,kx} x'[c] * w[o,c,ky,kx]
    acc += residual << res_shift                   (if residual)
    acc = max(acc, 0)                              (if relu)
    y   = sat16((acc + half) >> acc_shift)         half = 1 << (acc_shift-1), 0 if acc_shift == 0
Masked output channels are not computed and are written as 0; masked input channels read as 0.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

INT16_MIN, INT16_MAX = -(1 << 15), (1 << 15) - 1
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1


@dataclass(frozen=True)
class LayerParams:
    """Everything the engine's registers say about one layer except addresses and masks."""
    kernel: int  # 1 or 3 (3x3 uses padding 1, 1x1 padding 0)
    stride: int  # 1 or 2
    relu: bool
    residual: bool
    acc_shift: int  # f_in + f_w - f_out
    res_shift: int = 0  # f_in + f_w - f_res
    pre_affine: bool = False
    pre_shift: int = 0
    pool: bool = False  # FLAG_POOL: also produce the per-channel sums of the outputs
    store: bool = True  # False = FLAG_NO_STORE: the ofmap is not written (pooled sums only)
    zero_masked: bool = True  # False = FLAG_NO_ZERO: masked output channels are left unwritten

    def __post_init__(self):
        if self.kernel not in (1, 3) or self.stride not in (1, 2):
            raise ValueError(f"engine supports kernel 1/3, stride 1/2; got {self.kernel}/{self.stride}")
        # residual << res_shift must stay inside the 48-bit accumulator: int16 << 31 < 2**47
        if not self.store and not self.pool:
            raise ValueError("a layer that stores no output must pool (store=False needs pool=True)")
        if not (0 <= self.acc_shift <= 47 and 0 <= self.res_shift <= 31 and 0 <= self.pre_shift <= 31):
            raise ValueError(f"shifts out of range (acc 0..47, res 0..31, pre 0..31): {self}")

    @property
    def padding(self) -> int:
        return self.kernel // 2

    def out_hw(self, in_h: int, in_w: int) -> tuple[int, int]:
        p, k, s = self.padding, self.kernel, self.stride
        return (in_h + 2 * p - k) // s + 1, (in_w + 2 * p - k) // s + 1

    def as_dict(self) -> dict:
        return asdict(self)


def frac_bits(max_abs: float, bits: int = 16, limit: int = 24) -> int:
    """Largest fraction-bit count f (<= limit) such that max_abs * 2**f fits a signed `bits` integer."""
    if not np.isfinite(max_abs):
        raise ValueError("cannot choose a Q format for a non-finite range")
    if max_abs <= 0:
        return limit
    f = int(np.floor(np.log2(((1 << (bits - 1)) - 1) / max_abs)))
    return int(min(f, limit))


def quantize(x, f: int, lo: int = INT16_MIN, hi: int = INT16_MAX, dtype=np.int16) -> np.ndarray:
    """Float -> fixed point with f fraction bits: round half up, saturate (the same rule as the engine)."""
    q = np.floor(np.asarray(x, dtype=np.float64) * (2.0 ** f) + 0.5)
    return np.clip(q, lo, hi).astype(dtype)


def dequantize(q, f: int) -> np.ndarray:
    return np.asarray(q, dtype=np.float64) / (2.0 ** f)


def round_shift(acc: np.ndarray, shift: int) -> np.ndarray:
    """(acc + half) >> shift on int64: round half up via floor shift, as the hardware does."""
    acc = acc.astype(np.int64)
    if shift == 0:
        return acc
    return (acc + (np.int64(1) << (shift - 1))) >> shift


def sat16(a: np.ndarray) -> np.ndarray:
    return np.clip(a, INT16_MIN, INT16_MAX).astype(np.int16)


def _mask(mask, n: int) -> np.ndarray:
    if mask is None:
        return np.ones(n, dtype=bool)
    m = np.asarray(mask).astype(bool).reshape(-1)
    if m.shape[0] != n:
        raise ValueError(f"mask has {m.shape[0]} entries for {n} channels")
    return m


def conv_layer(x: np.ndarray, w: np.ndarray, bias: np.ndarray, p: LayerParams,
               residual: np.ndarray | None = None, pre: np.ndarray | None = None,
               out_mask=None, in_mask=None) -> np.ndarray:
    """One engine launch on one image. x (C,H,W) int16, w (O,C,k,k) int16, bias (O,) int32,
    residual (O,OH,OW) int16, pre (C,2) int32. Returns (O,OH,OW) int16.

    The MAC sums run as float64 matrix products: every product is < 2**30 and every partial sum
    < 2**53, so float64 is exact here and much faster than numpy's integer matmul.
    """
    c, h, wd = x.shape
    o = w.shape[0]
    if w.shape != (o, c, p.kernel, p.kernel):
        raise ValueError(f"weights {w.shape} do not match input channels {c} and kernel {p.kernel}")
    if bias.shape != (o,):
        raise ValueError(f"bias shape {bias.shape}, expected ({o},)")
    oh, ow = p.out_hw(h, wd)
    om, im = _mask(out_mask, o), _mask(in_mask, c)
    xi = x.astype(np.int64)
    if p.pre_affine:
        if pre is None or pre.shape != (c, 2):
            raise ValueError(f"pre_affine needs pre of shape ({c}, 2)")
        scale = pre[:, 0].astype(np.int64)[:, None, None]
        offset = pre[:, 1].astype(np.int64)[:, None, None]
        xi = np.maximum(sat16(round_shift(xi * scale + offset, p.pre_shift)).astype(np.int64), 0)
    xi = np.where(im[:, None, None], xi, 0)
    pad, s, k = p.padding, p.stride, p.kernel
    xp = np.pad(xi, ((0, 0), (pad, pad), (pad, pad))).astype(np.float64)
    wa = w[om].astype(np.float64)  # only the active output channels are computed
    acc = np.zeros((int(om.sum()), oh * ow), dtype=np.float64)
    for ky in range(k):
        for kx in range(k):
            patch = xp[:, ky:ky + s * (oh - 1) + 1:s, kx:kx + s * (ow - 1) + 1:s].reshape(c, -1)
            acc += wa[:, :, ky, kx] @ patch
    acc = acc.astype(np.int64).reshape(-1, oh, ow) + bias[om].astype(np.int64)[:, None, None]
    if p.residual:
        if residual is None or residual.shape != (o, oh, ow):
            raise ValueError(f"residual must have the output shape {(o, oh, ow)}")
        acc = acc + (residual[om].astype(np.int64) << p.res_shift)
    if p.relu:
        acc = np.maximum(acc, 0)
    out = np.zeros((o, oh, ow), dtype=np.int16)
    out[om] = sat16(round_shift(acc, p.acc_shift))
    return out


def pooled_sums(y: np.ndarray) -> np.ndarray:
    """FLAG_POOL: per-channel sum of the int16 outputs (int32; MAX_W^2 x 2^15 < 2^31). The
    processor's global average pool is pooled / (OH*OW) in y's Q format."""
    return y.astype(np.int64).sum(axis=(1, 2)).astype(np.int32)

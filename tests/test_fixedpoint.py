"""The numpy fixed-point reference vs independent computations (pure-Python integer loops, torch)."""
import numpy as np
import pytest
import torch

from ddi_hw.deploy.fixedpoint import LayerParams, conv_layer, dequantize, frac_bits, quantize


def test_quantize_rounds_half_up_and_saturates():
    assert quantize([1.5, 2.5, -1.5, -2.5, 0.49], 0).tolist() == [2, 3, -1, -2, 0]
    assert quantize([0.25, -0.375], 3).tolist() == [2, -3]
    assert quantize([1e9, -1e9], 0).tolist() == [32767, -32768]
    assert frac_bits(1.0) == 14 and frac_bits(0.9) == 15 and frac_bits(300.0) == 6
    assert 300.0 * 2 ** 6 <= 32767 < 300.0 * 2 ** 7
    x = np.array([0.123, -3.2])
    assert np.allclose(dequantize(quantize(x, 10), 10), x, atol=2 ** -11)


def brute_force(x, w, b, p, res=None, pre=None, out_mask=None, in_mask=None):
    """Pure-Python integer loops, written from the regmap.yaml contract without numpy tricks."""
    C, H, W = x.shape
    O, k = w.shape[0], p.kernel
    pad, s = k // 2, p.stride
    OH, OW = (H + 2 * pad - k) // s + 1, (W + 2 * pad - k) // s + 1

    def rshift(a, sh):
        return a if sh == 0 else (a + 2 ** (sh - 1)) // 2 ** sh  # Python // is floor

    def sat(a):
        return max(-32768, min(32767, a))

    def xin(c, iy, ix):
        if iy < 0 or iy >= H or ix < 0 or ix >= W or (in_mask is not None and not in_mask[c]):
            return 0
        v = int(x[c, iy, ix])
        if p.pre_affine:
            v = max(0, sat(rshift(v * int(pre[c, 0]) + int(pre[c, 1]), p.pre_shift)))
        return v

    out = np.zeros((O, OH, OW), dtype=np.int64)
    for o in range(O):
        if out_mask is not None and not out_mask[o]:
            continue
        for oy in range(OH):
            for ox in range(OW):
                a = int(b[o])
                for c in range(C):
                    for ky in range(k):
                        for kx in range(k):
                            a += xin(c, oy * s - pad + ky, ox * s - pad + kx) * int(w[o, c, ky, kx])
                if p.residual:
                    a += int(res[o, oy, ox]) * 2 ** p.res_shift
                if p.relu:
                    a = max(a, 0)
                out[o, oy, ox] = sat(rshift(a, p.acc_shift))
    return out


@pytest.mark.parametrize("kernel,stride,relu,residual,pre_affine,masked", [
    (3, 1, True, True, False, False), (3, 2, True, False, False, True), (1, 2, False, False, False, False),
    (1, 1, True, False, True, True), (3, 1, False, False, True, False)])
def test_reference_matches_brute_force(kernel, stride, relu, residual, pre_affine, masked):
    rng = np.random.default_rng(kernel * 10 + stride)
    C, O, H, W = 3, 5, 5, 6
    p = LayerParams(kernel=kernel, stride=stride, relu=relu, residual=residual, acc_shift=9,
                    res_shift=2, pre_affine=pre_affine, pre_shift=8)
    OH, OW = p.out_hw(H, W)
    x = rng.integers(-3000, 3000, (C, H, W)).astype(np.int16)
    w = rng.integers(-3000, 3000, (O, C, kernel, kernel)).astype(np.int16)
    b = rng.integers(-50000, 50000, O).astype(np.int32)
    res = rng.integers(-30000, 30000, (O, OH, OW)).astype(np.int16)
    pre = np.stack([rng.integers(-600, 600, C), rng.integers(-1e5, 1e5, C)], 1).astype(np.int32)
    om = np.array([1, 0, 1, 1, 0]) if masked else None
    im = np.array([1, 0, 1]) if masked else None
    got = conv_layer(x, w, b, p, res, pre, om, im)
    want = brute_force(x, w, b, p, res, pre, om, im)
    assert got.dtype == np.int16 and got.shape == (O, OH, OW)
    np.testing.assert_array_equal(got, want)


def test_saturation_both_ends_matches_brute_force():
    rng = np.random.default_rng(7)
    p = LayerParams(kernel=3, stride=1, relu=False, residual=False, acc_shift=2)
    x = rng.integers(-3000, 3000, (4, 4, 4)).astype(np.int16)
    w = rng.integers(-3000, 3000, (3, 4, 3, 3)).astype(np.int16)
    b = np.zeros(3, np.int32)
    got = conv_layer(x, w, b, p)
    assert (got == 32767).any() and (got == -32768).any()
    np.testing.assert_array_equal(got, brute_force(x, w, b, p))


def test_reference_tracks_float_conv_within_rounding():
    """Dequantised output = float conv of dequantised operands, to within half an output LSB."""
    rng = np.random.default_rng(1)
    f_in, f_w, f_out = 12, 14, 10
    x = rng.normal(0, 0.5, (8, 6, 6))
    w = rng.normal(0, 0.2, (4, 8, 3, 3))
    b = rng.normal(0, 0.1, 4)
    xq, wq = quantize(x, f_in), quantize(w, f_w)
    bq = quantize(b, f_in + f_w, -(2 ** 31), 2 ** 31 - 1, np.int32)
    p = LayerParams(kernel=3, stride=1, relu=True, residual=False, acc_shift=f_in + f_w - f_out)
    got = dequantize(conv_layer(xq, wq, bq, p), f_out)
    ref = torch.relu(torch.nn.functional.conv2d(torch.tensor(dequantize(xq, f_in))[None],
                                                torch.tensor(dequantize(wq, f_w)),
                                                torch.tensor(dequantize(bq, f_in + f_w)), padding=1))[0]
    assert np.abs(got - ref.numpy()).max() <= 2 ** -(f_out + 1) + 1e-12
    assert np.abs(got - torch.relu(torch.nn.functional.conv2d(
        torch.tensor(x)[None], torch.tensor(w), torch.tensor(b), padding=1))[0].numpy()).max() < 5e-3


def test_layer_params_validation():
    with pytest.raises(ValueError):
        LayerParams(kernel=5, stride=1, relu=True, residual=False, acc_shift=1)
    with pytest.raises(ValueError):
        LayerParams(kernel=3, stride=1, relu=True, residual=True, acc_shift=1, res_shift=40)

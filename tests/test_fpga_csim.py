"""C-simulation of fpga/hls/ddi_engine.cpp (g++ + ap_types headers) vs the numpy reference:
bit-exact outputs, and compute-loop iterations that fall with the channel masks."""
import subprocess
import sys

import numpy as np
import pytest

from ddi_hw.deploy import csim
from ddi_hw.deploy.fixedpoint import conv_layer

pytestmark = pytest.mark.skipif(csim.toolchain_missing() is not None,
                                reason=f"C-simulation toolchain missing: {csim.toolchain_missing()}")


@pytest.mark.parametrize("case", csim.standard_cases(seed=3), ids=lambda c: c.name)
def test_csim_bit_exact_vs_reference(case):
    out, iters = csim.run_layer(case.x, case.w, case.bias, case.params, case.residual, case.pre,
                                case.out_mask, case.in_mask)
    np.testing.assert_array_equal(out, case.expected)
    c, h, w = case.x.shape
    oh, ow = case.params.out_hw(h, w)
    n_in = c if case.in_mask is None else int(case.in_mask.sum())
    n_out = case.w.shape[0] if case.out_mask is None else int(case.out_mask.sum())
    assert iters == csim.expected_iterations(n_in, n_out, oh, ow, case.params.kernel)


def test_random_layers_bit_exact():
    rng = np.random.default_rng(11)
    for i in range(6):
        k = int(rng.choice([1, 3]))
        case = csim.random_case(rng, f"r{i}", int(rng.integers(1, 40)), int(rng.integers(1, 40)),
                                int(rng.integers(2, 12)), int(rng.integers(2, 12)), kernel=k,
                                stride=int(rng.choice([1, 2])), relu=bool(rng.integers(2)),
                                residual=bool(rng.integers(2)), pre_affine=bool(rng.integers(2)),
                                out_keep=float(rng.choice([1.0, 0.5, 0.3])),
                                in_keep=float(rng.choice([1.0, 0.6])), acc_shift=int(rng.integers(0, 16)))
        out, _ = csim.run_layer(case.x, case.w, case.bias, case.params, case.residual, case.pre,
                                case.out_mask, case.in_mask)
        np.testing.assert_array_equal(out, case.expected, err_msg=case.name)


def test_loop_count_falls_with_output_mask():
    rng = np.random.default_rng(5)
    dense = csim.random_case(rng, "dense", 16, 64, 8, 8, residual=True)
    counts = {}
    for keep in (1.0, 0.5, 0.25):
        m = np.zeros(64, np.uint8)
        m[rng.permutation(64)[: int(64 * keep)]] = 1
        out, counts[keep] = csim.run_layer(dense.x, dense.w, dense.bias, dense.params, dense.residual,
                                           out_mask=m)
        ref = conv_layer(dense.x, dense.w, dense.bias, dense.params, dense.residual, out_mask=m)
        np.testing.assert_array_equal(out, ref)
        assert (out[m == 0] == 0).all()
    # 64 outputs = 4 tiles of 16; 16 inputs = 2 tiles of 8; 9 taps; 64 pixels: hand count
    assert counts[1.0] == 4 * 2 * 9 * 64
    assert counts[0.5] == counts[1.0] // 2 and counts[0.25] == counts[1.0] // 4
    # a mask that leaves 17 channels needs two 16-wide tiles: the saving comes in steps
    m = np.zeros(64, np.uint8)
    m[:17] = 1
    assert csim.run_layer(dense.x, dense.w, dense.bias, dense.params, dense.residual, out_mask=m)[1] \
        == counts[1.0] // 2


def test_loop_count_falls_with_input_mask():
    rng = np.random.default_rng(6)
    c = csim.random_case(rng, "in", 32, 16, 8, 8)
    full = csim.run_layer(c.x, c.w, c.bias, c.params)[1]
    m = np.r_[np.ones(16), np.zeros(16)]
    half = csim.run_layer(c.x, c.w, c.bias, c.params, in_mask=m)[1]
    assert half * 2 == full


def test_make_test_under_sanitizers(tmp_path):
    res = subprocess.run(["make", "-C", str(csim.HLS_DIR), "test", f"PYTHON={sys.executable}",
                          f"BUILD={tmp_path}"], capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    n = len(csim.standard_cases())
    assert f"{n}/{n} cases bit-exact" in res.stdout
    assert "-fsanitize=address,undefined" in res.stdout
    # the bench can fail: corrupt one expected word and it must report it
    exp = tmp_path / "vectors" / "resnet_3x3_s2.expected.bin"
    data = np.fromfile(exp, "<i2")
    data[5] ^= 1
    data.tofile(exp)
    bad = subprocess.run([str(tmp_path / "tb_ddi_engine"), str(tmp_path / "vectors")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "FAIL resnet_3x3_s2" in bad.stdout

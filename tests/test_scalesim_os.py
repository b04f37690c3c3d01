"""Output-stationary counts derived from the fold structure (energy_models/scalesim_os.py) must be
exactly what SCALE-Sim's `single_layer_sim` reports when run directly: on random shapes, channel
counts, arrays and buffer sizes, and on sampled layers of DenseNet-201 (224x224) and ResNet-74."""
import random

import pytest

from energy_models.scalesim_os import ofmap_line_counts, os_counts
from energy_models.scalesim_runner import SimLayer, _sweep_job, simulate_direct


def sim(rows, cols, i, f, o):
    return dict(array_rows=rows, array_cols=cols, ifmap_sram_kb=i, filter_sram_kb=f, ofmap_sram_kb=o,
                dataflow="os")


def random_case(rnd: random.Random):
    kh, kw = rnd.randint(1, 4), rnd.randint(1, 4)
    stride = rnd.choice([1, 1, 2, 3, 4])
    layer = SimLayer(ifmap_h=rnd.randint(kh, 13), ifmap_w=rnd.randint(kw, 13), kernel_h=kh, kernel_w=kw,
                     channels=rnd.randint(1, 24), filters=rnd.randint(1, 40), stride=stride)
    kb = [1, 1.5, 2, 3, 64]  # SCALE-Sim reads whole KB (1.5 -> 1)
    return layer, sim(rnd.choice([1, 2, 3, 4, 8, 16]), rnd.choice([2, 4, 5, 8, 16, 32]),
                      rnd.choice(kb), rnd.choice(kb), rnd.choice(kb))


def runnable_case(rnd: random.Random):
    """A random case SCALE-Sim itself completes (some tiny buffers make its own buffer classes
    fail with an IndexError/ValueError: there is no reference count to compare with then)."""
    while True:
        layer, s = random_case(rnd)
        try:
            return layer, s, simulate_direct(layer, s)
        except (IndexError, ValueError):
            continue


@pytest.mark.parametrize("seed", range(40))
def test_derived_counts_equal_direct_scalesim_on_random_layers(seed):
    layer, s, direct = runnable_case(random.Random(seed))
    assert os_counts(layer, s) == direct, (layer, s)


def test_single_pe_array_equals_direct_scalesim():
    layer, s = SimLayer(5, 4, 2, 3, 3, 4, 1), sim(1, 1, 1, 1, 1)
    assert os_counts(layer, s) == simulate_direct(layer, s)


@pytest.mark.parametrize("seed", range(6))
def test_sweep_over_active_channels_equals_direct_scalesim(seed):
    """One memo across a sweep (the ifmap counts are kept between filter counts)."""
    rnd = random.Random(1000 + seed)
    layer, s, _ = runnable_case(rnd)
    for axis, full in (("out", layer.filters), ("in", layer.channels)):
        swept = _sweep_job(layer, axis, list(range(1, full + 1)), s, 1)
        for k in sorted({1, full, *rnd.sample(range(1, full + 1), min(3, full))}):
            assert swept[k] == simulate_direct(layer.with_active(axis, k), s), (layer, s, axis, k)


def test_line_counts_hold_every_output_once():
    heights, widths = [8, 8, 3], [4, 1]
    counts = ofmap_line_counts(5, 8, 4, heights, widths)
    assert counts.sum() == sum(heights) * sum(widths)
    assert len(counts) == len(heights) * len(widths) * (5 - 1 + 8 + 4 - 1)


def _sampled_points(arch, shape, n, seed, budget, **kw):
    """n random (layer, axis, k) points of a real network's table whose direct SCALE-Sim run is
    affordable (ofmap pixels x window x k under `budget`)."""
    from ddi_hw.models import create_model
    from energy_models.profile import axes, sim_layer
    from energy_models.specs import extract_specs

    specs = [s for s in extract_specs(create_model(arch, **kw), shape) if s.kind in ("conv", "linear")]
    rnd = random.Random(seed)
    points = []
    while len(points) < n:
        s = rnd.choice(specs)
        axis, full = rnd.choice(axes(s))
        layer = sim_layer(s).with_active(axis, rnd.randint(1, full))
        if layer.ifmap_h * layer.ifmap_w * layer.kernel_h * layer.kernel_w * layer.channels \
                * layer.filters <= budget:
            points.append(layer)
    return points


EYERISS = sim(32, 32, 64, 64, 64)


@pytest.mark.slow
def test_sampled_densenet201_layers_equal_direct_scalesim():
    for layer in _sampled_points("densenet201", (1, 3, 224, 224), 6, 0, 2e7):
        assert os_counts(layer, EYERISS) == simulate_direct(layer, EYERISS), layer


@pytest.mark.slow
def test_densenet201_stem_and_first_dense_layer_equal_direct_scalesim():
    """The largest 224x224 layers (the stem is padded to 229x229), at few filters: a direct
    SCALE-Sim run of the stem takes about a minute."""
    for layer in (SimLayer(229, 229, 7, 7, 3, 2, 2), SimLayer(56, 56, 1, 1, 64, 33, 1),
                  SimLayer(58, 58, 3, 3, 128, 2, 1)):
        assert os_counts(layer, EYERISS) == simulate_direct(layer, EYERISS), layer


@pytest.mark.slow
def test_sampled_resnet74_gated_layers_equal_direct_scalesim():
    """CIFAR ResNet-74 with CNN channel gates: input-channel sweeps and the gates' stride-2 convs."""
    for layer in _sampled_points("resnet74", (1, 3, 32, 32), 12, 1, 3e7, channel_gates=True):
        for s in (EYERISS, sim(16, 8, 9, 18.5, 4)):  # and a zedboard-like small array and buffers
            assert os_counts(layer, s) == simulate_direct(layer, s), (layer, s)

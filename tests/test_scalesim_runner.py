"""The fast SCALE-Sim path must give exactly what a direct SCALE-Sim run gives; cache and pool too."""
import json
import random

import numpy as np
import pytest

from energy_models import scalesim_runner as sr
from energy_models.scalesim_runner import SimLayer, run_sweeps, simulate_direct


def sim(rows=8, cols=8, ifmap=64, filt=64, ofmap=64, dataflow="os"):
    return dict(array_rows=rows, array_cols=cols, ifmap_sram_kb=ifmap, filter_sram_kb=filt,
                ofmap_sram_kb=ofmap, dataflow=dataflow)


@pytest.mark.parametrize("seed", range(12))
def test_read_counter_equals_scalesim_read_buffer(seed):
    from scalesim.memory.read_buffer_estimate_bw import ReadBufferEstimateBw
    from scalesim.memory.read_port import read_port

    rng = np.random.default_rng(seed)
    size = [100, 300, 1000, 1024, 4000, 20000][seed % 6]
    n = int(rng.integers(1, 12000))
    stream = rng.integers(0, int(rng.integers(1, 4000)), n)
    buf = ReadBufferEstimateBw()
    buf.set_params(backing_buf_obj=read_port(), total_size_bytes=size, word_size=1,
                   active_buf_frac=0.5, backing_buf_default_bw=10)
    lines = stream.reshape(-1, 4) if n % 4 == 0 else stream.reshape(-1, 1)
    buf.service_reads(lines, np.arange(lines.shape[0]).reshape(-1, 1))
    buf.complete_all_prefetches()
    assert sr.count_estimate_bw_reads(stream, size) == buf.get_num_accesses()


CASES = [  # (layer, array rows, cols, SRAM KB ifmap/filter/ofmap) small enough for direct runs
    (SimLayer(10, 10, 3, 3, 8, 20, 1), 8, 8, (64, 64, 64)),
    (SimLayer(9, 9, 3, 3, 12, 24, 2), 4, 8, (1, 1, 1)),  # tiny SRAMs: refetches and drains
    (SimLayer(12, 12, 1, 1, 24, 17, 1), 8, 4, (1, 2, 1)),
    (SimLayer(6, 6, 3, 3, 5, 9, 1), 16, 16, (2, 1, 64)),
    (SimLayer(4, 1, 1, 1, 40, 10, 1), 8, 8, (64, 64, 64)),  # a linear layer with 4 rows
]


@pytest.mark.parametrize("dataflow", ["os", "ws", "is"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_sweep_equals_direct_scalesim_on_sampled_k(case, dataflow):
    layer, rows, cols, (i, f, o) = CASES[case]
    s = sim(rows, cols, i, f, o, dataflow)
    rnd = random.Random(case * 7 + len(dataflow))
    for axis, full in (("out", layer.filters), ("in", layer.channels)):
        swept = sr._sweep_job(layer, axis, list(range(1, full + 1)), s, 1)
        for k in sorted({1, full, *rnd.sample(range(1, full + 1), min(2, full))}):
            assert swept[k] == simulate_direct(layer.with_active(axis, k), s), (axis, k)


def test_resnet_stage1_layer_on_32x32_array_matches_direct():
    """A real CIFAR ResNet layer (16->16, 3x3, padded 34x34) on the eyeriss-65nm array."""
    layer, s = SimLayer(34, 34, 3, 3, 16, 16, 1), sim(32, 32, 64, 64, 64)
    swept = sr._sweep_job(layer, "out", list(range(1, 17)), s, 1)
    for k in (7, 16):
        assert swept[k] == simulate_direct(layer.with_active("out", k), s)
    assert swept[16]["macs"] == 32 * 32 * 16 * 16 * 9


def test_zero_active_costs_nothing_and_grouped_conv_is_groups_of_convs():
    s = sim()
    assert sr.simulate_fast(SimLayer(6, 6, 3, 3, 4, 0, 1), s) == dict.fromkeys(sr.COUNT_COLUMNS, 0)
    per_group = SimLayer(6, 6, 3, 3, 2, 3, 1)  # conv 4->6 with groups=2
    got = sr._sweep_job(per_group, "out", [4], s, 2)[4]  # one full group of 3 + 1 channel
    a = simulate_direct(per_group, s)
    b = simulate_direct(per_group.with_active("out", 1), s)
    assert got == {c: a[c] + b[c] for c in sr.COUNT_COLUMNS}


def _requests():
    return [(SimLayer(8, 8, 3, 3, 6, 12, 1), "out", list(range(1, 13)), 1),
            (SimLayer(8, 8, 3, 3, 6, 12, 1), "out", list(range(1, 13)), 1),  # duplicate
            (SimLayer(6, 6, 1, 1, 12, 8, 1), "in", list(range(1, 13)), 1)]


def test_cache_hit_equals_cold_and_corrupt_or_stale_entries_are_recomputed(tmp_path, monkeypatch):
    s = sim(4, 4)
    calls = []
    real = sr._sweep_job
    monkeypatch.setattr(sr, "_sweep_job", lambda *a: calls.append(a) or real(*a))
    cold = run_sweeps(_requests(), s, cache_dir=tmp_path, jobs=1)
    assert len(cold) == 2  # identical requests merged
    n_cold = len(calls)
    assert n_cold == len(sr._chunks(list(range(1, 13)), 4)) * 2  # each shape's chunks once
    files = sorted(tmp_path.rglob("*.json"))
    assert len(files) == n_cold

    warm = run_sweeps(_requests(), s, cache_dir=tmp_path, jobs=1)
    assert warm == cold and len(calls) == n_cold  # nothing simulated

    entry = json.loads(files[0].read_text())
    a = next(iter(entry["counts"]))
    entry["counts"][a]["cycles"] += 1  # tampered: checksum no longer matches
    files[0].write_text(json.dumps(entry))
    files[1].write_text(files[1].read_text()[:50])  # truncated
    entry = json.loads(files[2].read_text())
    entry["key"]["scalesim"] = "0.0.1"  # stale: written for another SCALE-Sim
    files[2].write_text(json.dumps(entry))
    again = run_sweeps(_requests(), s, cache_dir=tmp_path, jobs=1)
    assert again == cold and len(calls) == n_cold + 3


def test_parallel_equals_serial(tmp_path):
    s = sim(4, 4, dataflow="ws")
    serial = run_sweeps(_requests(), s, cache_dir=tmp_path / "a", jobs=1)
    parallel = run_sweeps(_requests(), s, cache_dir=tmp_path / "b", jobs=2)
    assert serial == parallel


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DDI_HW_CACHE", str(tmp_path / "c"))
    assert sr.default_cache_dir() == tmp_path / "c"


def test_unusable_cache_dir_is_a_user_error(tmp_path):
    from ddi_hw.errors import UserError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cache"):
        run_sweeps(_requests()[:1], sim(4, 4), cache_dir=blocker / "c", jobs=1)

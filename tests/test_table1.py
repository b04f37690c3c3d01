"""Table I from an eval summary (+ measured energy): values, labels, paper columns, files."""
import math
from pathlib import Path

import pandas as pd
import pytest

from ddi_hw.errors import UserError
from ddi_hw.table1 import PAPER, build_table, measured_savings, table1_command, to_markdown


def _summary():
    # the shape of `ddi-hw eval`'s summary.csv (values made up for the test, not results)
    return pd.DataFrame({
        "run": ["static", "iadi40", "iadi60", "iadi90"],
        "arch": ["resnet38"] * 4, "stage": ["static", "iadi", "iadi", "iadi"],
        "dataset": "cifar10", "smoke_test": False, "hardware": "zedboard", "n_test": 10000,
        "accuracy": [0.93, 0.925, 0.91, 0.80],
        "compute_saving": [0.0, 0.412, 0.575, 0.90],
        "energy_saving": [0.0, 0.35, 0.52, 0.85],
        "energy_source": "modelled: SCALE-Sim + Eq. 6 (zedboard)",
    })


def _energy():
    return pd.DataFrame({"config": ["dense", "iadi40", "iadi60"], "repeats": [5, 5, 5],
                         "energy_per_inference_j": [2.0e-3, 1.2e-3, 0.9e-3],
                         "ci95_half_j": [0.1e-3, 0.06e-3, 0.09e-3], "source": "measured"})


def test_measured_saving_and_interval_by_hand():
    s = measured_savings(_energy(), "dense")
    assert s["iadi40"][0] == pytest.approx(1 - 1.2 / 2.0)
    # 0.6 * sqrt(0.05^2 + 0.05^2)
    assert s["iadi40"][1] == pytest.approx(0.6 * math.sqrt(0.05 ** 2 + 0.05 ** 2))
    assert s["iadi60"][1] == pytest.approx(0.45 * math.sqrt(0.1 ** 2 + 0.05 ** 2))
    with pytest.raises(UserError, match="dense"):
        measured_savings(_energy(), "static")


def test_table_rows_labels_and_paper_columns():
    t = build_table(_summary(), measured_savings(_energy(), "dense"), "measured: energy_summary.csv")
    assert list(t.run) == ["iadi40", "iadi60", "iadi90"]  # static excluded, sorted by saving
    r40, r60, r90 = (t.iloc[i] for i in range(3))
    assert r40.compute_saving_pct == pytest.approx(41.2)
    assert r40.energy_saving_modelled_pct == pytest.approx(35.0)
    assert r40.energy_saving_measured_pct == pytest.approx(40.0)
    assert r40.paper_compute_saving_pct == 40.0 and r40.paper_energy_saving_pct == 36.08
    assert r40.paper_accuracy_pct == 93.65
    assert r60.paper_energy_saving_pct == 57.30  # 57.5 % is nearest to the paper's 60 %
    assert math.isnan(r90.paper_energy_saving_pct)  # 90 % has no paper column within 5 points
    assert math.isnan(r90.energy_saving_measured_pct)  # no power log for this run
    assert "CPU-scale: resnet38" in r40.scale_note
    md = to_markdown(t)
    assert "energy saving % (modelled)" in md and "energy saving % (measured, 95% CI)" in md
    assert "40.00 ± 4.24" in md  # 100 * 0.6 * sqrt(2) * 0.05 = 4.24
    assert "paper energy % (measured)" in md and "Note: CPU-scale" in md


def test_without_measurements_says_so():
    md = to_markdown(build_table(_summary()))
    assert "Measured energy: none" in md


def test_command_writes_files(tmp_path):
    s = tmp_path / "summary.csv"
    e = tmp_path / "energy_summary.csv"
    _summary().to_csv(s, index=False)
    _energy().to_csv(e, index=False)
    table1_command(s, measured=e, dense_config="dense", stages="iadi", out=tmp_path / "t1")
    t = pd.read_csv(tmp_path / "t1" / "table1.csv")
    assert len(t) == 3 and t.energy_saving_measured_pct.notna().sum() == 2
    assert (tmp_path / "t1" / "table1.png").stat().st_size > 10_000
    assert (tmp_path / "t1" / "table1.md").read_text().startswith("# Table I")
    assert PAPER["energy_saving_pct"] == [36.08, 47.10, 57.30, 66.79, 78.20]
    assert PAPER["accuracy_pct"] == [93.65, 93.33, 93.06, 92.54, 91.90]


def test_bad_inputs(tmp_path):
    with pytest.raises(UserError, match="not found"):
        table1_command(tmp_path / "nope.csv", None, "dense", "iadi", tmp_path)
    with pytest.raises(UserError, match="lacks columns"):
        build_table(pd.DataFrame({"run": ["a"]}))
    with pytest.raises(UserError, match="no runs of stage"):
        build_table(_summary(), stages=("ddi",))


def test_forced_layer_table_counts_flops_by_hand(tmp_path):
    """Forced skipping through the sparse path: the FLOP saving equals a hand count from the traced
    specs (skipped blocks' backbone FLOPs, plus the global-pool adds over their outputs -- the engine
    accumulates those sums while the block's conv2 writes its output, so a skipped block does not --
    minus every layer gate's FLOPs, over the static backbone), and the modelled energy saving is
    reported next to the paper's ratio at that rate."""
    import numpy as np

    from ddi_hw.models import create_model
    from ddi_hw.table1 import forced_decisions, forced_table

    tab, parts = forced_table("resnet14", "layer", ("zedboard",), rates=(0.5,), draws=3,
                              cache_dir=tmp_path / "cache", jobs=1)
    m = create_model("resnet14", layer_gates=True)
    specs = m.specs()
    flops = lambda pred: sum(2 * s.macs for s in specs if pred(s))  # noqa: E731
    backbone = flops(lambda s: s.role != "gate")
    gates = flops(lambda s: s.role == "gate")
    rng = np.random.default_rng([0, 0])  # the patterns forced_table draws for its first rate
    savings = []
    for _ in range(3):
        L = forced_decisions(m, "layer", 0.5, rng)["layer"][0].numpy()
        off = [f"blocks.{j}" for j, keep in zip(m.skippable_idx, L) if not keep]
        assert len(off) == round(0.5 * m.num_skippable)
        after = {f"blocks.{j + 1}" if j + 1 < len(m.blocks) else "head" for j in range(len(m.blocks))
                 if f"blocks.{j}" in off}  # the next gate's (or the head's) pool reads a skipped block's output
        pooled = flops(lambda s: s.kind == "pool" and s.out_h * s.out_w == 1 and s.block in after)
        savings.append((flops(lambda s: s.block in off and s.role != "gate") + pooled - gates) / backbone)
    r = tab.iloc[0]
    assert r.flop_saving_pct == pytest.approx(100 * np.mean(savings), rel=1e-9)
    assert 0 < r.energy_saving_pct < 100 and r.ratio == pytest.approx(r.energy_saving_pct / r.flop_saving_pct)
    assert r.paper_ratio == pytest.approx(47.10 / 50.0) and r.energy_model.startswith("modelled")
    assert set(parts.part) >= {"skippable blocks", "unskippable blocks", "layer gates", "fixed (stem, head)"}
    assert parts.energy_share_pct.sum() == pytest.approx(100)


def test_checkpoint_table_is_the_dense_paths_cost_of_the_same_decisions():
    """A committed IADI checkpoint's savings via the sparse path (what the table reports) equal those
    the dense path charges for the same images, with the run's own decisions."""
    import torch

    from ddi_hw.runs import load_run
    from ddi_hw.table1 import checkpoint_table

    run = Path(__file__).resolve().parents[1] / "benchmarks" / "checkpoints" / "cifar10_30ep" / "iadi_flops70"
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)).numpy()
    tab = checkpoint_table({"iadi70": run}, x, ("zedboard",))
    ref = load_run(run, metrics=("flops", "energy"), hardware="zedboard").model
    with torch.no_grad():
        out = ref(torch.from_numpy(x), mode="dense")
    want = {m: 100 * (1 - float(out.cost[m].double().mean()) / ref.dense_cost(m)) for m in ("flops", "energy")}
    row = tab.iloc[0]
    assert list(tab.run) == ["iadi70"] and row.images == 6 and row.resource == "flops"
    assert want["flops"] > 20 and row.flop_saving_pct == pytest.approx(want["flops"], abs=1e-6)
    assert row.energy_saving_pct == pytest.approx(want["energy"], abs=1e-6)
    assert row.ratio == pytest.approx(want["energy"] / want["flops"], rel=1e-6)

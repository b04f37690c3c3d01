"""benchmarks/energy_per_flop.py --checkpoint: the accuracy each block's skip costs, against a plain
forward pass that leaves the block out; the order comparison by hand."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ddi_hw import data
from ddi_hw.checkpoint import save_model
from ddi_hw.models import create_model
from ddi_hw.runs import model_kwargs
from ddi_hw.train import validate_config

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "energy_per_flop.py"
spec = importlib.util.spec_from_file_location("energy_per_flop", SCRIPT)
epf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(epf)


def _static_run(path):
    cfg = validate_config({"arch": "resnet14", "stage": "static", "steps": 1, "dataset": "smoke"})
    kwargs = model_kwargs(cfg, 10)
    torch.manual_seed(5)
    m = create_model(**kwargs)
    with torch.no_grad():  # BN statistics away from the identity, so that blocks change predictions
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
    save_model(path, m, {"config": cfg, "model": kwargs})
    return m.eval()


def _correct_without(m, x, y, leave_out):
    """Plain forward: stem, every block except the skippable block number `leave_out`, head."""
    h, jb = m.stem(x), 0
    for b in m.blocks:
        if b.skippable:
            jb += 1
            if jb - 1 == leave_out:
                continue
        h = b(h)
    return int((m.fc(h.mean((2, 3))).argmax(1) == y).sum())


def test_accuracy_drops_equal_a_forward_without_the_block(tmp_path):
    m = _static_run(tmp_path / "run")
    arch, base, drops, seen = epf.accuracy_drops(tmp_path / "run", None, limit=200, batch=64)
    assert arch == "resnet14" and seen == 200 and len(drops) == m.num_skippable == 4
    correct = np.zeros(m.num_skippable + 1)
    with torch.no_grad():
        for x, y, _ in data.test_batches(data.load_smoke(), 200, 200):
            for j in range(m.num_skippable + 1):  # j == 4 leaves nothing out
                correct[j] += _correct_without(m, x, y, j)
    want = correct / 200 * 100
    assert base == pytest.approx(want[-1]) and drops == pytest.approx(want[-1] - want[:-1])
    assert np.abs(drops).max() > 0  # the blocks do change predictions: the comparison can fail


def test_drops_per_share_and_the_greedy_orders():
    df = pd.DataFrame({"block": ["a", "t", "b", "c"], "skippable": [True, False, True, True],
                       "skip_energy_share_pct": [5.0, 9.0, 10.0, 4.0], "skip_flop_share_pct": [5.0, 9.0, 5.0, 5.0]})
    got = epf.add_drops(df, np.array([1.0, 2.0, 0.5]))
    assert got.drop_per_energy.tolist()[::2] == [0.2, 0.2] and np.isnan(got.drop_per_energy[1])
    assert got.drop_per_flop.tolist() == pytest.approx([0.2, np.nan, 0.4, 0.1], nan_ok=True)
    assert epf.first_disagreement(["c", "a", "b"], ["c", "b", "a"]) == 2
    assert epf.first_disagreement(["c", "a", "b"], ["a", "c", "b"]) == 1
    assert epf.first_disagreement(["c", "a", "b"], ["c", "a", "b"]) is None


def test_checkpoint_errors_are_one_line(tmp_path):
    import subprocess

    r = subprocess.run([sys.executable, str(SCRIPT), "--checkpoint", str(tmp_path / "none")], capture_output=True,
                       text=True, stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and "model.safetensors not found" in r.stderr and "Traceback" not in r.stderr

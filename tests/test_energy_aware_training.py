"""benchmarks/energy_aware_training.py (paper Fig. 12 form): the FLOP-trained family's energy saving at
the energy-trained run's accuracy, against a hand interpolation; no extrapolation; one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "energy_aware_training.py"


def _summary(path, energy_acc, energy_compute=0.64):
    rows = [("r38", "static", "", 0.88, 0.0, 0.0), ("f50", "iadi", "flops", 0.865, 0.50, 0.356),
            ("f60", "iadi", "flops", 0.855, 0.60, 0.450), ("e50", "iadi", "energy", energy_acc, energy_compute, 0.500)]
    pd.DataFrame([{"run": r, "arch": "resnet38", "stage": s, "trained_resource": t, "accuracy": a,
                   "compute_saving": c, "energy_saving": e} for r, s, t, a, c, e in rows]).to_csv(path, index=False)


def _run(summary, out):
    return subprocess.run([sys.executable, str(SCRIPT), str(summary), "--out", str(out)], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL)


def test_family_saving_interpolated_at_equal_accuracy(tmp_path):
    _summary(tmp_path / "s.csv", 0.8593)
    r = _run(tmp_path / "s.csv", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert [g["run"] for g in got] == ["e50"]
    at = 0.450 + (0.8593 - 0.855) / (0.865 - 0.855) * (0.356 - 0.450)  # by hand, between f60 and f50
    assert got[0]["flops_family_energy_saving"] == pytest.approx(at, abs=1e-12)
    assert got[0]["advantage"] == pytest.approx(0.500 - at, abs=1e-12)
    assert (tmp_path / "o" / "energy_aware_training.png").stat().st_size > 10_000
    assert pd.read_csv(tmp_path / "o" / "energy_aware_training.csv").run.tolist() == ["e50"]
    _summary(tmp_path / "s.csv", 0.875)  # between f50 and the static net (the family's zero point)
    got = json.loads(_run(tmp_path / "s.csv", tmp_path / "o").stdout.strip().splitlines()[-1])
    assert got[0]["flops_family_energy_saving"] == pytest.approx(0.356 * (0.88 - 0.875) / (0.88 - 0.865))
    assert got[0]["flops_family_energy_saving_same_compute"] is None  # FLOP saving 0.64 beyond f60's 0.60


def test_family_saving_at_equal_flop_saving(tmp_path):
    """table_exploited: the run's energy saving minus the FLOP family's at the run's FLOP saving."""
    _summary(tmp_path / "s.csv", 0.8593, energy_compute=0.55)
    got = json.loads(_run(tmp_path / "s.csv", tmp_path / "o").stdout.strip().splitlines()[-1])
    same = 0.356 + (0.55 - 0.50) / (0.60 - 0.50) * (0.450 - 0.356)  # by hand, between f50 and f60
    assert got[0]["flops_family_energy_saving_same_compute"] == pytest.approx(same, abs=1e-12)
    assert got[0]["table_exploited"] == pytest.approx(0.500 - same, abs=1e-12)
    _summary(tmp_path / "s.csv", 0.8593, energy_compute=0.25)  # between the static net and f50
    got = json.loads(_run(tmp_path / "s.csv", tmp_path / "o").stdout.strip().splitlines()[-1])
    assert got[0]["flops_family_energy_saving_same_compute"] == pytest.approx(0.356 * 0.25 / 0.50, abs=1e-12)


def test_no_extrapolation_and_one_line_errors(tmp_path):
    _summary(tmp_path / "s.csv", 0.84)  # below every FLOP-trained run: not comparable
    r = _run(tmp_path / "s.csv", tmp_path / "o")
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got[0]["flops_family_energy_saving"] is None and got[0]["advantage"] is None
    pd.read_csv(tmp_path / "s.csv").drop(columns="trained_resource").to_csv(tmp_path / "old.csv", index=False)
    r = _run(tmp_path / "old.csv", tmp_path / "o")
    assert r.returncode == 2 and "lacks columns ['trained_resource']" in r.stderr and "Traceback" not in r.stderr
    r = _run(tmp_path / "missing.csv", tmp_path / "o")
    assert r.returncode == 2 and "cannot read" in r.stderr and len(r.stderr.strip().splitlines()) == 1

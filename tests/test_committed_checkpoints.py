"""The checkpoints committed in benchmarks/checkpoints/ are what RESULTS.md quotes: each must load
strictly, carry one metadata record (model.json = the copy inside the safetensors file), name its data
by checksum and its init run by a path relative to itself that is a committed sibling, record no
machine path, and report the accuracy its own metrics.csv ended with."""
from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import pytest

from ddi_hw.runs import load_run

ROOT = Path(__file__).resolve().parents[1] / "benchmarks" / "checkpoints"
RUNS = sorted(p.parent for p in ROOT.rglob("model.json"))


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def _embedded_sidecar(path: Path) -> dict:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(json.loads(f.read(n))["__metadata__"]["sidecar"])


def test_there_are_committed_checkpoints():
    assert len(RUNS) >= 10 and (ROOT / "cifar10_30ep" / "resnet38_static") in RUNS


@pytest.mark.parametrize("run", RUNS, ids=[str(r.relative_to(ROOT)) for r in RUNS])
def test_committed_checkpoint_is_self_consistent(run):
    side = json.loads((run / "model.json").read_text())
    assert _embedded_sidecar(run / "model.safetensors") == side  # one record, not two that drift
    bad = [s for s in _strings(side) if s.startswith(("/", "~")) or ":\\" in s]
    assert not bad, f"machine paths in {run}/model.json: {bad[:3]}"
    assert side["dataset"].startswith(("CIFAR-10 sha256:", "smoke"))
    init = (side.get("init") or {}).get("run")
    if side["config"]["stage"] == "static":
        assert side["config"]["init"] in (None, init)
    else:
        assert init and side["config"]["init"] == init
    if init:
        parent = json.loads((run / init / "model.json").read_text())  # a committed sibling
        assert parent["model"]["name"] == side["model"]["name"]
        assert side["init"]["metrics"] == parent["metrics"], f"{run}: {init} is not the run it started from"
    with open(run / "metrics.csv") as f:
        final = [r for r in csv.DictReader(f) if r["phase"] == "final"]
    assert final and float(final[-1]["acc"]) == pytest.approx(side["metrics"]["acc"], abs=1e-12)
    loaded = load_run(run)  # strict: every weight fits the model model.json describes
    assert loaded.model.training is False and loaded.side == side

"""ddi_hw.runs: one loader for every stage, with the strict checks."""
from __future__ import annotations

import json

import pytest
import torch

from ddi_hw.checkpoint import save_model
from ddi_hw.errors import UserError
from ddi_hw.models import create_model
from ddi_hw.runs import load_run, model_kwargs
from ddi_hw.train import validate_config
from energy_models.presets import DEFAULT_PRESET


def _save(path, arch="resnet14", stage="iadi", **cfg):
    cfg = validate_config({"arch": arch, "stage": stage, "init": "x", "steps": 1, "dataset": "smoke", **cfg})
    kwargs = model_kwargs(cfg, 10)
    torch.manual_seed(3)
    m = create_model(**kwargs)
    save_model(path, m, {"config": cfg, "model": kwargs})
    return m, cfg


def test_load_run_rebuilds_the_saved_model(tmp_path):
    m, cfg = _save(tmp_path / "run")
    run = load_run(tmp_path / "run")
    assert not run.model.training and run.config == cfg and run.hardware == cfg["hardware"] == DEFAULT_PRESET
    assert run.cost_id == {"source": "model", "hardware": None, "sha256": None}  # FLOPs: from the model itself
    want, got = m.state_dict(), run.model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(m.eval()(x).logits, run.model(x).logits)
    assert load_run(tmp_path / "run", hardware="zedboard").hardware == "zedboard"


def test_load_run_refuses_a_sidecar_without_model_or_config(tmp_path):
    _save(tmp_path / "run")
    side = json.loads((tmp_path / "run" / "model.json").read_text())
    for key in ("model", "config"):
        bad = {k: v for k, v in side.items() if k != key}
        m = create_model(**side["model"])
        save_model(tmp_path / key, m, bad)
        with pytest.raises(UserError, match=f"no '{key}' entry"):
            load_run(tmp_path / key)


def test_load_run_refuses_weights_of_another_model(tmp_path):
    _, cfg = _save(tmp_path / "run")
    other = create_model("resnet20", layer_gates=True, channel_gates=True)
    side = json.loads((tmp_path / "run" / "model.json").read_text())
    save_model(tmp_path / "bad", other, side)  # resnet20 weights, resnet14 description
    with pytest.raises(UserError, match="weights do not fit") as err:
        load_run(tmp_path / "bad")
    assert "\n" not in str(err.value)

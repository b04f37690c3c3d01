"""Checkpoint files: safetensors + JSON only, atomic, and exact optimizer / RNG restoration."""
from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from ddi_hw import checkpoint as ck
from ddi_hw.errors import UserError


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def _step(net, opt):
    x = torch.randn(16, 4)  # draws from the global RNG: resume must restore it
    y = torch.randint(0, 3, (16,))
    noise = float(np.random.rand()) + random.random()
    loss = torch.nn.functional.cross_entropy(net(x), y) * (1 + 0.01 * noise)
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_resume_state_restores_training_exactly(tmp_path):
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for _ in range(3):
        _step(net, opt)
    ck.save_resume(tmp_path, net, opt, {"step": 3, "phase": "x"})
    for _ in range(4):
        _step(net, opt)
    ref = {k: v.clone() for k, v in net.state_dict().items()}

    net2 = _net()
    for p in net2.parameters():
        p.data.add_(1.0)  # different start: everything must come from the file
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.5, momentum=0.0)
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    state = ck.load_resume(tmp_path, net2, opt2)
    assert state == {"step": 3, "phase": "x"}
    assert opt2.param_groups[0]["lr"] == 0.1 and opt2.param_groups[0]["momentum"] == 0.9
    for _ in range(4):
        _step(net2, opt2)
    for k, v in net2.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_model_checkpoint_round_trip_and_atomicity(tmp_path):
    net = _net()
    ck.save_model(tmp_path, net, {"config": {"arch": "x"}, "metrics": {"acc": 0.5}, "step": 7})
    ck.save_model(tmp_path, net, {"config": {"arch": "x"}, "metrics": {"acc": 0.6}, "step": 8})
    state, side = ck.load_model_state(tmp_path)
    assert side["step"] == 8 and side["metrics"]["acc"] == 0.6 and side["format"] == ck.FORMAT
    for k, v in net.state_dict().items():
        assert torch.equal(state[k], v)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]  # no temp files


def test_pickle_checkpoint_is_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(UserError, match="not a readable safetensors"):
        ck.load_model_state(tmp_path)
    with pytest.raises(UserError, match="not found"):
        ck.load_model_state(tmp_path / "none")
    with pytest.raises(UserError, match="--resume"):
        ck.load_resume(tmp_path, _net(), torch.optim.SGD(_net().parameters(), lr=0.1))

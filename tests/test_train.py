"""Training: config validation, bit-exact resume, the alpha sign flip, and 2-process DDP."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ddi_hw import checkpoint as ck
from ddi_hw.errors import UserError
from ddi_hw.train import load_config, train, validate_config

TINY = dict(arch="resnet14", dataset="smoke", batch_size=16, eval_batch_size=150, eval_limit=150,
            log_every=1, ckpt_every=1000, lr=0.05, seed=3)


def cfg(**kw):
    return validate_config({**TINY, **kw})


def test_config_validation(tmp_path):
    with pytest.raises(UserError, match="unknown key 'lerning_rate'"):
        validate_config({"arch": "resnet14", "steps": 1, "lerning_rate": 0.1})
    with pytest.raises(UserError, match="'target_saving' is 1.5"):
        validate_config({"arch": "resnet14", "steps": 1, "target_saving": 1.5})
    with pytest.raises(UserError, match="exactly one of 'steps' or 'epochs'"):
        validate_config({"arch": "resnet14"})
    with pytest.raises(UserError, match="needs 'init'"):
        validate_config({"arch": "resnet14", "steps": 1, "stage": "iadi"})
    p = tmp_path / "c.yaml"
    p.write_text("arch: resnet14\nepochs: 2\nresource: [oops\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(p)
    p.write_text("arch: resnet14\nepochs: 2\n")
    c = load_config(p, {"steps": 5, "resource": "energy"})  # --steps replaces epochs
    assert c["steps"] == 5 and c["epochs"] is None and c["resource"] == "energy" and c["lr"] == 0.05
    c = load_config(p, {"lr": 0.01, "alpha": 2.0, "threads": 1, "steps": None})  # --lr/--alpha/--threads
    assert (c["lr"], c["alpha"], c["threads"], c["epochs"]) == (0.01, 2.0, 1, 2)
    with pytest.raises(UserError, match="'threads' is -1"):
        validate_config({"arch": "resnet14", "steps": 1, "threads": -1})


def test_every_shipped_config_is_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*/*.yaml"))
    assert len(files) >= 10
    for f in files:
        load_config(f)


def _weights(run):
    state, _ = ck.load_model_state(run)
    return state


def test_resume_is_bit_exact_across_iadi_phase_switch(tmp_path):
    static = tmp_path / "static"
    train(cfg(steps=4), static, show_progress=False)
    iadi = cfg(stage="iadi", init=str(static), steps=4, gate_steps=2, alpha=0.5, target_saving=0.3)
    train(iadi, tmp_path / "full", show_progress=False)
    # interrupted after 1 step (inside step 1, gates only) and again after 3 (inside step 2)
    assert train(iadi, tmp_path / "cut", stop_after=1, show_progress=False) == {"stopped_at": 1}
    assert train(iadi, tmp_path / "cut", resume=True, stop_after=3, show_progress=False) == {"stopped_at": 3}
    train(iadi, tmp_path / "cut", resume=True, show_progress=False)
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # step 1 trained only gates: the backbone is unchanged after 1 step of gates-only training
    with open(tmp_path / "full" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "train"]
    assert [r["phase"] for r in rows[:3]] == ["gates", "gates", "main"]
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    with pytest.raises(UserError, match="already holds a run"):
        train(iadi, tmp_path / "full", show_progress=False)
    with pytest.raises(UserError, match="'target_saving' is 0.5 but the interrupted run used 0.3"):
        train({**iadi, "target_saving": 0.5}, tmp_path / "full", resume=True, show_progress=False)
    with pytest.raises(UserError, match="does not fit this iadi model"):
        train(cfg(stage="iadi", init=str(static), steps=1, arch="resnet20"), tmp_path / "x", show_progress=False)


def test_gates_only_step_keeps_backbone_frozen(tmp_path):
    static = tmp_path / "static"
    train(cfg(steps=2), static, show_progress=False)
    iadi = cfg(stage="iadi", init=str(static), steps=1, gate_steps=3, gate_skip_tol=0.0, alpha=0.5)
    train(iadi, tmp_path / "i", stop_after=3, show_progress=False)
    from safetensors.torch import load_file

    after = {k[6:]: v for k, v in load_file(tmp_path / "i" / ck.RESUME_FILE).items() if k.startswith("model.")}
    before = _weights(static)
    assert before
    for k, v in before.items():  # every static weight and BN statistic is unchanged
        assert torch.equal(after[k], v), k
    from ddi_hw.models import create_model

    torch.manual_seed(3)  # the seed train() uses before building the model
    fresh = create_model("resnet14", layer_gates=True, channel_gates=True).state_dict()
    gate_keys = [k for k in fresh if k not in before]
    assert gate_keys and any(not torch.equal(after[k], fresh[k]) for k in gate_keys)  # gates trained


def test_gate_lr_mult_scales_only_the_gate_update(tmp_path):
    """One plain-SGD step from the same start: gates move exactly m times further, the rest equally."""
    static = tmp_path / "static"
    train(cfg(steps=2), static, show_progress=False)
    base = cfg(stage="iadi", init=str(static), steps=1, gate_steps=0, alpha=0.5, momentum=0.0,
               weight_decay=0.0, lr_schedule="constant")
    train(base, tmp_path / "m1", show_progress=False)
    train({**base, "gate_lr_mult": 4.0}, tmp_path / "m4", show_progress=False)
    from ddi_hw.models import create_model
    from ddi_hw.train import gate_parameter_names

    torch.manual_seed(3)  # the seed train() uses before building the model: the gates' start
    start = create_model("resnet14", layer_gates=True, channel_gates=True)
    start.load_state_dict(_weights(static), strict=False)
    start_sd = start.state_dict()
    gates = gate_parameter_names(start)
    m1, m4 = _weights(tmp_path / "m1"), _weights(tmp_path / "m4")
    moved = 0
    for k in dict(start.named_parameters()):
        d1, d4 = m1[k] - start_sd[k], m4[k] - start_sd[k]
        want = 4.0 * d1 if k in gates else d1
        assert torch.allclose(d4, want, rtol=1e-4, atol=2e-6), k  # float32 rounding of w + dw
        moved += int(k in gates and d1.abs().max() > 0)
    assert moved > 0


def test_alpha_sign_flip_moves_saving_to_target(tmp_path):
    static = tmp_path / "static"
    train(cfg(steps=30, lr=0.1), static, show_progress=False)
    run = tmp_path / "iadi"
    train(cfg(stage="iadi", init=str(static), steps=40, gate_steps=0, alpha=2.0, target_saving=0.4, lr=0.1),
          run, show_progress=False)
    with open(run / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "train"]
    saving = [float(r["saving"]) for r in rows]
    alphas = [float(r["alpha"]) for r in rows]
    assert saving[0] < 0.1  # gates start open: nothing saved
    late = sum(saving[-20:]) / 20  # bang-bang control oscillates around the target: average it
    assert late > saving[0] + 0.15 and abs(late - 0.4) < 0.3, saving
    assert all(a == 2.0 for a, s in zip(alphas, saving) if s < 0.4)  # the rule, batch by batch
    assert all(a == -2.0 for a, s in zip(alphas, saving) if s >= 0.4)
    assert min(alphas) < 0  # the target was crossed and alpha flipped


DDP_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from safetensors.torch import save_file
    from ddi_hw.train import train, validate_config
    out = sys.argv[1]
    cfg = validate_config(dict(arch="resnet14", dataset="smoke", batch_size=8, steps=3, log_every=1,
                               eval_limit=50, eval_batch_size=50, seed=1))
    def report(model):  # every rank saves its own final weights
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  f"{out}/rank{dist.get_rank()}.safetensors")
    train(cfg, out + "/run", show_progress=False, on_finish=report)
    dist.destroy_process_group()
""")


def test_ddp_two_processes_end_identical(tmp_path):
    from safetensors.torch import load_file

    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29517", str(script), str(tmp_path)],
                         capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    saved = _weights(tmp_path / "run")
    init = __import__("ddi_hw.models", fromlist=["create_model"]).create_model("resnet14").state_dict()
    assert any(not torch.equal(saved[k], init[k]) for k in init if init[k].is_floating_point())  # it trained
    for k in r0:
        assert torch.equal(saved[k], r0[k])
    _, side = ck.load_model_state(tmp_path / "run")
    assert side["world_size"] == 2


def test_cli_bad_config_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("arch: resnet14\nsteps: 2\nmomentun: 0.9\n")
    res = subprocess.run([sys.executable, "-m", "ddi_hw.cli", "train", "--config", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "unknown key 'momentun'" in res.stderr

"""CostTable: exact at integers, linear between, differentiable; per-sample model cost in every
metric equals the table; a real profiler table plugs in unchanged."""
import pandas as pd
import pytest
import torch

from ddi_hw.cost import CostTable, interp
from ddi_hw.errors import UserError
from ddi_hw.models import create_model


def tiny_frame():
    rows = []
    for k in range(5):
        rows.append(dict(layer="a", axis="out", active=k, macs=10 * k, cycles=3 * k + (k > 0),
                         energy_pj=7.0 * k, block="b", role="backbone", out_gate="g"))
    for c in range(3):
        rows.append(dict(layer="a", axis="in", active=c, macs=20 * c, cycles=c, energy_pj=1.0 * c,
                         block="b", role="backbone", out_gate="g"))
    return pd.DataFrame(rows)


def test_lookup_exact_interpolated_and_differentiable():
    t = CostTable.from_frame(tiny_frame())
    assert t.metrics == ("flops", "energy", "latency")
    assert t.dense("a", "flops") == 80 and t.dense("a", "latency") == 13
    k = torch.tensor([0.0, 2.0, 2.5, 4.0], requires_grad=True)
    v = t.lookup("a", "out", k, "latency")
    assert v.tolist() == [0.0, 7.0, 8.5, 13.0]
    v.sum().backward()
    assert k.grad.tolist() == [4.0, 3.0, 3.0, 3.0]  # slope of the segment (right one at knots)
    assert t.lookup("a", "in", torch.tensor([1.0]), "flops").item() == 40


def test_interp_batched_curves():
    curves = torch.tensor([[0.0, 1.0, 4.0], [0.0, 10.0, 10.0]], dtype=torch.float64)
    k = torch.tensor([[2.0, 0.5], [1.5, 2.0]])
    assert interp(curves, k).tolist() == [[4.0, 5.0], [2.5, 10.0]]


def test_bad_tables():
    with pytest.raises(UserError, match="lacks columns"):
        CostTable.from_frame(pd.DataFrame({"layer": ["a"], "axis": ["out"]}))
    gap = tiny_frame().drop(index=2)
    with pytest.raises(UserError, match="without gaps"):
        CostTable.from_frame(gap)
    flops_only = CostTable.from_frame(tiny_frame()[["layer", "axis", "active", "macs"]])
    with pytest.raises(UserError, match="energy"):
        flops_only.dense("a", "energy")
    with pytest.raises(UserError, match="not in the cost table"):
        flops_only.dense("zzz")


def synthetic_profile(model):
    """A frame with the contract's columns from the model's own specs (energy/cycles made up:
    affine in MACs, with a per-layer constant so that k=0 is not free)."""
    df = model.cost_table and CostTable  # noqa: F841  (the default table exists already)
    from energy_models.specs import extract_specs
    model._tracing = True
    specs = extract_specs(model, (1, 3, model.input_size, model.input_size))
    model._tracing = False
    rows = []
    for s in specs:
        base = s.as_dict()
        base["layer"] = base.pop("name")
        axes = [("out", s.out_ch)] + ([("in", s.in_ch)] if s.in_gate else [])
        for axis, K in axes:
            for k in range(K + 1):
                macs = s.macs_at(k, s.in_ch) if axis == "out" else s.macs_at(s.out_ch, k)
                rows.append({**base, "axis": axis, "active": k, "macs": macs,
                             "cycles": macs // 7 + 5 * (k > 0), "energy_pj": 3.0 * macs + 11 * (k > 0)})
    return pd.DataFrame(rows)


def test_model_cost_in_every_metric_equals_table():
    from test_sparse_equivalence import brute_cost, random_force, randomize  # tests/ is on sys.path

    model = randomize(create_model("resnet14", layer_gates=True, channel_gates=True, exits=True))
    model.attach_cost_table(CostTable.from_frame(synthetic_profile(model)))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 32, generator=g)
    force = random_force(model, 4, g)
    with torch.no_grad():
        d = model(x, force=force)
    s = model(x, mode="sparse", force=force)
    for metric in ("flops", "energy", "latency"):
        want = brute_cost(model, force, metric)
        assert torch.allclose(d.cost[metric], want, rtol=1e-12), metric
        assert torch.equal(d.cost[metric], s.cost[metric])
    assert model.dense_cost("flops") == create_model("resnet14").dense_cost("flops")
    budget = float(d.cost["energy"].median())
    with torch.no_grad():  # budgets in energy pick exits by energy
        e = model(x, force=force, budget=budget, budget_metric="energy")
    assert ((e.cost["energy"] <= budget) | (e.exit_taken == 0)).all()
    assert (e.exit_taken[d.cost["energy"] > budget] >= 0).all()
    assert (e.exit_taken >= 0).any()


def test_attach_rejects_foreign_table():
    other = create_model("resnet20")
    with pytest.raises(UserError, match="lacks"):
        create_model("resnet14", layer_gates=True).attach_cost_table(other.cost_table)


def test_real_profiler_table(tmp_path):
    """energy_models.profile_model's DataFrame attaches as is; its FLOPs agree with ours."""
    from energy_models import profile_model

    model = create_model("resnet14", channel_gates=True)
    df = profile_model(model, (1, 3, 32, 32), hardware="eyeriss-65nm", cache_dir=tmp_path, progress=False)
    flops_before = model.dense_cost("flops")
    model.attach_cost_table(CostTable.from_frame(df))
    assert model.dense_cost("flops") == flops_before
    assert model.dense_cost("energy") > 0 and model.dense_cost("latency") > 0
    out = model.eval()(torch.randn(2, 3, 32, 32), mode="sparse")
    assert (out.cost["energy"] > 0).all()


def test_resource_loss_is_alpha_times_the_mean_normalised_cost():
    from ddi_hw.cost import resource_loss

    cost = torch.tensor([0.2, 0.6, 0.7], dtype=torch.float64, requires_grad=True)
    term = resource_loss(cost, 2e-4, dtype=torch.float32)
    assert term.dtype == torch.float32
    assert term.item() == (2e-4 * torch.tensor(0.5, dtype=torch.float32)).item()  # alpha * mean(E), by hand
    term.backward()
    assert torch.allclose(cost.grad, torch.full((3,), 2e-4 / 3, dtype=torch.float64))  # pushes every cost down
    back = resource_loss(cost.detach(), -2e-4)  # negative alpha (goal passed): gives cost back
    assert back.dtype == torch.float64 and back.item() == pytest.approx(-2e-4 * 0.5)

"""`ddi-hw eval` on tiny real checkpoints: numbers re-derived independently from saved predictions."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ddi_hw.errors import UserError
from ddi_hw.evaluate import SUMMARY_COLUMNS, evaluate_runs
from ddi_hw.train import train, validate_config

TINY = dict(dataset="smoke", batch_size=16, eval_batch_size=100, eval_limit=100, log_every=5,
            ckpt_every=1000, seed=5, lr=0.1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    train(validate_config({**TINY, "arch": "resnet14", "steps": 25}), root / "r14", show_progress=False)
    train(validate_config({**TINY, "arch": "resnet20", "steps": 25}), root / "r20", show_progress=False)
    train(validate_config({**TINY, "arch": "resnet20", "stage": "iadi", "init": str(root / "r20"), "steps": 15,
                           "gate_steps": 0, "alpha": 2.0, "target_saving": 0.4, "resource": "energy",
                           "hardware": "zedboard"}), root / "iadi", show_progress=False)
    train(validate_config({**TINY, "arch": "resnet20", "stage": "ddi", "init": str(root / "iadi"), "steps": 15,
                           "alpha": 2.0, "target_saving": 0.4}), root / "ddi", show_progress=False)
    out = root / "eval"
    res = evaluate_runs([root / "r14", root / "r20", root / "iadi", root / "ddi"], out, 
                        metrics=("flops", "energy"), hardware="zedboard",
                        limit=120, batch_size=60, show_progress=False)
    return root, out, res


def test_summary_recomputed_from_predictions(runs):
    root, out, res = runs
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns) == SUMMARY_COLUMNS
    assert list(summary.run) == ["r14", "r20", "iadi", "ddi"]
    from ddi_hw.models import create_model

    for _, r in summary.iterrows():
        pf = pd.read_csv(out / f"predictions_{r.run}.csv")
        assert len(pf) == r.n_test == 120
        assert r.accuracy == pytest.approx((pf.pred == pf.label).mean())
        assert r.flops == pytest.approx(pf.cost_flops.mean())
        dense = create_model(r.arch).dense_cost("flops")  # static backbone, independent of the run
        assert r.dense_flops == pytest.approx(dense)
        assert r.compute_saving == pytest.approx(1 - pf.cost_flops.mean() / dense)
        assert r.energy_saving == pytest.approx(1 - pf.cost_energy.mean() / r.dense_energy_pj)
        assert r.hardware == "zedboard" and "modelled" in r.energy_source
        assert r.skip_ratio == pytest.approx(pf.skip_ratio.mean())
    static = summary[summary.stage == "static"]
    assert (static.compute_saving.abs() < 1e-9).all()  # a static net saves nothing
    assert (static.energy_saving.abs() < 1e-9).all() and (static.skip_ratio == 0).all()
    # same backbone, same table: the gated run's dense energy equals its static parent's
    assert summary.set_index("run").dense_energy_pj["iadi"] == pytest.approx(
        summary.set_index("run").dense_energy_pj["r20"])
    from ddi_hw.checkpoint import load_model_state

    side = load_model_state(root / "iadi")[1]  # trained on the energy of the zedboard table
    assert side["cost_table"]["hardware"] == "zedboard" and len(side["cost_table"]["sha256"]) == 64
    # labels are the smoke test split, in order
    from ddi_hw.data import load_smoke

    labels = load_smoke().test.labels[:120].numpy()
    assert (pd.read_csv(out / "predictions_r14.csv").label.to_numpy() == labels).all()
    assert summary.smoke_test.all()
    # what each run was trained to save, from its recipe (flops is the ddi run's default)
    trained = summary.set_index("run")
    assert trained.trained_resource.fillna("").to_dict() == {"r14": "", "r20": "", "iadi": "energy", "ddi": "flops"}
    assert trained.trained_target.isna().tolist() == [True, True, False, False]
    assert trained.trained_target["iadi"] == 0.4


def test_budget_table_monotone_and_consistent(runs):
    root, out, res = runs
    b = pd.read_csv(out / "budgets.csv")
    assert set(b.run) == {"ddi"} and len(b) >= 4
    b = b.sort_values("budget")
    assert (np.diff(b.mean_cost) >= -1e-6).all()  # more budget never costs less
    bp = pd.read_csv(out / "budget_predictions_ddi.csv")
    dense_pred = pd.read_csv(out / "predictions_ddi.csv")
    exit_cols = sorted(c for c in dense_pred.columns if c.startswith("exit"))
    assert len(exit_cols) == 6  # 1/4 and 3/4 of each of 3 stages
    for _, row in b.iterrows():
        g = bp[bp.budget == row.budget].sort_values("index")
        assert row.accuracy == pytest.approx((g.pred == g.label).mean())
        # a sample exceeds the budget only when even exit 0 does not fit
        assert ((g.cost <= row.budget * (1 + 1e-9)) | (g.exit_taken == 0)).all()
        # the prediction is the one of the exit it took (from the independent dense pass)
        ex = g.exit_taken.to_numpy()
        ref = np.where(ex < 0, dense_pred.pred.to_numpy(),
                       dense_pred[exit_cols].to_numpy()[np.arange(len(ex)), np.clip(ex, 0, None)])
        assert (g.pred.to_numpy() == ref).all()
        # baseline: the most accurate static run that fits in the budget
        st = res["summary"][(res["summary"].stage == "static") & (res["summary"].flops <= row.budget * (1 + 1e-9))]
        if len(st):
            assert row.base_accuracy == st.accuracy.max() and \
                row.base_run in set(st.run[st.accuracy == st.accuracy.max()])
    # at the full dense cost every sample reaches the final classifier
    full = b.iloc[-1]
    assert full.final_share == pytest.approx((bp[bp.budget == full.budget].exit_taken == -1).mean())


def test_skip_stats_and_plots(runs):
    root, out, res = runs
    blocks = pd.read_csv(out / "skip_blocks.csv")
    chans = pd.read_csv(out / "skip_channels.csv")
    assert set(blocks.run) == {"iadi", "ddi"}
    assert len(blocks[blocks.run == "iadi"]) == 7  # resnet20: 9 blocks, 2 stage transitions not skippable
    assert len(chans[chans.run == "iadi"].gate.unique()) == 9
    assert blocks.skip_ratio.between(0, 1).all() and chans.skip_ratio.between(0, 1).all()
    for f in ("acc_vs_cost.png", "budgets.png", "skip_iadi.png", "easy_hard_iadi.png"):
        assert (out / f).stat().st_size > 5000
    assert not (out / "skip_r14.png").exists()


def test_eval_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        evaluate_runs([tmp_path / "nope"], tmp_path / "o", show_progress=False)
    with pytest.raises(UserError, match="at least one"):
        evaluate_runs([], tmp_path / "o", show_progress=False)


def test_all_runs_are_costed_on_one_preset_with_a_note(runs, tmp_path):
    """Runs trained for different presets (r14: eyeriss-65nm default, iadi: zedboard) are plotted on
    one energy axis, so they must be costed on one preset: the first run's unless --hardware."""
    root, _, _ = runs
    res = evaluate_runs([root / "r14", root / "iadi"], tmp_path / "ev", metrics=("flops", "energy"), limit=20,
                        batch_size=20, show_progress=False)
    summary = pd.read_csv(tmp_path / "ev" / "summary.csv")
    assert list(summary.hardware) == ["eyeriss-65nm"] * 2 and res["hardware"] == "eyeriss-65nm"
    assert any("first run's" in n for n in res["notes"]) and any("iadi" in n and "zedboard" in n for n in res["notes"])
    # the same iadi model costed on zedboard alone gives a different energy: the preset really changed
    alone = evaluate_runs([root / "iadi"], tmp_path / "ev2", metrics=("flops", "energy"), limit=20,
                          batch_size=20, show_progress=False)["summary"]
    assert alone.hardware.iloc[0] == "zedboard"
    assert alone.energy_pj.iloc[0] != pytest.approx(summary.energy_pj.iloc[1])


def test_budget_rows_are_the_models_budget_forward(runs):
    """The budget table applies the rule to the summary pass's decisions (one forward for every
    budget); per image it must equal what the model's own `budget=` forward answers and charges."""
    import torch

    from ddi_hw.data import load_smoke, test_batches
    from ddi_hw.runs import load_run

    root, out, res = runs
    bp = pd.read_csv(out / "budget_predictions_ddi.csv")
    model = load_run(root / "ddi", ("flops", "energy"), "zedboard").model.eval()
    ds = load_smoke()
    budgets = sorted(bp.budget.unique())
    assert len(budgets) >= 4
    stops = set()
    for b in budgets:
        g = bp[bp.budget == b].sort_values("index")
        preds, taken, costs = [], [], []
        with torch.no_grad():
            for x, _, _ in test_batches(ds, 50, 120):  # other batches than eval's (60): rows are independent
                o = model(x, mode="dense", budget=b, budget_metric="flops")
                preds.append(o.logits.argmax(1).numpy())
                taken.append(o.exit_taken.numpy())
                costs.append(o.cost["flops"].numpy())
        assert (g.pred.to_numpy() == np.concatenate(preds)).all(), b
        assert (g.exit_taken.to_numpy() == np.concatenate(taken)).all(), b
        assert np.allclose(g.cost.to_numpy(), np.concatenate(costs), rtol=1e-12, atol=0), b
        stops |= set(np.concatenate(taken).tolist())
    assert -1 in stops and len(stops) > 1  # some budgets stop images at exits, some reach the head


def test_budget_rows_never_cost_more_than_their_budget(runs, tmp_path):
    root, _, _ = runs
    res = evaluate_runs([root / "ddi"], tmp_path / "ev", metrics=("flops",), budgets=[1.0, 1e12], limit=20,
                        batch_size=20, show_progress=False)
    b = res["budgets"]
    assert list(b.budget) == [1e12] and (b.max_cost <= b.budget).all()  # 1 FLOP is below exit 0's cost
    assert any("budget 1 is below the cost of its first exit" in n for n in res["notes"])
    with pytest.raises(UserError, match="--budgets item"):
        evaluate_runs([root / "ddi"], tmp_path / "ev3", budgets=[float("nan")], show_progress=False)


def test_best_per_budget_is_the_most_accurate_run_with_exits(runs, tmp_path):
    """Table II over a family: with two DDI checkpoints, each budget's row is the one of the two
    that answers the most images right (counted from their own budget predictions)."""
    from ddi_hw.evaluate import BEST_BUDGETS_CSV

    root, _, _ = runs
    train(validate_config({**TINY, "arch": "resnet20", "stage": "ddi", "init": str(root / "iadi"), "steps": 15,
                           "alpha": 2.0, "target_saving": 0.4, "seed": 9, "lr": 0.3}), tmp_path / "ddi_b",
          show_progress=False)
    out = tmp_path / "ev"
    evaluate_runs([root / "r14", root / "r20", root / "ddi", tmp_path / "ddi_b"], out, metrics=("flops",),
                  limit=60, batch_size=60, show_progress=False)
    best = pd.read_csv(out / BEST_BUDGETS_CSV)
    budgets = pd.read_csv(out / "budgets.csv")
    assert set(budgets.run) == {"ddi", "ddi_b"} and len(best) == budgets.budget.nunique() >= 4
    for _, r in best.iterrows():
        correct = {}
        for run in ("ddi", "ddi_b"):
            bp = pd.read_csv(out / f"budget_predictions_{run}.csv")
            g = bp[bp.budget == r.budget]
            correct[run] = int((g.pred == g.label).sum()) if len(g) else -1
        assert correct[r.run] == max(correct.values()), r.budget
        assert r.accuracy == pytest.approx(correct[r.run] / 60)
        static = budgets[budgets.budget == r.budget].iloc[0]  # the static side is the same for every run
        assert (r.base_run if isinstance(r.base_run, str) else "") == (
            static.base_run if isinstance(static.base_run, str) else "")

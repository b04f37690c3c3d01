"""`ddi-hw eval`: accuracy vs cost, accuracy under hard budgets, and skip statistics of trained runs.

Every number comes from one pass of the real model over the test set with hard gate decisions;
costs are the model's executed per-sample costs (FLOPs from the traced layers, energy and latency
from the SCALE-Sim + Eq. 6 cost table of `--hardware`, i.e. MODELLED, not measured).

Files written to `--out` (all CSV written atomically):
- `summary.csv`, one row per checkpoint, read by `ddi-hw table1` (columns documented in
  SUMMARY_COLUMNS): accuracy, mean FLOPs / energy (pJ) / latency (cycles) per image, the dense
  static backbone's costs, and the savings against it (`compute_saving` = FLOPs,
  `energy_saving` = modelled energy, `latency_saving` = modelled cycles).
- `predictions_<run>.csv`: per test image label, prediction, per-exit predictions, costs, saving.
- `budgets.csv` + `budget_predictions_<run>.csv` (models with exits): for each budget B every
  image runs under the hard-budget rule (`ddi_hw.deploy.budget` on the summary pass's decisions,
  exactly the model's `budget=` forward, without a forward per budget): it
  runs an exit branch only where it may need it, answers with the last exit branch it ran (or the
  head) and is charged all it ran, at most B; accuracy
  next to the best static run that fits in the same budget (paper Tables II/III).
- `budgets_best.csv`: per budget, the row of `budgets.csv` with the most accurate run (Table II over
  several checkpoints with exits: the one to deploy for that budget).
- `skip_blocks.csv`, `skip_channels.csv`: skip ratio per block and per channel of every gate.
- `acc_vs_cost.png` (FLOPs, energy, latency panels; static runs as baselines), `budgets.png`,
  `skip_<run>.png` (Fig. 15 style) and `easy_hard_<run>.png` (Fig. 13: highest / lowest saving).
"""
from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from ddi_hw.errors import UserError
from ddi_hw.runs import load_run
from ddi_hw.validate import number

SUMMARY_CSV = "summary.csv"  # in --out: one row per checkpoint (read by table1 and the board notebook)
BEST_BUDGETS_CSV = "budgets_best.csv"  # in --out: per budget, the best run with exits vs the best static net
SUMMARY_COLUMNS = [
    "run",  # run directory name
    "arch", "stage", "dataset", "smoke_test",
    "trained_resource", "trained_target",  # what training was told to save (gated runs; empty for static)
    "hardware",  # preset of the energy / latency cost table
    "n_test",  # test images evaluated
    "accuracy",  # top-1, final classifier, fraction in [0, 1]
    "flops", "energy_pj", "latency_cycles",  # mean executed cost per image (gates, exits included)
    "dense_flops", "dense_energy_pj", "dense_latency_cycles",  # static backbone of the same arch
    "compute_saving", "energy_saving", "latency_saving",  # 1 - cost / dense cost
    "skip_ratio",  # mean over images of max(layer-skip fraction, channel-skip fraction)
    "energy_source",  # "modelled: SCALE-Sim + Eq. 6 (<preset>)"
]
METRIC_COLUMNS = {"flops": "flops", "energy": "energy_pj", "latency": "latency_cycles"}
METRIC_UNITS = {"flops": ("MFLOPs", 1e-6), "energy": ("uJ (modelled)", 1e-6), "latency": ("kcycles (modelled)", 1e-3)}


def _csv(df, path: Path) -> None:
    from energy_models.atomic import atomic_write_text

    buf = io.StringIO()
    df.to_csv(buf, index=False)
    atomic_write_text(path, buf.getvalue())


def _png(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    from energy_models.atomic import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def predict(model, ds, metrics: list[str], batch_size: int, limit: int | None,
            layer_gated: bool = True) -> dict[str, Any]:
    """One pass over the test set: labels, predictions, per-exit predictions, costs, gate skips.

    `layer_gated=False` ignores `layer_decisions` (a model without layer gates reports all ones).
    """
    import numpy as np
    import torch

    from ddi_hw.data import test_batches
    from ddi_hw.train import sample_skip_ratio

    acc: dict[str, list] = {"label": [], "pred": [], "exit_preds": [], "layer": [],
                            "block_run": [], "block_active": [], **{f"cost_{m}": [] for m in metrics}}
    ch_sum: dict[str, torch.Tensor] = {}
    ch_count = 0
    skip_per_sample = []
    with torch.no_grad():
        for x, y, _ in test_batches(ds, batch_size, limit):
            out = model(x, mode="dense")
            acc["label"].append(y.numpy())
            acc["pred"].append(out.logits.argmax(1).numpy())
            if out.exit_logits:  # (and the decisions the budget rule reads: `budget_outcome`)
                acc["exit_preds"].append(torch.stack([e.argmax(1) for e in out.exit_logits], 1).numpy())
                acc["block_run"].append(out.block_run.double().numpy())
                acc["block_active"].append(out.block_active.double().numpy())
            for m in metrics:
                acc[f"cost_{m}"].append(out.cost[m].double().numpy())
            if layer_gated and out.layer_decisions is not None and out.layer_decisions.numel():
                acc["layer"].append(out.layer_decisions.double().numpy())
            for g, d in out.channel_decisions.items():
                ch_sum[g] = ch_sum.get(g, 0) + (1 - d.double()).sum(0)
            skip_per_sample.append(sample_skip_ratio(out, layer_gated).numpy())
            ch_count += len(y)
    res = {k: (np.concatenate(v) if v else None) for k, v in acc.items()}
    res["skip"] = np.concatenate(skip_per_sample)
    res["channel_skip"] = {g: (s / ch_count).numpy() for g, s in ch_sum.items()}
    return res


def _dense_costs(model, metrics: list[str]) -> dict[str, float]:
    return {m: float(model.dense_cost(m)) for m in metrics}


def evaluate_runs(run_dirs: list[str | Path], out_dir: str | Path, data_dir: str | Path | None = None,
                  hardware: str | None = None, metrics: tuple[str, ...] = ("flops", "energy", "latency"),
                  budgets: list[float] | None = None, budget_metric: str = "flops", limit: int | None = None,
                  batch_size: int = 500, show_progress: bool = True) -> dict[str, Any]:
    """Evaluate runs and write the CSV/PNG files listed in the module docstring; return the frames."""
    import numpy as np
    import pandas as pd
    from rich.progress import Progress

    from ddi_hw.data import load_dataset

    metrics = list(metrics)
    if "flops" not in metrics:
        metrics.insert(0, "flops")
    if budget_metric not in metrics:
        raise UserError(f"--budget-metric {budget_metric} must be one of the evaluated metrics {metrics}")
    from ddi_hw.validate import check_number, output_dir

    if not run_dirs:
        raise UserError("give at least one run directory (written by ddi-hw train)")
    check_number(limit, "--limit", 1, integer=True)
    check_number(batch_size, "--batch-size", 1, integer=True)
    for b in budgets or []:
        check_number(b, "--budgets item", 0, low_open=True)
    out_dir = output_dir(out_dir, "--out")
    costed = bool(set(metrics) - {"flops"})
    if hardware is not None and costed:
        from energy_models.presets import load_preset

        load_preset(hardware)  # a bad preset fails now, not after the first model is built
    notes: list[str] = []
    datasets: dict[str, Any] = {}
    summary, pred_frames, block_rows, channel_rows = [], {}, [], []
    loaded = {}
    used_names: set[str] = set()
    with Progress(disable=not show_progress) as progress:
        task = progress.add_task("evaluating", total=len(run_dirs))
        for run_dir in run_dirs:
            run_dir = Path(run_dir)
            name = run_dir.resolve().name
            while name in used_names:
                name += "_"
            used_names.add(name)
            progress.update(task, description=f"eval {name}")
            run = load_run(run_dir, metrics, hardware)
            model, side, hw = run.model, run.side, run.hardware
            cfg = side["config"]
            from ddi_hw.validate import fields

            fields(side, {"config.arch": str, "config.stage": str, "config.dataset": str},
                   f"{run_dir}/model.json", "eval needs a run written by `ddi-hw train`")
            if hardware is None and costed:  # one axis: every run is costed on the first run's preset
                hardware = hw
                notes.append(f"costs of all runs on preset {hw} (the first run's; choose with --hardware)")
            own = cfg.get("hardware")
            if costed and own and own != hw and cfg.get("resource") in ("energy", "latency"):
                notes.append(f"{name} was trained on the {cfg.get('resource')} of preset {own}; costed on {hw}")
            if cfg["dataset"] not in datasets:
                datasets[cfg["dataset"]] = load_dataset(cfg["dataset"], data_dir)
            ds = datasets[cfg["dataset"]]
            res = predict(model, ds, metrics, batch_size, limit, layer_gated=bool(side["model"].get("layer_gates")))
            dense = _dense_costs(model, metrics)
            n = len(res["label"])
            correct = res["pred"] == res["label"]
            gated = cfg["stage"] != "static"
            row = {"run": name, "arch": cfg["arch"], "stage": cfg["stage"], "dataset": ds.name,
                   "smoke_test": ds.smoke_test, "trained_resource": cfg.get("resource", "") if gated else "",
                   "trained_target": cfg.get("target_saving", np.nan) if gated else np.nan,
                   "hardware": hw if set(metrics) - {"flops"} else "",
                   "n_test": n, "accuracy": float(correct.mean()), "skip_ratio": float(res["skip"].mean()),
                   "energy_source": f"modelled: SCALE-Sim + Eq. 6 ({hw})" if "energy" in metrics else ""}
            for m in ("flops", "energy", "latency"):
                col = METRIC_COLUMNS[m]
                if m in metrics:
                    mean = float(res[f"cost_{m}"].mean())
                    row[col], row[f"dense_{col}"] = mean, dense[m]
                    row[{"flops": "compute_saving", "energy": "energy_saving", "latency": "latency_saving"}[m]] = \
                        1.0 - mean / dense[m]
                else:
                    row[col] = row[f"dense_{col}"] = np.nan
                    row[{"flops": "compute_saving", "energy": "energy_saving", "latency": "latency_saving"}[m]] = np.nan
            summary.append(row)
            pf = pd.DataFrame({"index": np.arange(n), "label": res["label"], "pred": res["pred"],
                               "correct": correct.astype(int), "skip_ratio": res["skip"],
                               **{f"cost_{m}": res[f"cost_{m}"] for m in metrics}})
            pf["flop_saving"] = 1.0 - pf["cost_flops"] / dense["flops"]
            if res["exit_preds"] is not None:
                for i in range(res["exit_preds"].shape[1]):
                    pf[f"exit{i}_pred"] = res["exit_preds"][:, i]
            pred_frames[name] = pf
            _csv(pf, out_dir / f"predictions_{name}.csv")
            if res["layer"] is not None:
                names = model.skippable_block_names  # the columns of layer_decisions
                for b, s in zip(names, 1 - res["layer"].mean(0)):
                    block_rows.append({"run": name, "block": b, "skip_ratio": float(s)})
            for g, s in res["channel_skip"].items():
                channel_rows += [{"run": name, "gate": g, "channel": k, "skip_ratio": float(v)}
                                 for k, v in enumerate(s)]
            loaded[name] = (model, side, ds, dense, res)
            progress.advance(task)

    summary_df = pd.DataFrame(summary)[SUMMARY_COLUMNS]
    _csv(summary_df, out_dir / SUMMARY_CSV)
    blocks_df = pd.DataFrame(block_rows, columns=["run", "block", "skip_ratio"])
    channels_df = pd.DataFrame(channel_rows, columns=["run", "gate", "channel", "skip_ratio"])
    _csv(blocks_df, out_dir / "skip_blocks.csv")
    _csv(channels_df, out_dir / "skip_channels.csv")

    budget_df = _budget_tables(loaded, summary_df, budgets, budget_metric, out_dir, notes)
    best_df = best_per_budget(budget_df)
    _csv(best_df, out_dir / BEST_BUDGETS_CSV)
    _plot_acc_vs_cost(summary_df, budget_df, metrics, out_dir / "acc_vs_cost.png")
    for name, (model, side, ds, dense, _) in loaded.items():
        if not blocks_df[blocks_df.run == name].empty or not channels_df[channels_df.run == name].empty:
            _plot_skips(blocks_df[blocks_df.run == name], channels_df[channels_df.run == name], name,
                        out_dir / f"skip_{name}.png")
            _plot_easy_hard(pred_frames[name], ds, name, out_dir / f"easy_hard_{name}.png")
    return {"summary": summary_df, "budgets": budget_df, "best_budgets": best_df, "blocks": blocks_df,
            "channels": channels_df, "predictions": pred_frames, "hardware": hardware if costed else None,
            "notes": notes}


def _budget_tables(loaded, summary_df, budgets, budget_metric, out_dir, notes=None):
    """Accuracy per hard budget for every run with exits, beside the best static run that fits.
    A budget below what some image's path to the first exit costs cannot be met (that exit always
    runs): it gets no row, and a note says so. Every other row's images spent at most the budget.
    The dense path's decisions and exit predictions do not depend on the budget, so the one pass of
    the summary serves every budget: the rule (`CostPlan.budget_outcome`, what the model's `budget=`
    forward runs) is applied to its decisions, no forward per budget."""
    import numpy as np
    import pandas as pd

    col = METRIC_COLUMNS[budget_metric]
    statics = summary_df[summary_df.stage == "static"].sort_values(col)
    rows = []
    for name, (model, side, ds, dense, res) in loaded.items():
        if not side["model"].get("exits"):
            continue
        L, k, head, exit_preds = res["block_run"], res["block_active"], res["pred"], res["exit_preds"]
        n = len(head)
        if budgets:
            bs = sorted(budgets)
        else:  # the static baselines' costs below this model's dense cost, plus fractions of it
            bs = sorted({float(c) for c in statics[col] if c < dense[budget_metric]}
                        | {dense[budget_metric] * f for f in (0.3, 0.5, 0.7, 1.0)})
        frames = []
        for b in bs:
            w, cost = model.plan.budget_outcome(L, k, b, budget_metric)
            exit_taken = w.exit_taken()
            pred = np.where(exit_taken < 0, head, exit_preds[np.arange(n), np.maximum(exit_taken, 0)])
            cost = cost[budget_metric]
            correct = pred == res["label"]
            worst = float(cost.max())
            if worst > b * (1 + 1e-9):
                if notes is not None:
                    notes.append(f"{name}: budget {b:.4g} is below the cost of its first exit (up to {worst:.4g} "
                                 f"{budget_metric}); no row for it")
                continue
            fits = statics[statics[col] <= b * (1 + 1e-9)]
            # the real competitor: the most accurate static net within the budget (at short schedules a
            # shallower net can beat a deeper one, so "the most expensive that fits" would flatter DDI)
            base = fits.loc[fits["accuracy"].idxmax()] if len(fits) else None
            row = {"run": name, "metric": budget_metric, "budget": b, "accuracy": float(correct.mean()),
                   "mean_cost": float(cost.mean()), "max_cost": worst,
                   "final_share": float((exit_taken == -1).mean()),
                   "base_run": base["run"] if base is not None else "",
                   "base_arch": base["arch"] if base is not None else "",
                   "base_cost": float(base[col]) if base is not None else np.nan,
                   "base_accuracy": float(base["accuracy"]) if base is not None else np.nan}
            row["acc_delta"] = row["accuracy"] - row["base_accuracy"]
            rows.append(row)
            frames.append(pd.DataFrame({"budget": b, "index": np.arange(n), "label": res["label"],
                                        "pred": pred, "exit_taken": exit_taken, "cost": cost}))
        if frames:
            _csv(pd.concat(frames), out_dir / f"budget_predictions_{name}.csv")
    budget_df = pd.DataFrame(rows, columns=["run", "metric", "budget", "accuracy", "mean_cost", "max_cost",
                                            "final_share", "base_run", "base_arch", "base_cost", "base_accuracy",
                                            "acc_delta"])
    _csv(budget_df, out_dir / "budgets.csv")
    if len(budget_df):
        _plot_budgets(budget_df, budget_metric, out_dir / "budgets.png")
    return budget_df


def best_per_budget(budget_df):
    """Table II over a family of checkpoints with exits: per budget, the most accurate one (the
    checkpoint a user would deploy for that budget), beside the best static net that fits."""
    if budget_df.empty:
        return budget_df.copy()
    return budget_df.loc[budget_df.groupby("budget").accuracy.idxmax()].sort_values("budget").reset_index(drop=True)


# ----------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_acc_vs_cost(summary_df, budget_df, metrics, path):
    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    smoke = bool(summary_df.smoke_test.any())
    for ax, m in zip(axes[0], metrics):
        col = METRIC_COLUMNS[m]
        unit, scale = METRIC_UNITS[m]
        st = summary_df[summary_df.stage == "static"].sort_values(col)
        if len(st):
            ax.plot(st[col] * scale, st.accuracy * 100, "s--", color="gray", label="static baselines")
            for _, r in st.iterrows():
                ax.annotate(r.arch, (r[col] * scale, r.accuracy * 100), fontsize=7, xytext=(3, -8),
                            textcoords="offset points")
        dyn = summary_df[summary_df.stage != "static"]
        for (stage, res), g in dyn.groupby(["stage", "trained_resource"], sort=False):  # paper Fig. 12 form
            g = g.sort_values(col)
            ax.plot(g[col] * scale, g.accuracy * 100, "o-", label=f"{stage}, trained to save {res or '?'}")
            for _, r in g.iterrows():
                ax.annotate(r.run, (r[col] * scale, r.accuracy * 100), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
        if m == (budget_df.metric.iloc[0] if len(budget_df) else None):
            for run, g in budget_df.groupby("run"):
                ax.plot(g.mean_cost * scale, g.accuracy * 100, "^-", label=f"{run} budgets")
        ax.set_xlabel(f"{m} per image [{unit}]")
        ax.set_ylabel("top-1 accuracy [%]")
        ax.xaxis.set_major_locator(plt.MaxNLocator(5))  # wide numbers (uJ) must not run together
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("accuracy vs cost" + (" (SMOKE-TEST data set, not CIFAR-10)" if smoke else ""))
    _png(fig, path)


def _plot_budgets(budget_df, metric, path):
    plt = _plt()
    unit, scale = METRIC_UNITS[metric]
    fig, ax = plt.subplots(figsize=(6, 4))
    for run, g in budget_df.groupby("run"):
        ax.plot(g.budget * scale, g.accuracy * 100, "o-", label=f"{run} (hard budget)")
    base = budget_df.dropna(subset=["base_accuracy"]).drop_duplicates("budget").sort_values("budget")
    if len(base):  # (the same for every run: one line)
        ax.plot(base.budget * scale, base.base_accuracy * 100, "s--", color="gray", label="best static within budget")
    ax.set_xlabel(f"budget [{unit}]")
    ax.set_ylabel("top-1 accuracy [%]")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _png(fig, path)


def _plot_skips(blocks_df, channels_df, name, path):
    plt = _plt()
    panels = [p for p in (("block", blocks_df), ("gate", channels_df)) if len(p[1])]
    width = max(6, 0.3 * max(len(p[1].groupby(p[0])) for p in panels))
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 3.2 * len(panels)), squeeze=False)
    for ax, (key, df) in zip(axes[:, 0], panels):
        g = df.groupby(key, sort=False).skip_ratio.mean()
        ax.bar(range(len(g)), g.values * 100, color="tab:blue" if key == "block" else "tab:orange")
        ax.set_xticks(range(len(g)))
        ax.set_xticklabels(g.index, rotation=90, fontsize=6)
        ax.set_ylabel("skip ratio [%]")
        ax.set_ylim(0, 100)
        what = "block (layer gate)" if key == "block" else "channel gate (mean over channels)"
        ax.set_title(f"{name}: skip ratio per {what}")
    fig.tight_layout()
    _png(fig, path)


def _plot_easy_hard(pf, ds, name, path, k: int = 8):
    import torch

    plt = _plt()
    order = pf.sort_values("flop_saving", kind="stable")
    groups = [("easy (highest saving)", order.tail(k).iloc[::-1]), ("hard (lowest saving)", order.head(k))]
    fig, axes = plt.subplots(2, k, figsize=(1.4 * k, 3.6), squeeze=False)
    for row, (title, g) in enumerate(groups):
        imgs = ds.test.load(torch.tensor(g["index"].to_list()))[0]
        for col in range(k):
            ax = axes[row][col]
            ax.axis("off")
            if col < len(g):
                ax.imshow(imgs[col].permute(1, 2, 0).numpy())
                ax.set_title(f"{g.iloc[col].flop_saving * 100:.0f}%", fontsize=7)
        axes[row][0].text(-0.1, 0.5, title, transform=axes[row][0].transAxes, rotation=90, va="center",
                          ha="right", fontsize=8)
    fig.suptitle(f"{name}: test images by FLOP saving" + (" (SMOKE-TEST data)" if ds.smoke_test else ""), fontsize=9)
    _png(fig, path)


# ----------------------------------------------------------------------------- CLI


def eval_command(
    run_dirs: list[Path] = typer.Argument(..., help="run directories written by ddi-hw train"),
    data_dir: Optional[Path] = typer.Option(None, help="test data (cifar-10-batches-py/ or .tar.gz); "
                                            "not needed for smoke runs"),
    out: Path = typer.Option(Path("eval"), help="directory for the CSV and PNG results"),
    hardware: Optional[str] = typer.Option(None, help="hardware preset for energy/latency of ALL runs "
                                           "(default: the first run's, with a note)"),
    metrics: str = typer.Option("flops,energy,latency", help="comma list of flops,energy,latency"),
    budgets: Optional[str] = typer.Option(None, help="comma list of budgets in the budget metric's unit "
                                          "(default: static runs' costs)"),
    budget_metric: str = typer.Option("flops", help="metric of the budgets"),
    limit: Optional[int] = typer.Option(None, callback=number(1, integer=True),
                                        help="evaluate only the first N test images"),
    batch_size: int = typer.Option(500, callback=number(1, integer=True), help="evaluation batch size"),
) -> None:
    """Accuracy vs cost, accuracy under hard budgets and skip statistics for trained runs."""
    from ddi_hw.validate import number_list

    ms = [m.strip() for m in metrics.split(",") if m.strip()]
    bad = [m for m in ms + [budget_metric] if m not in METRIC_COLUMNS]
    if bad or not ms:
        raise UserError(f"unknown metric {bad[0] if bad else metrics!r}; use flops, energy or latency")
    bl = number_list(budgets, "--budgets", low=0, low_open=True)
    res = evaluate_runs(run_dirs, out, data_dir, hardware, tuple(ms), bl, budget_metric, limit, batch_size)
    from rich.console import Console
    from rich.table import Table

    where = f"; energy/latency modelled on preset {res['hardware']}" if res["hardware"] else ""
    t = Table(title=f"ddi-hw eval -> {out}{where}")
    for c in ("run", "stage", "accuracy", "compute_saving", "energy_saving"):
        t.add_column(c)
    for _, r in res["summary"].iterrows():
        t.add_row(r.run, r.stage, f"{r.accuracy:.4f}", f"{r.compute_saving:.3f}",
                  "" if r.energy_saving != r.energy_saving else f"{r.energy_saving:.3f} (modelled)")
    console = Console() if sys.stdout.isatty() else Console(width=140)  # a log file keeps whole run names
    console.print(t)
    best = res["best_budgets"]
    if len(best):
        t = Table(title=f"hard budgets ({budget_metric}): the best run with exits vs the best static net that fits")
        for c in ("budget", "run", "accuracy", "static run", "static accuracy", "difference"):
            t.add_column(c)
        for _, r in best.iterrows():
            t.add_row(f"{r.budget:.4g}", r.run, f"{r.accuracy:.4f}", r.base_run or "-",
                      "" if r.base_accuracy != r.base_accuracy else f"{r.base_accuracy:.4f}",
                      "" if r.acc_delta != r.acc_delta else f"{r.acc_delta:+.4f}")
        console.print(t)
    for note in res["notes"]:
        typer.echo(f"note: {note}")

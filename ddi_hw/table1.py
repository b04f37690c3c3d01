"""`ddi-hw table1`: compute saving vs energy saving vs accuracy, next to the paper's Table I.

Inputs are plain files so this step is rerunnable on its own:
  * `summary.csv` from `ddi-hw eval` (one row per checkpoint: accuracy, compute saving, MODELLED
    energy saving from SCALE-Sim + Eq. 6 on the preset the evaluation used, e.g. a calibrated one);
  * optionally `energy_summary.csv` from `ddi-hw power analyze` (MEASURED energy per inference per
    configuration, named like the runs, plus one configuration for the static dense network).
Every number in the outputs says where it comes from: evaluated, counted, modelled, measured or
paper.

Forced form (`ddi-hw table1 --forced layer|channel`): Table I in the paper's own setting without
training -- a gated ResNet-74 whose decisions are forced to skip a share of the skippable blocks
(or of every gated conv's channels), the gates still running and costed, on each preset: the
MODELLED energy saving vs the counted FLOP saving, next to the paper's measured ratios. The
coefficients are the presets' cited ones; nothing is fitted to Table I.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from ddi_hw.errors import UserError
from energy_models.atomic import atomic_path, atomic_write_text

if TYPE_CHECKING:
    import pandas as pd

# Paper Table I: ResNet74-IADI on CIFAR-10, energy MEASURED on a ZedBoard by the authors.
PAPER = {"compute_saving_pct": [40.0, 50.0, 60.0, 70.0, 80.0],
         "energy_saving_pct": [36.08, 47.10, 57.30, 66.79, 78.20],
         "accuracy_pct": [93.65, 93.33, 93.06, 92.54, 91.90]}
SUMMARY_NEEDS = ["run", "arch", "stage", "accuracy", "compute_saving", "energy_saving"]
OUT_COLUMNS = [
    "run", "arch", "stage", "scale_note",
    "accuracy_pct",  # evaluated on the test set (float model, `ddi-hw eval`)
    "compute_saving_pct",  # counted: executed FLOPs vs the dense backbone
    "energy_saving_modelled_pct", "energy_model",  # SCALE-Sim + Eq. 6 on a preset
    "energy_saving_measured_pct", "energy_saving_measured_ci95_pct", "energy_measured_source",
    "paper_compute_saving_pct", "paper_energy_saving_pct", "paper_accuracy_pct",
]


FORCED_RATES = (0.4, 0.5, 0.6, 0.7, 0.8)
FORCED_COLUMNS = ["hardware", "mode", "rate", "draws", "flop_saving_pct", "energy_saving_pct",
                  "ratio", "ratio_min", "ratio_max", "paper_compute_saving_pct",
                  "paper_energy_saving_pct", "paper_ratio", "energy_model"]


def forced_decisions(model, mode: str, rate: float, rng) -> dict:
    """`force` for one image: `rate` of the skippable blocks skipped (layer), or `rate` of every
    gated conv's channels off (channel), chosen uniformly at random."""
    import numpy as np
    import torch

    if mode == "layer":
        s = model.num_skippable
        L = np.ones(s, dtype=np.float32)
        L[rng.permutation(s)[: round(rate * s)]] = 0
        return {"layer": torch.from_numpy(L[None])}
    force = {}
    for g, k in model.gate_widths.items():
        m = np.ones(k, dtype=np.float32)
        m[rng.permutation(k)[: round(rate * k)]] = 0
        force[g] = torch.from_numpy(m[None])
    return {"channel": force}


def forced_table(arch: str = "resnet74", mode: str = "layer", hardware=("zedboard", "eyeriss-65nm"),
                 rates=FORCED_RATES, draws: int = 20, seed: int = 0, cache_dir=None, jobs=None):
    """(table, breakdown): per preset and rate, the mean counted FLOP saving and MODELLED energy
    saving of `draws` random forced decision patterns, each run through the model's sparse path
    (skipped blocks / channels are not computed; the gates' costs are counted as in inference), vs
    the static backbone without gates; and the dense gated network's FLOPs and energy by part."""
    import numpy as np
    import pandas as pd
    import torch

    from ddi_hw.cost import CostTable
    from ddi_hw.models import create_model
    from energy_models.presets import load_preset
    from energy_models.profile import profile_specs

    if mode not in ("layer", "channel"):
        raise UserError(f"--forced must be 'layer' or 'channel', not {mode!r}")
    if any(not 0 < r < 1 for r in rates):
        raise UserError("forced skip rates must lie strictly between 0 and 1")
    rows, parts = [], []
    for hw in hardware:
        preset = load_preset(hw)
        model = create_model(arch, layer_gates=mode == "layer", channel_gates=mode == "channel").eval()
        table = profile_specs(model.specs(), preset, cache_dir=cache_dir, jobs=jobs, progress=False)
        model.attach_cost_table(CostTable.from_frame(table))
        dense = {m: model.dense_cost(m) for m in ("flops", "energy")}
        parts.append(breakdown(model, table, preset.name))
        x = torch.zeros(1, 3, model.input_size, model.input_size)
        for i, rate in enumerate(rates):
            rng = np.random.default_rng([seed, i])
            sv = []
            for _ in range(draws):
                out = model(x, mode="sparse", force=forced_decisions(model, mode, rate, rng))
                sv.append([1 - float(out.cost[m][0]) / dense[m] for m in ("flops", "energy")])
            sv = np.asarray(sv)
            ratios = sv[:, 1] / sv[:, 0]
            j = _paper_match(100 * sv[:, 0].mean(), tol=100) if mode == "layer" else None
            j = FORCED_RATES.index(rate) if rate in FORCED_RATES else j
            rows.append({"hardware": preset.name, "mode": mode, "rate": rate, "draws": draws,
                         "flop_saving_pct": 100 * sv[:, 0].mean(), "energy_saving_pct": 100 * sv[:, 1].mean(),
                         "ratio": sv[:, 1].mean() / sv[:, 0].mean(), "ratio_min": ratios.min(),
                         "ratio_max": ratios.max(),
                         "paper_compute_saving_pct": PAPER["compute_saving_pct"][j] if j is not None else np.nan,
                         "paper_energy_saving_pct": PAPER["energy_saving_pct"][j] if j is not None else np.nan,
                         "paper_ratio": (PAPER["energy_saving_pct"][j] / PAPER["compute_saving_pct"][j]
                                         if j is not None else np.nan),
                         "energy_model": f"modelled: SCALE-Sim + Eq. 6 ({preset.name})"})
    return pd.DataFrame(rows, columns=FORCED_COLUMNS), pd.concat(parts, ignore_index=True)


def checkpoint_table(runs: dict, images, hardware=("zedboard", "eyeriss-65nm"), cache_dir=None, jobs=None):
    """Per run ({name: run dir}) and preset: the counted FLOP and MODELLED energy saving of the run's
    own decisions on `images` (normalised (N, 3, H, W) float array), through the sparse path, vs its
    dense backbone. One cost table per preset and model description (gates, exits), shared by runs."""
    import json

    import pandas as pd
    import torch

    from ddi_hw.cost import CostTable
    from ddi_hw.runs import load_run
    from energy_models.profile import profile_specs

    xs = torch.as_tensor(images)
    rows, tables = [], {}
    for name, run in runs.items():
        loaded = load_run(run)
        model = loaded.model
        for hw in hardware:
            key = (hw, json.dumps(loaded.side["model"], sort_keys=True))  # the model's full description
            if key not in tables:
                tables[key] = CostTable.from_frame(profile_specs(model.specs(), hw, cache_dir=cache_dir,
                                                                 jobs=jobs, progress=False))
            model.attach_cost_table(tables[key])
            cost = {"flops": 0.0, "energy": 0.0}
            with torch.no_grad():
                for i in range(0, len(xs), 250):
                    out = model(xs[i:i + 250], mode="sparse")
                    for m in cost:
                        cost[m] += float(out.cost[m].sum())
            fs = 1 - cost["flops"] / len(xs) / model.dense_cost("flops")
            es = 1 - cost["energy"] / len(xs) / model.dense_cost("energy")
            rows.append({"run": name, "hardware": hw, "resource": loaded.config.get("resource"),
                         "images": len(xs), "flop_saving_pct": 100 * fs, "energy_saving_pct": 100 * es,
                         "ratio": es / fs if fs else float("nan"),
                         "energy_model": f"modelled: SCALE-Sim + Eq. 6 ({hw})"})
    return pd.DataFrame(rows)


def breakdown(model, table, hardware: str):
    """Share of the gated dense network's FLOPs and MODELLED energy per part: the parts that never
    skip (stem, blocks without a layer gate, head), the skippable blocks' backbone, the layer gates,
    the channel gates; and the energy components (DRAM, SRAM, ..., board) of each part."""
    import pandas as pd

    plan = model.plan
    skippable = plan.skippable.numpy()
    names = [b for kind, b in model.events if kind == "block"]
    part_of = {"stem": "fixed (stem, head)", "head": "fixed (stem, head)"}
    for j, b in enumerate(names):
        part_of[b] = "skippable blocks" if skippable[j] else "unskippable blocks"
    dense = table[(table.axis == "out") & (table.active == table.out_ch)].copy()
    def part(r):
        if r.role == "gate":
            cg = ".cgate." in r.layer or r.layer.startswith("channel_rnn")
            return "channel gates" if cg else "layer gates"
        return part_of.get(r.block, "other")

    dense["part"] = [part(r) for r in dense.itertuples()]
    dense["flops"] = 2 * dense.macs
    cols = ["flops", "energy_pj", "e_dram_pj", "e_sram_pj", "e_noc_pj", "e_rf_pj", "e_mac_pj", "e_static_pj",
            "e_board_pj"]
    g = dense.groupby("part")[cols].sum()
    out = pd.DataFrame({"hardware": hardware, "part": g.index,
                        "flops_share_pct": 100 * g.flops / g.flops.sum(),
                        "energy_share_pct": 100 * g.energy_pj / g.energy_pj.sum(),
                        "energy_per_flop_pj": g.energy_pj / g.flops.where(g.flops > 0)})
    for c in cols[2:]:
        out[c.replace("e_", "").replace("_pj", "") + "_share_of_part_pct"] = 100 * g[c] / g.energy_pj
    return out.reset_index(drop=True)


def plot_forced(tab, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot(PAPER["compute_saving_pct"], PAPER["energy_saving_pct"], "k^--",
            label="paper Table I (measured, ResNet74-IADI, ZedBoard)")
    for (hw, mode), g in tab.groupby(["hardware", "mode"]):
        ax.plot(g.flop_saving_pct, g.energy_saving_pct, "o-", label=f"{hw}, forced {mode} skipping (modelled)")
    ax.plot([0, 100], [0, 100], ":", color="grey", lw=0.8, label="energy = FLOP saving")
    ax.set_xlabel("FLOP saving (%, counted, gates included)")
    ax.set_ylabel("energy saving (%)")
    ax.set_title("Table I setting: forced skipping, gates running and costed\n(modelled: SCALE-Sim + Eq. 6; "
                 "paper: measured)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def _paper_match(compute_pct: float, tol: float = 5.0) -> int | None:
    """Index of the paper column whose compute saving is within `tol` points of ours."""
    d = [abs(compute_pct - c) for c in PAPER["compute_saving_pct"]]
    i = min(range(len(d)), key=d.__getitem__)
    return i if d[i] <= tol else None


def measured_savings(energy: "pd.DataFrame", dense_config: str) -> dict[str, tuple[float, float]]:
    """config -> (saving, 95% half-width) from measured energy per inference.

    saving = 1 - E_cfg / E_dense; the half-width propagates both intervals to first order
    (independent repeats): h_s = (E_cfg/E_dense) * sqrt((h_cfg/E_cfg)^2 + (h_dense/E_dense)^2).
    """
    import math

    rows = {str(r["config"]): r for _, r in energy.iterrows()}
    if dense_config not in rows:
        raise UserError(f"measured energy has no configuration {dense_config!r} for the dense network; "
                        f"found {sorted(rows)[:8]}: pass --dense-config NAME")
    d = rows[dense_config]
    e_d, h_d = float(d["energy_per_inference_j"]), float(d.get("ci95_half_j", float("nan")))
    if not e_d > 0:
        raise UserError(f"measured dense energy {e_d} J is not positive: check the idle baseline windows")
    out = {}
    for name, r in rows.items():
        if name == dense_config:
            continue
        e, h = float(r["energy_per_inference_j"]), float(r.get("ci95_half_j", float("nan")))
        ratio = e / e_d
        out[name] = (1.0 - ratio, ratio * math.sqrt((h / e) ** 2 + (h_d / e_d) ** 2) if e > 0 else float("nan"))
    return out


def build_table(summary: "pd.DataFrame", measured: dict[str, tuple[float, float]] | None = None,
                measured_source: str = "", stages: tuple[str, ...] = ("iadi",)) -> "pd.DataFrame":
    import numpy as np
    import pandas as pd

    missing = [c for c in SUMMARY_NEEDS if c not in summary.columns]
    if missing:
        raise UserError(f"summary lacks columns {missing}: give the summary.csv written by `ddi-hw eval`")
    rows = summary[summary["stage"].isin(stages)] if stages else summary
    if rows.empty:
        raise UserError(f"no runs of stage {'/'.join(stages)} in the summary; train IADI runs at several "
                        "--target-saving values and evaluate them")
    out = []
    for _, r in rows.sort_values("compute_saving").iterrows():
        compute = 100 * float(r["compute_saving"])
        notes = []
        if r["arch"] != "resnet74":
            notes.append(f"CPU-scale: {r['arch']} instead of the paper's resnet74")
        if bool(r.get("smoke_test", False)):
            notes.append("smoke-test data, not CIFAR-10")
        if "n_test" in r and pd.notna(r["n_test"]) and int(r["n_test"]) < 10000:
            notes.append(f"{int(r['n_test'])} test images, not 10000")
        i = _paper_match(compute)
        m = (measured or {}).get(str(r["run"]))
        energy_model = r.get("energy_source") or f"modelled: SCALE-Sim + Eq. 6 ({r.get('hardware', '?')})"
        out.append({
            "run": r["run"], "arch": r["arch"], "stage": r["stage"], "scale_note": "; ".join(notes),
            "accuracy_pct": 100 * float(r["accuracy"]), "compute_saving_pct": compute,
            "energy_saving_modelled_pct": 100 * float(r["energy_saving"]), "energy_model": energy_model,
            "energy_saving_measured_pct": 100 * m[0] if m else np.nan,
            "energy_saving_measured_ci95_pct": 100 * m[1] if m else np.nan,
            "energy_measured_source": measured_source if m else "",
            "paper_compute_saving_pct": PAPER["compute_saving_pct"][i] if i is not None else np.nan,
            "paper_energy_saving_pct": PAPER["energy_saving_pct"][i] if i is not None else np.nan,
            "paper_accuracy_pct": PAPER["accuracy_pct"][i] if i is not None else np.nan,
        })
    return pd.DataFrame(out, columns=OUT_COLUMNS)


def _fmt(x: float, ci: float | None = None) -> str:
    if x != x:  # NaN
        return "-"
    return f"{x:.2f} ± {ci:.2f}" if ci is not None and ci == ci else f"{x:.2f}"


def to_markdown(table: "pd.DataFrame") -> str:
    head = ("| run | arch | accuracy % (evaluated) | compute saving % (counted) | energy saving % (modelled) "
            "| energy saving % (measured, 95% CI) | paper compute % | paper energy % (measured) | paper accuracy % |")
    lines = ["# Table I: compute saving vs energy saving vs accuracy", "",
             "Paper: ResNet74-IADI on CIFAR-10, energy measured on a ZedBoard (Table I).", "",
             head, "|" + "---|" * 9]
    for _, r in table.iterrows():
        lines.append(f"| {r.run} | {r.arch} | {_fmt(r.accuracy_pct)} | {_fmt(r.compute_saving_pct)} "
                     f"| {_fmt(r.energy_saving_modelled_pct)} "
                     f"| {_fmt(r.energy_saving_measured_pct, r.energy_saving_measured_ci95_pct)} "
                     f"| {_fmt(r.paper_compute_saving_pct)} | {_fmt(r.paper_energy_saving_pct)} "
                     f"| {_fmt(r.paper_accuracy_pct)} |")
    lines.append("")
    models = sorted(set(table.energy_model) - {""})
    lines.append(f"Energy model: {'; '.join(models)}.")
    if table.energy_saving_measured_pct.notna().any():
        lines.append(f"Measured energy: {'; '.join(sorted(set(table.energy_measured_source) - {''}))}.")
    else:
        lines.append("Measured energy: none (no power log given; run on the board with `ddi-hw power log`).")
    for note in sorted(set(table.scale_note) - {""}):
        lines.append(f"Note: {note}.")
    return "\n".join(lines) + "\n"


def plot(table: "pd.DataFrame", path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    a1.plot(PAPER["compute_saving_pct"], PAPER["energy_saving_pct"], "k^--", label="paper (measured, ResNet74)")
    a1.plot(table.compute_saving_pct, table.energy_saving_modelled_pct, "o-", label="ours, modelled (Eq. 6)")
    meas = table[table.energy_saving_measured_pct.notna()]
    if len(meas):
        a1.errorbar(meas.compute_saving_pct, meas.energy_saving_measured_pct,
                    yerr=meas.energy_saving_measured_ci95_pct.fillna(0), fmt="s", capsize=3,
                    label="ours, measured (95% CI)")
    lim = [0, 100]
    a1.plot(lim, lim, ":", color="grey", lw=0.8, label="energy = compute saving")
    a1.set_xlabel("compute saving (%)")
    a1.set_ylabel("energy saving (%)")
    a1.legend(fontsize=8)
    a2.plot(PAPER["compute_saving_pct"], PAPER["accuracy_pct"], "k^--", label="paper (ResNet74)")
    archs = ", ".join(sorted(set(table.arch)))
    a2.plot(table.compute_saving_pct, table.accuracy_pct, "o-", label=f"ours ({archs}), evaluated")
    a2.set_xlabel("compute saving (%)")
    a2.set_ylabel("top-1 accuracy (%)")
    a2.legend(fontsize=8)
    notes = sorted(set(table.scale_note) - {""})
    fig.suptitle("Table I: IADI compute vs energy saving vs accuracy" + ("\n" + "; ".join(notes) if notes else ""),
                 fontsize=9)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def table1_command(
    summary_csv: Optional[Path] = typer.Argument(None, help="summary.csv written by `ddi-hw eval` "
                                                 "(not with --forced)"),
    measured: Optional[Path] = typer.Option(None, "--measured", help="energy_summary.csv from `ddi-hw power analyze`"),
    dense_config: str = typer.Option("dense", "--dense-config",
                                     help="configuration name of the static network in --measured"),
    stages: str = typer.Option("iadi", "--stages", help="comma list of run stages to tabulate"),
    out: Path = typer.Option(Path("table1"), "--out", help="directory for table1.csv, table1.md, table1.png"),
    forced: Optional[str] = typer.Option(None, "--forced", help="layer | channel: Table I in the paper's "
                                         "setting with forced decisions on an untrained gated network"),
    arch: str = typer.Option("resnet74", "--arch", help="with --forced: the gated architecture"),
    hardware: list[str] = typer.Option(["zedboard", "eyeriss-65nm"], "--hardware",
                                       help="with --forced: presets to model (repeat the option)"),
    draws: int = typer.Option(20, "--draws", help="with --forced: random decision patterns per rate"),
) -> None:
    """Table I next to the paper's, every number labelled evaluated/counted/modelled/measured.

    `ddi-hw table1 --forced layer --out DIR` (or `--forced channel`): forced skipping of 40-80 % on
    a gated ResNet-74, gates running and costed, modelled energy vs FLOP saving per preset
    (DIR/table1_forced_<mode>.csv, ..._breakdown.csv, .png)."""

    def given(v, default):  # called from Python, typer's option objects stand for the defaults
        return default if isinstance(v, typer.models.OptionInfo) else v

    forced, arch = given(forced, None), given(arch, "resnet74")
    hardware, draws = given(hardware, ["zedboard", "eyeriss-65nm"]), given(draws, 20)
    if forced is not None:
        if summary_csv is not None:
            raise UserError("give either a summary.csv or --forced, not both")
        if draws < 1:
            raise UserError("--draws must be at least 1")
        tab, parts = forced_table(arch, forced, tuple(hardware), draws=draws)
        out.mkdir(parents=True, exist_ok=True)
        for name, frame in ((f"table1_forced_{forced}.csv", tab), (f"table1_forced_{forced}_breakdown.csv", parts)):
            atomic_write_text(out / name, frame.to_csv(index=False))
        plot_forced(tab, out / f"table1_forced_{forced}.png")
        typer.echo(tab.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        typer.echo(f"wrote {out}/table1_forced_{forced}.csv, _breakdown.csv, .png (energy MODELLED)")
        return
    if summary_csv is None:
        raise UserError("give the summary.csv written by `ddi-hw eval`, or --forced layer|channel")
    from ddi_hw.validate import output_dir, read_csv

    summary = read_csv(summary_csv, SUMMARY_NEEDS, "summary", "give the summary.csv written by "
                       "`ddi-hw eval RUNS --out DIR`", numbers={
                           "accuracy": "[0,1]", "compute_saving": "<=1|nan", "energy_saving": "<=1|nan",
                           "n_test": "int>=0"})
    meas = None
    if measured is not None:
        energy = read_csv(measured, ["config", "energy_per_inference_j"], "measured energy",
                          "give the energy_summary.csv written by `ddi-hw power analyze`",
                          numbers={"energy_per_inference_j": "finite", "ci95_half_j": "finite|nan"})
        meas = measured_savings(energy, dense_config)
    wanted = tuple(s.strip() for s in stages.split(",") if s.strip())
    if not wanted:
        raise UserError(f"--stages {stages!r} names no stage; give e.g. --stages iadi or --stages iadi,ddi")
    out = output_dir(out, "--out")
    table = build_table(summary, meas, f"measured: {measured.name}" if measured else "", wanted)
    for name, text in (("table1.csv", table.to_csv(index=False)), ("table1.md", to_markdown(table))):
        atomic_write_text(out / name, text)
    plot(table, out / "table1.png")
    typer.echo(to_markdown(table))
    typer.echo(f"wrote {out / 'table1.csv'}, table1.md, table1.png")

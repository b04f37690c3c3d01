"""Paper Fig. 12: does training on the energy table save more energy than training on FLOPs, at equal
accuracy? Reads the `summary.csv` of one `ddi-hw eval` over a static net and gated runs of the same
arch trained with `--resource flops` (several targets) and `--resource energy`. For each run trained on
another resource, the FLOP-trained family's energy saving at the same accuracy is interpolated
linearly between the two family members (the static net is the family's zero-saving point) whose
accuracies bracket it; and, to see whether the training used the table at all, the family's energy
saving at the same FLOP saving. Energy figures are the eval's: MODELLED (SCALE-Sim + Eq. 6), not measured.

    python benchmarks/energy_aware_training.py benchmarks/out/cifar10_30ep_cal/summary.csv --out DIR

Writes DIR/energy_aware_training.csv and .png; the last line is a JSON object per compared run.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

NEEDS = ("run", "arch", "stage", "accuracy", "compute_saving", "energy_saving", "trained_resource")


def family_saving_at(x: float, family: pd.DataFrame, by: str = "accuracy") -> float:
    """Energy saving of the family at `by` == x (accuracy, or compute_saving), linear between the
    bracketing members; NaN outside the family's range (no extrapolation)."""
    f = family.sort_values(by)
    a, e = f[by].to_numpy(), f.energy_saving.to_numpy()
    if len(a) < 2 or not a[0] <= x <= a[-1]:
        return float("nan")
    return float(np.interp(x, a, e))


def compare(summary: pd.DataFrame) -> pd.DataFrame:
    """Per run trained on another resource: the FLOP family's energy saving at the same accuracy (the
    Fig. 12 question) and at the same FLOP saving (did the training buy its FLOP saving where energy per
    FLOP is higher, i.e. exploit the table at all; `table_exploited` > 0 if so)."""
    rows = []
    for (arch, stage), g in summary[summary.stage != "static"].groupby(["arch", "stage"]):
        static = summary[(summary.stage == "static") & (summary.arch == arch)]
        family = pd.concat([static, g[g.trained_resource == "flops"]])
        for _, r in g[g.trained_resource != "flops"].iterrows():
            at = family_saving_at(r.accuracy, family)
            same = family_saving_at(r.compute_saving, family, by="compute_saving")
            rows.append({"run": r.run, "arch": arch, "stage": stage, "trained_resource": r.trained_resource,
                         "accuracy": r.accuracy, "energy_saving": r.energy_saving,
                         "compute_saving": r.compute_saving, "flops_family_energy_saving": at,
                         "advantage": r.energy_saving - at,
                         "flops_family_energy_saving_same_compute": same,
                         "table_exploited": r.energy_saving - same,
                         "family": " ".join(family.sort_values("accuracy").run)})
    return pd.DataFrame(rows)


def plot(summary: pd.DataFrame, table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.4))
    for arch in summary.arch.unique():
        s = summary[summary.arch == arch]
        static = s[s.stage == "static"]
        for res, g in s[s.stage != "static"].groupby("trained_resource"):
            g = pd.concat([static, g]).sort_values("energy_saving")
            label = f"{arch}, trained to save {res}"
            ax.plot(g.energy_saving * 100, g.accuracy * 100, "o-", label=label)
            # only the family is a curve through the static net: a line from (0, 0) to a lone run would
            # read as a family of its own
            h = g if res == "flops" else g[g.stage != "static"]
            bx.plot(h.compute_saving * 100, h.energy_saving * 100, "o-" if res == "flops" else "s--", label=label)
            for _, r in g.iterrows():
                ax.annotate(r.run, (r.energy_saving * 100, r.accuracy * 100), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
    for _, r in table.iterrows():
        if np.isfinite(r.flops_family_energy_saving):
            ax.annotate("", (r.energy_saving * 100, r.accuracy * 100),
                        (r.flops_family_energy_saving * 100, r.accuracy * 100),
                        arrowprops={"arrowstyle": "->", "color": "red"})
    ax.set_xlabel("energy saving [%] (modelled: SCALE-Sim + Eq. 6)")
    ax.set_ylabel("top-1 accuracy [%]")
    ax.set_title("energy-aware vs FLOP-aware training (paper Fig. 12 form)\n"
                 "red: from the FLOP family at equal accuracy", fontsize=9)
    bx.set_xlabel("FLOP saving [%] (counted)")
    bx.set_ylabel("energy saving [%] (modelled)")
    bx.set_title("did the training exploit the table?\nabove the FLOP family = more energy per FLOP skipped",
                 fontsize=9)
    for a in (ax, bx):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=130)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("summary", type=Path, help="summary.csv written by `ddi-hw eval`")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/energy_aware_training"))
    a = ap.parse_args(argv)
    try:
        summary = pd.read_csv(a.summary)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as err:
        print(f"error: cannot read {a.summary} ({err}); give the summary.csv written by `ddi-hw eval`", file=sys.stderr)
        return 2
    missing = [c for c in NEEDS if c not in summary.columns]
    if missing:
        print(f"error: {a.summary} lacks columns {missing}; re-run `ddi-hw eval` on the runs (it writes them)",
              file=sys.stderr)
        return 2
    summary["trained_resource"] = summary.trained_resource.fillna("")
    table = compare(summary)
    if table.empty:
        print("error: no run trained on a resource other than flops in the summary; evaluate the energy-trained "
              "runs together with the flops-trained ones", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    tmp = a.out / "energy_aware_training.csv.tmp"
    table.to_csv(tmp, index=False)
    tmp.replace(a.out / "energy_aware_training.csv")
    plot(summary, table, a.out / "energy_aware_training.png")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.drop(columns="family").to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(json.dumps([{k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                       for k, v in r.items() if k != "family"} for r in table.to_dict("records")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where can an energy-aware loss beat a FLOPs loss? The MODELLED energy per FLOP of every block
(what skipping it saves per FLOP saved) and of every gated conv's channels (per channel switched
off), on each preset. If these numbers are nearly equal, `--resource energy` has nothing to
exploit that `--resource flops` does not already see (benchmarks/RESULTS.md, issue 12 item 4).

    python benchmarks/energy_per_flop.py [--arch resnet38] [--hardware zedboard --hardware eyeriss-65nm]

Prints per-block and per-stage numbers and their spread (max/min, coefficient of variation);
writes benchmarks/out/energy_per_flop/<arch>_<preset>.csv. Last line: JSON with the spreads.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def spread(arch: str, hw: str, cache_dir=None, jobs=None):
    import pandas as pd

    from ddi_hw.cost import CostTable
    from ddi_hw.models import create_model
    from energy_models.profile import profile_specs

    model = create_model(arch, layer_gates=True, channel_gates=True).eval()
    table = profile_specs(model.specs(), hw, cache_dir=cache_dir, jobs=jobs, progress=False)
    model.attach_cost_table(CostTable.from_frame(table))
    plan = model.plan
    names = [b for kind, b in model.events if kind == "block"]
    rows = []
    for j, b in enumerate(names):
        K = int(plan.K[j])
        # skipping the block saves f + c + V(K) and costs s (the layer gate g runs anyway; s: a
        # DenseNet layer's copy of the previous layer's features, 0 FLOPs)
        save = {m: float(plan.f[m][j] + plan.c[m][j] + plan.V[m][j, K] - plan.s[m][j]) for m in ("flops", "energy")}
        # switching one channel off (mean over k) saves V(k) - V(k-1)
        dv = {m: float((plan.V[m][j, K] - plan.V[m][j, 0]) / K) for m in ("flops", "energy")}
        rows.append({"block": b, "skippable": bool(plan.skippable[j]), "width": K,
                     "skip_energy_per_flop_pj": save["energy"] / save["flops"],
                     "channel_energy_per_flop_pj": dv["energy"] / dv["flops"] if dv["flops"] else float("nan")})
    return pd.DataFrame(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="resnet38")
    ap.add_argument("--hardware", action="append", default=None)
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--cache-dir", default=None)
    a = ap.parse_args(argv)
    out = HERE / "out" / "energy_per_flop"
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for hw in a.hardware or ["zedboard", "eyeriss-65nm"]:
        df = spread(a.arch, hw, a.cache_dir, a.jobs)
        df.to_csv(out / f"{a.arch}_{hw}.csv", index=False)
        sk = df[df.skippable]
        by_width = sk.groupby("width").skip_energy_per_flop_pj.mean()
        ch = df.channel_energy_per_flop_pj.dropna()
        print(f"\n== {a.arch} on {hw}: energy per FLOP saved (pJ/FLOP, MODELLED) ==")
        print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print("skippable blocks by width:", ", ".join(f"{w}: {v:.3f}" for w, v in by_width.items()))
        key = hw.split("-")[0]
        summary.update({
            f"{key}_skip_max_over_min": round(float(sk.skip_energy_per_flop_pj.max()
                                                    / sk.skip_energy_per_flop_pj.min()), 4),
            f"{key}_skip_cv": round(float(sk.skip_energy_per_flop_pj.std() / sk.skip_energy_per_flop_pj.mean()), 4),
            f"{key}_channel_max_over_min": round(float(ch.max() / ch.min()), 4),
            f"{key}_channel_vs_skip": round(float(ch.mean() / sk.skip_energy_per_flop_pj.mean()), 4)})
    print(json.dumps({"arch": a.arch, **summary}))


if __name__ == "__main__":
    main()

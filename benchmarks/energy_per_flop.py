"""Where can an energy-aware loss beat a FLOPs loss? The MODELLED energy per FLOP of every block
(what skipping it saves per FLOP saved) and of every gated conv's channels (per channel switched
off), on each preset. If these numbers are nearly equal, `--resource energy` has nothing to
exploit that `--resource flops` does not already see (benchmarks/RESULTS.md, issue 12 item 4).

    python benchmarks/energy_per_flop.py [--arch resnet38] [--hardware zedboard --hardware eyeriss-65nm]
        [--checkpoint RUN --data-dir CIFAR [--limit N]]

Prints per-block and per-stage numbers and their spread (max/min, coefficient of variation);
writes benchmarks/out/energy_per_flop/<arch>_<preset>.csv. Last line: JSON with the spreads.

With --checkpoint (a trained run, e.g. the static ResNet-38), the other half of the question: what
skipping each block alone costs in accuracy (test images, every other block run). A loss that
prices energy prefers the blocks with the least accuracy lost per energy saved, a FLOPs loss per
FLOP saved; if both orders agree, energy-aware training skips the same blocks (`rank_corr`: Spearman
correlation of the two orders; `orders_first_differ_at`: the smallest k for which the two orders'
first k blocks are different sets).
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
                     "skip_energy_share_pct": save["energy"] / plan.dense_cost("energy") * 100,
                     "skip_flop_share_pct": save["flops"] / plan.dense_cost("flops") * 100,
                     "channel_energy_per_flop_pj": dv["energy"] / dv["flops"] if dv["flops"] else float("nan")})
    return pd.DataFrame(rows)


def accuracy_drops(run_dir, data_dir, limit: int | None, batch: int = 250):
    """Accuracy points lost by skipping each skippable block alone (forced off for every image, all
    other blocks forced on) against the full net, on the first `limit` test images."""
    import numpy as np
    import torch

    from ddi_hw.data import load_dataset, test_batches
    from ddi_hw.runs import load_run

    run = load_run(run_dir)
    model, n_skip = run.model, run.model.num_skippable
    ds = load_dataset(run.config["dataset"], data_dir)
    correct, seen = np.zeros(n_skip + 1), 0
    with torch.no_grad():
        for x, y, _ in test_batches(ds, batch, limit):
            for j in range(n_skip + 1):  # j == n_skip: nothing skipped
                L = torch.ones(len(y), n_skip)
                if j < n_skip:
                    L[:, j] = 0
                correct[j] += int((model(x, force={"layer": L}).logits.argmax(1) == y).sum())
            seen += len(y)
    acc = correct / seen * 100
    return run.config["arch"], acc[n_skip], acc[n_skip] - acc[:n_skip], seen


def add_drops(df, drops):
    """Per skippable block: accuracy lost (points) and lost per % of the net's energy / FLOPs saved by
    skipping it (the shares come from the gated plan: what the training loss sees)."""
    df = df.copy()
    sk = df.skippable.to_numpy()
    df.loc[sk, "acc_drop_points"] = drops
    for m in ("energy", "flop"):
        df.loc[sk, f"drop_per_{m}"] = df.loc[sk, "acc_drop_points"] / df.loc[sk, f"skip_{m}_share_pct"]
    return df


def first_disagreement(a, b) -> int | None:
    """The smallest k for which the first k items of orders a and b are different sets (None: never):
    a greedy skipper following a and one following b pick the same blocks for every smaller count."""
    return next((k for k in range(1, len(a) + 1) if set(a[:k]) != set(b[:k])), None)


def main(argv=None) -> None:
    from ddi_hw.errors import UserError

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default=None, help="default: the checkpoint's, else resnet38")
    ap.add_argument("--hardware", action="append", default=None)
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--checkpoint", default=None, help="a trained run: add the accuracy each block's skip costs")
    ap.add_argument("--data-dir", default=None, help="the checkpoint's data set (CIFAR-10 folder)")
    ap.add_argument("--limit", type=int, default=None, help="first N test images (default: all)")
    ap.add_argument("--out", default=str(HERE / "out" / "energy_per_flop"))
    a = ap.parse_args(argv)
    drops = None
    if a.checkpoint:
        arch, base_acc, drops, seen = accuracy_drops(a.checkpoint, a.data_dir, a.limit)
        if a.arch not in (None, arch):
            raise UserError(f"--arch {a.arch} but {a.checkpoint} is a {arch}; drop --arch")
        a.arch = arch
        print(f"{a.checkpoint}: {base_acc:.2f} % on {seen} test images with every block run")
    a.arch = a.arch or "resnet38"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for hw in a.hardware or ["zedboard", "eyeriss-65nm"]:
        df = spread(a.arch, hw, a.cache_dir, a.jobs)
        key = hw.split("-")[0]
        if drops is not None:
            df = add_drops(df, drops)
            sk = df[df.skippable]
            by_e = sk.sort_values("drop_per_energy", kind="stable").block.tolist()
            by_f = sk.sort_values("drop_per_flop", kind="stable").block.tolist()
            corr = sk.drop_per_energy.corr(sk.drop_per_flop, method="spearman")
            summary.update({f"{key}_rank_corr": round(float(corr), 4),
                            f"{key}_orders_first_differ_at": first_disagreement(by_e, by_f), "skippable": len(sk)})
            print("cheapest blocks to skip per energy saved:", " ".join(b.split(".")[-1] for b in by_e))
            print("cheapest blocks to skip per FLOP saved:  ", " ".join(b.split(".")[-1] for b in by_f))
        tmp = out / f"{a.arch}_{hw}.csv.tmp"
        df.to_csv(tmp, index=False)
        tmp.replace(out / f"{a.arch}_{hw}.csv")
        sk = df[df.skippable]
        by_width = sk.groupby("width").skip_energy_per_flop_pj.mean()
        ch = df.channel_energy_per_flop_pj.dropna()
        print(f"\n== {a.arch} on {hw}: energy per FLOP saved (pJ/FLOP, MODELLED) ==")
        print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print("skippable blocks by width:", ", ".join(f"{w}: {v:.3f}" for w, v in by_width.items()))
        summary.update({
            f"{key}_skip_max_over_min": round(float(sk.skip_energy_per_flop_pj.max()
                                                    / sk.skip_energy_per_flop_pj.min()), 4),
            f"{key}_skip_cv": round(float(sk.skip_energy_per_flop_pj.std() / sk.skip_energy_per_flop_pj.mean()), 4),
            f"{key}_channel_max_over_min": round(float(ch.max() / ch.min()), 4),
            f"{key}_channel_vs_skip": round(float(ch.mean() / sk.skip_energy_per_flop_pj.mean()), 4)})
    print(json.dumps({"arch": a.arch, **summary}))


if __name__ == "__main__":
    from ddi_hw.errors import UserError

    try:
        main()
    except UserError as err:
        sys.exit(f"error: {err}")

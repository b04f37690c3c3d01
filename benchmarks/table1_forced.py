"""Table I in the paper's own setting, MODELLED: energy saving vs FLOP saving of a gated ResNet-74
with forced skipping (40-80 %), gates running and costed, on `zedboard` (our engine) and
`eyeriss-65nm`, next to the paper's measured Table I ratios (0.90, 0.94, 0.955, 0.954, 0.978).
Coefficients are the presets' cited estimates; nothing is fitted to Table I.

    python benchmarks/table1_forced.py [--draws 20] [--data-dir CIFAR --limit 1000]

Layer skipping (the Table I row), channel skipping, and -- with --data-dir -- the committed IADI
checkpoints (benchmarks/checkpoints/cifar10_30ep/iadi_*, their own decisions on CIFAR-10 test images).
Writes CSV + PNG to benchmarks/out/table1_forced/. The last line is a JSON object with
zedboard_ratio_40..80 and eyeriss_ratio_40..80 (layer skipping; energy saving / FLOP saving).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

PRESETS = ("zedboard", "eyeriss-65nm")
KEY = {"zedboard": "zedboard", "eyeriss-65nm": "eyeriss"}


def checkpoints_table(data_dir: str, limit: int, cache_dir=None, jobs=None):
    """The committed IADI checkpoints' own decisions on `limit` CIFAR-10 test images, both presets."""
    from ddi_hw.data import test_images
    from ddi_hw.table1 import checkpoint_table

    root = HERE / "checkpoints" / "cifar10_30ep"
    runs = sorted(root.glob("iadi_*"))
    x, _y = test_images("cifar10", data_dir, limit)
    return checkpoint_table({r.name: r for r in runs}, x, PRESETS, cache_dir, jobs)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--data-dir", default=None, help="CIFAR-10 python batches: also tabulate the IADI checkpoints")
    ap.add_argument("--limit", type=int, default=1000, help="test images per checkpoint")
    ap.add_argument("--out", default=str(HERE / "out" / "table1_forced"))
    a = ap.parse_args(argv)


    from ddi_hw.table1 import forced_table, plot_forced

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {}
    fmt = {"float_format": lambda v: f"{v:.3f}", "index": False}
    for mode in ("layer", "channel"):
        tab, parts = forced_table("resnet74", mode, PRESETS, draws=a.draws, cache_dir=a.cache_dir, jobs=a.jobs)
        tab.to_csv(out / f"table1_forced_{mode}.csv", index=False)
        parts.to_csv(out / f"table1_forced_{mode}_breakdown.csv", index=False)
        plot_forced(tab, out / f"table1_forced_{mode}.png")
        print(f"\n== forced {mode} skipping, ResNet-74, gates running and costed (energy MODELLED) ==")
        print(tab.drop(columns=["energy_model", "draws"]).to_string(**fmt))
        print(f"\nwhere the energy goes (dense gated ResNet-74, {mode} gates):")
        print(parts.to_string(**fmt))
        for r in tab.itertuples():
            prefix = "" if mode == "layer" else "channel_"
            result[f"{prefix}{KEY[r.hardware]}_ratio_{round(100 * r.rate)}"] = round(float(r.ratio), 4)
    if a.data_dir:
        ck = checkpoints_table(a.data_dir, a.limit, a.cache_dir, a.jobs)
        ck.to_csv(out / "table1_checkpoints.csv", index=False)
        print("\n== committed IADI checkpoints (ResNet-38, CPU scale), own decisions on CIFAR-10 test images ==")
        print(ck.drop(columns=["energy_model"]).to_string(**fmt))
        for r in ck.itertuples():
            result[f"{r.run}_{KEY[r.hardware]}_ratio"] = round(float(r.ratio), 4)
    layer = {k: v for k, v in result.items() if k.startswith(("zedboard_", "eyeriss_"))}
    print(json.dumps({**layer, **{k: v for k, v in result.items() if k not in layer}}))


if __name__ == "__main__":
    main()

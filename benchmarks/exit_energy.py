"""What the early-exit branches cost in the MODELLED cost table (issue 12, session 6): each exit
branch's energy on a preset, split by where its parts run (engine launches, fused pool, processor
rows), as a share of the whole DDI network with every block, channel, gate and exit executed, and
next to the static backbone.

    python benchmarks/exit_energy.py [--arch resnet38] [--hardware zedboard] [--jobs 1]

Writes benchmarks/out/exit_energy/<arch>_<preset>.csv (one row per exit-branch row of the table).
Last line: JSON with `exit_share` (all exits / whole DDI network), `exit_flop_share` (the same in
MACs), `exit_vs_static` (all exits / static backbone) and per-source energies in microjoules.
Simulated counts, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def exit_rows(arch: str, hw: str, cache_dir=None, jobs=None):
    from ddi_hw.models import create_model
    from energy_models.profile import profile_specs

    model = create_model(arch, layer_gates=True, channel_gates=True, exits=True).eval()
    table = profile_specs(model.specs(), hw, cache_dir=cache_dir, jobs=jobs, progress=False)
    dense = table[(table.axis == "out") & (table.active == table.out_ch)]
    return model, dense


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="resnet38")
    ap.add_argument("--hardware", default="zedboard")
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--cache-dir", default=None)
    a = ap.parse_args(argv)
    model, dense = exit_rows(a.arch, a.hardware, a.cache_dir, a.jobs)
    ex = dense[dense.role == "exit"]
    out = HERE / "out" / "exit_energy"
    out.mkdir(parents=True, exist_ok=True)
    ex[["layer", "kind", "source", "in_ch", "out_ch", "in_h", "out_h", "macs", "cycles", "proc_s",
        "dram_reads_ifmap", "dram_reads_filter", "dram_writes_ofmap", "energy_pj"]].to_csv(
        out / f"{a.arch}_{a.hardware}.csv", index=False)
    total = float(dense.energy_pj.sum())
    static = float(dense[dense.role == "backbone"].energy_pj.sum())
    print(f"{a.arch} DDI on {a.hardware} (MODELLED): {len(model.exits)} exits, whole network "
          f"{total / 1e6:.1f} uJ, static backbone {static / 1e6:.1f} uJ")
    print(f"{'exit':8} {'energy uJ':>10} {'share':>7} {'vs static':>10}  by source (uJ)")
    for i in range(len(model.exits)):
        e = ex[ex.block == f"exits.{i}"]
        by = e.groupby("source").energy_pj.sum() / 1e6
        print(f"exits.{i:<3} {e.energy_pj.sum() / 1e6:10.2f} {e.energy_pj.sum() / total:7.2%} "
              f"{e.energy_pj.sum() / static:10.2%}  " + ", ".join(f"{k}: {v:.2f}" for k, v in by.items()))
    src = (ex.groupby("source").energy_pj.sum() / 1e6).round(3).to_dict()
    print(json.dumps({"arch": a.arch, "hardware": a.hardware, "exits": len(model.exits),
                      "exit_share": round(float(ex.energy_pj.sum()) / total, 4),
                      "exit_flop_share": round(float(ex.macs.sum()) / float(dense.macs.sum()), 4),
                      "exit_vs_static": round(float(ex.energy_pj.sum()) / static, 4),
                      "exit_uj": round(float(ex.energy_pj.sum()) / 1e6, 3), "by_source_uj": src}))


if __name__ == "__main__":
    main()

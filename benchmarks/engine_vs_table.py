"""Does the cost table describe the engine? Per engine launch of a gated ResNet-38 (every conv,
the CNN channel gates' convs, a few active-channel counts on each gated axis): the `zedboard`
table's cycles and DRAM words (SCALE-Sim run tile by tile as the engine runs, + the rows fused
into the launch) vs the C-simulated HLS engine's own counters (fpga/hls/ddi_engine.cpp built with
g++: pipelined-loop iterations as the cycle proxy, DRAM words per port). SIMULATED on both sides:
no board is involved.

    python benchmarks/engine_vs_table.py [--arch resnet38] [--jobs 2]

Prints one row per distinct launch (shape, flags, axis, active) and a summary; the last line is
a JSON object with cycles_ratio_min/max and dram_ratio_min/max (table / engine).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def actives(n: int) -> list[int]:
    return sorted({n, max(1, 3 * n // 4), max(1, n // 2), max(1, n // 4), 1})


def compare(arch: str = "resnet38", jobs: int | None = None, cache_dir=None, hardware="zedboard"):
    import pandas as pd

    from ddi_hw.deploy.csim import run_spec
    from ddi_hw.models import create_model
    from energy_models.dataflow import launch_counts, launch_flags, place
    from energy_models.profile import profile_specs

    model = create_model(arch, layer_gates=True, channel_gates=True)
    specs = model.specs()
    df = profile_specs(specs, hardware, cache_dir=cache_dir, jobs=jobs, progress=False)
    where, flags = place(specs), launch_flags(specs)
    residual = {p.fused_into for p in where.values() if p.op == "residual_add"}
    rows, seen = [], set()
    rng = np.random.default_rng(0)
    for s in specs:
        if where[s.name].op not in ("conv", "gate_conv") or s.kind != "conv":
            continue
        f = flags.get(s.name, {})
        for axis, n in [("out", s.out_ch)] + ([("in", s.in_ch)] if s.in_gate else []):
            gated = (axis == "out" and s.out_gate) or axis == "in"
            for a in actives(n) if gated else [n]:
                key = (s.in_ch, s.out_ch, s.in_h, s.kernel_h, s.stride, tuple(sorted(f.items())),
                       s.name in residual, axis, a)
                if key in seen:
                    continue
                seen.add(key)
                eng = run_spec(s, rng, axis=axis, active=a, residual=s.name in residual, **f)
                tab = launch_counts(df, s.name, axis, a)
                rows.append({"layer": s.name, "shape": f"{s.in_ch}->{s.out_ch} {s.in_h}x{s.in_w} "
                             f"k{s.kernel_h}s{s.stride}", "axis": axis, "active": a, "of": n,
                             "flags": ",".join(k if v is True else f"{k}={v}" for k, v in f.items())
                             + (",residual" if s.name in residual else ""),
                             "table_cycles": tab["cycles"], "engine_cycles": eng.counters["cycles"],
                             "table_dram": tab["dram_words"], "engine_dram": eng.dram_words,
                             "engine_bias_pre": eng.counters["dram_bias"] + eng.counters["dram_pre"]})
    out = pd.DataFrame(rows)
    out["cycles_ratio"] = out.table_cycles / out.engine_cycles
    out["dram_ratio"] = out.table_dram / out.engine_dram
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="resnet38")
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--csv", default=None, help="also write the per-launch table here")
    a = ap.parse_args(argv)
    out = compare(a.arch, a.jobs, a.cache_dir)
    import pandas as pd
    with pd.option_context("display.width", 200, "display.max_rows", 500):
        print(out.drop(columns=["engine_bias_pre"]).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if a.csv:
        out.to_csv(a.csv, index=False)
    band_c = out[(out.cycles_ratio < 0.9) | (out.cycles_ratio > 1.1)]
    band_d = out[(out.dram_ratio < 0.95) | (out.dram_ratio > 1.05)]
    print(f"\n{len(out)} distinct launches (simulated: SCALE-Sim table vs C-sim engine); "
          f"cycles ratio {out.cycles_ratio.min():.3f}-{out.cycles_ratio.max():.3f} "
          f"({len(band_c)} outside 0.9-1.1), DRAM ratio {out.dram_ratio.min():.3f}-"
          f"{out.dram_ratio.max():.3f} ({len(band_d)} outside 0.95-1.05)")
    for name, band in (("cycles", band_c), ("dram", band_d)):
        if len(band):
            print(f"outside the {name} band: " + "; ".join(
                f"{r.layer} {r.axis}={r.active}/{r.of} ({getattr(r, name + '_ratio'):.3f})" for r in band.itertuples()))
    print(json.dumps({"cycles_ratio_min": round(float(out.cycles_ratio.min()), 4),
                      "cycles_ratio_max": round(float(out.cycles_ratio.max()), 4),
                      "dram_ratio_min": round(float(out.dram_ratio.min()), 4),
                      "dram_ratio_max": round(float(out.dram_ratio.max()), 4),
                      "launches": len(out), "arch": a.arch, "hardware": "zedboard",
                      "cycles_outside_band": len(band_c), "dram_outside_band": len(band_d)}))


if __name__ == "__main__":
    main()

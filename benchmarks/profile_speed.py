"""How fast is `profile_model`? Cold (empty cache) and warm (cached) full per-channel tables for
CIFAR ResNet-74 and DenseNet-BC-100 and ImageNet DenseNet-201 (224x224) on eyeriss-65nm, against
simulating every (layer, k) one by one with SCALE-Sim's own `single_layer_sim` (no dedup, no
cache, one process).

The brute-force time is extrapolated for the CIFAR networks: `--sample` (layer, axis, k) points
are drawn uniformly at random (seeded) from all points of the table, each is simulated directly
and timed, and the mean time is multiplied by the number of points; the table's counts at those
points must equal the direct runs (asserted). DenseNet-201's direct runs take minutes per point
(tests/test_scalesim_os.py compares sampled ones); `--skip-densenet201` leaves it out. The last line
printed is a JSON object.

    python benchmarks/profile_speed.py [--sample 24] [--jobs N]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time

from energy_models.presets import DEFAULT_PRESET


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", type=int, default=24, help="direct runs timed per architecture")
    ap.add_argument("--jobs", type=int, default=None, help="processes (default: cores)")
    ap.add_argument("--hardware", default=DEFAULT_PRESET)
    ap.add_argument("--skip-densenet201", action="store_true", help="CIFAR networks only")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from ddi_hw.models import create_model
    from energy_models import extract_specs, load_preset, profile_model
    from energy_models.profile import axes, sim_layer
    from energy_models.scalesim_runner import COUNT_COLUMNS, sim_fields, simulate_direct

    preset = load_preset(args.hardware)
    sim = sim_fields(preset, preset.dataflow)
    result, rows = {}, []
    archs = [("resnet74", 32), ("densenet100", 32)] + ([] if args.skip_densenet201 else [("densenet201", 224)])
    for arch, size in archs:
        model = create_model(arch)
        shape = (1, 3, size, size)
        with tempfile.TemporaryDirectory() as cache:
            t0 = time.perf_counter()
            cold = profile_model(model, shape, preset, cache_dir=cache, jobs=args.jobs,
                                 progress=False)
            t1 = time.perf_counter()
            warm = profile_model(model, shape, preset, cache_dir=cache, jobs=args.jobs,
                                 progress=False)
            t2 = time.perf_counter()
        assert cold.equals(warm), "warm table differs from cold table"
        points = [(s, axis, k) for s in extract_specs(model, shape) if s.kind in ("conv", "linear")
                  for axis, n in axes(s) for k in range(1, n + 1)]
        rng = random.Random(0)
        times = []
        rows_by = cold.set_index(["layer", "axis", "active"])
        for s, axis, k in (rng.sample(points, min(args.sample, len(points))) if size == 32 else []):
            layer = sim_layer(s).with_active(axis, k)
            t = time.perf_counter()
            direct = simulate_direct(layer, sim)
            times.append(time.perf_counter() - t)
            row = rows_by.loc[(s.name, axis, k)]
            assert {c: int(row[c]) for c in COUNT_COLUMNS} == direct, (s.name, axis, k)
        brute = statistics.mean(times) * len(points) if times else float("nan")
        result.update({f"{arch}_cold_s": round(t1 - t0, 2), f"{arch}_warm_s": round(t2 - t1, 3),
                       f"{arch}_points": len(points), f"{arch}_rows": len(cold)})
        if times:
            result[f"{arch}_bruteforce_s"] = round(brute, 1)
        rows.append((arch, len(points), t1 - t0, t2 - t1, brute, len(times)))

    table = Table(title=f"profile speed on {preset.name} ({os.cpu_count()} cores, "
                        f"jobs={args.jobs or os.cpu_count()})")
    for col in ("arch", "(layer,k) points", "cold s", "warm s", "brute force s (extrap.)",
                "speed-up"):
        table.add_column(col, justify="right")
    for arch, n, cold_s, warm_s, brute, m in rows:
        table.add_row(arch, str(n), f"{cold_s:.1f}", f"{warm_s:.2f}",
                      f"{brute:.0f} (from {m} runs)" if m else "-",
                      f"{brute / cold_s:.0f}x" if m else "-")
    Console().print(table)
    result["sample_per_arch"] = args.sample
    result["load_avg_1min"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

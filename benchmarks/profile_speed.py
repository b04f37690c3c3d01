"""How fast is `profile_model`? Cold (empty cache) and warm (cached) full per-channel tables for
CIFAR ResNet-74 and DenseNet-BC-100 on eyeriss-65nm, against simulating every (layer, k) one by
one with SCALE-Sim's own `single_layer_sim` (no dedup, no cache, one process).

The brute-force time is extrapolated: `--sample` (layer, axis, k) points are drawn uniformly at
random (seeded) from all points of the table, each is simulated directly and timed, and the mean
time is multiplied by the number of points. The last line printed is a JSON object.

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
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from ddi_hw.models import create_model
    from energy_models import extract_specs, load_preset, profile_model
    from energy_models.profile import axes, sim_layer
    from energy_models.scalesim_runner import sim_fields, simulate_direct

    preset = load_preset(args.hardware)
    sim = sim_fields(preset, preset.dataflow)
    result, rows = {}, []
    for arch in ("resnet74", "densenet100"):
        model = create_model(arch)
        shape = (1, 3, 32, 32)
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
        for s, axis, k in rng.sample(points, min(args.sample, len(points))):
            layer = sim_layer(s).with_active(axis, k)
            t = time.perf_counter()
            simulate_direct(layer, sim)
            times.append(time.perf_counter() - t)
        brute = statistics.mean(times) * len(points)
        result.update({f"{arch}_cold_s": round(t1 - t0, 2), f"{arch}_warm_s": round(t2 - t1, 3),
                       f"{arch}_bruteforce_s": round(brute, 1),
                       f"{arch}_points": len(points), f"{arch}_rows": len(cold)})
        rows.append((arch, len(points), t1 - t0, t2 - t1, brute, len(times)))

    table = Table(title=f"profile speed on {preset.name} ({os.cpu_count()} cores, "
                        f"jobs={args.jobs or os.cpu_count()})")
    for col in ("arch", "(layer,k) points", "cold s", "warm s", "brute force s (extrap.)",
                "speed-up"):
        table.add_column(col, justify="right")
    for arch, n, cold_s, warm_s, brute, m in rows:
        table.add_row(arch, str(n), f"{cold_s:.1f}", f"{warm_s:.2f}",
                      f"{brute:.0f} (from {m} runs)", f"{brute / cold_s:.0f}x")
    Console().print(table)
    result["sample_per_arch"] = args.sample
    result["load_avg_1min"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

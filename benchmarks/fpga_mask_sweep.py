"""C-simulated engine loop iterations vs active output channels for the three CIFAR-ResNet conv
shapes: the skip mask shortens the engine's loops in steps of the 16-channel output tile.

    python benchmarks/fpga_mask_sweep.py --out benchmarks/out/fpga_mask_sweep

Numbers are from the g++ C-simulation of fpga/hls/ddi_engine.cpp (SIMULATED loop counts, a cycle
proxy; not board measurements). Each run is also checked bit-exact against the numpy reference.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main() -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    from rich.progress import track

    from ddi_hw.deploy import csim
    from ddi_hw.deploy.fixedpoint import conv_layer
    from energy_models.atomic import atomic_write_text

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/out/fpga_mask_sweep")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shapes = [("stage1 16ch 32x32", 16, 32), ("stage2 32ch 16x16", 32, 16), ("stage3 64ch 8x8", 64, 8)]
    jobs = [(s, c, hw, k) for s, c, hw in shapes for k in range(0, c + 1, 2)]
    rows, cases = [], {}
    for name, c, hw, k in track(jobs, description="C-sim mask sweep"):
        if name not in cases:
            cases[name] = csim.random_case(rng, name, c, c, hw, hw, residual=True)
        case = cases[name]
        mask = np.zeros(c, np.uint8)
        mask[rng.permutation(c)[:k]] = 1
        t0 = time.perf_counter()
        y, iters = csim.run_layer(case.x, case.w, case.bias, case.params, case.residual, out_mask=mask)
        dt = time.perf_counter() - t0
        exact = bool(np.array_equal(y, conv_layer(case.x, case.w, case.bias, case.params, case.residual,
                                                  out_mask=mask)))
        rows.append({"layer": name, "channels": c, "active": k, "iterations": iters,
                     "dense_iterations": csim.expected_iterations(c, c, hw, hw, 3),
                     "bit_exact": exact, "csim_seconds": dt})
    df = pd.DataFrame(rows)
    df["iteration_ratio"] = df.iterations / df.dense_iterations
    df["active_ratio"] = df.active / df.channels
    atomic_write_text(out / "fpga_mask_sweep.csv", df.to_csv(index=False))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, g in df.groupby("layer", sort=False):
        ax.step(g.active_ratio, g.iteration_ratio, where="post", label=name)
    ax.plot([0, 1], [0, 1], "k:", label="ideal (proportional)")
    ax.set_xlabel("active output channels / channels")
    ax.set_ylabel("engine loop iterations / dense (C-sim)")
    ax.set_title("ddi_engine: output-channel skipping (SIMULATED)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "fpga_mask_sweep.png", dpi=120)
    print(df.groupby("layer", sort=False).agg(bit_exact=("bit_exact", "all"),
                                              ratio_at_half=("iteration_ratio", lambda r: float(r.iloc[len(r) // 2]))))
    print(f"wrote {out / 'fpga_mask_sweep.csv'} and {out / 'fpga_mask_sweep.png'}")


if __name__ == "__main__":
    main()

"""Does skipping save wall-clock time? CPU latency of ResNet-74 with forced layer / channel skipping.

For 0/25/50/75% forced skipping (layer: that share of the skippable blocks per sample; channel:
that share of every gated conv's channels per sample, random per sample) at batch 1 and 64, time
  - the sparse path (skipped blocks/channels not executed; gates run and are counted),
  - the masked dense path (everything computed, then masked: what SkipNet's code does),
against the static ResNet-74 (no gates) run through the same folded-BN kernels. Ratio =
realised time saving / FLOP saving (FLOPs from the cost table, gates included); 1.0 means the
FLOP saving is fully realised, 0 means none of it.

    python benchmarks/skip_speed.py [--threads 1] [--rounds-bs1 30] [--rounds-bs64 3]

Prints a table and, last, one JSON line (keys `layer_bs1`, `channel_bs1`, `layer_bs64`,
`channel_bs64`: ratios at 50%, plus every case).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from ddi_hw.models import create_model


def forced(model, n: int, p_layer: float, p_chan: float, g: torch.Generator) -> dict:
    """Exactly round(p * width) units off per sample, chosen at random per sample."""
    def pick(rows, width, p):
        off = round(p * width)
        order = torch.rand(rows, width, generator=g).argsort(1)
        m = torch.ones(rows, width)
        m.scatter_(1, order[:, :off], 0.0)
        return m
    out = {}
    if model.num_skippable and model.layer_gate is not None:
        out["layer"] = pick(n, model.num_skippable, p_layer)
    if model.gate_widths:
        out["channel"] = {k: pick(n, w, p_chan) for k, w in model.gate_widths.items()}
    return out


def measure(fns: dict, rounds: int) -> tuple[dict, dict]:
    """Fastest wall-clock and CPU (thread) time of each callable. The callables run interleaved,
    one after the other in every round, so load from other jobs on this shared CPU hits all cases
    alike; the minimum over rounds is the most repeatable estimate of the work itself."""
    wall = {k: float("inf") for k in fns}
    cpu = dict(wall)
    for fn in fns.values():  # warm-up (also builds the folded-weight caches)
        fn()
    for _ in range(rounds):
        for k, fn in fns.items():
            t, c = time.perf_counter(), time.thread_time()
            fn()
            cpu[k] = min(cpu[k], time.thread_time() - c)
            wall[k] = min(wall[k], time.perf_counter() - t)
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds-bs1", type=int, default=30)
    ap.add_argument("--rounds-bs64", type=int, default=3)
    ap.add_argument("--arch", default="resnet74")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    static = create_model(args.arch).eval()
    nets = {"layer": create_model(args.arch, layer_gates=True).eval(),
            "channel": create_model(args.arch, channel_gates=True).eval()}
    base_flops = static.dense_cost("flops")
    pcts = (0.0, 0.25, 0.5, 0.75)
    summary, lines = {}, []
    for bs in (1, 64):
        x = torch.randn(bs, 3, 32, 32, generator=g)
        fns, flops = {("static", 0.0, "sparse"): lambda x=x: static(x, mode="sparse"),
                      ("static", 0.0, "dense"): lambda x=x: static(x, mode="dense")}, {}
        for kind, net in nets.items():
            for p in pcts:
                force = forced(net, bs, p, p, g)
                with torch.no_grad():
                    flops[(kind, p)] = float(net(x, mode="sparse", force=force).cost["flops"].mean())
                for path in ("sparse", "dense"):
                    fns[(kind, p, path)] = (lambda net=net, force=force, path=path, x=x:
                                            net(x, mode=path, force=force))
        with torch.no_grad():
            wall, cpu = measure(fns, args.rounds_bs1 if bs == 1 else args.rounds_bs64)
        t0, c0 = wall[("static", 0.0, "sparse")], cpu[("static", 0.0, "sparse")]
        lines.append(("static", bs, 0.0, t0, wall[("static", 0.0, "dense")], c0, base_flops, None, None))
        for kind in nets:
            for p in pcts:
                t, c, f = wall[(kind, p, "sparse")], cpu[(kind, p, "sparse")], flops[(kind, p)]
                fs, ts, cs = 1 - f / base_flops, 1 - t / t0, 1 - c / c0
                ratio = ts / fs if fs > 0.02 else None
                cratio = cs / fs if fs > 0.02 else None
                lines.append((kind, bs, p, t, wall[(kind, p, "dense")], c, f, ratio, cratio))
                summary[f"{kind}_bs{bs}_{int(p * 100)}"] = {
                    "sparse_ms": round(1e3 * t, 3), "masked_dense_ms": round(1e3 * wall[(kind, p, "dense")], 3),
                    "static_ms": round(1e3 * t0, 3), "sparse_cpu_ms": round(1e3 * c, 3),
                    "static_cpu_ms": round(1e3 * c0, 3), "flop_saving": round(fs, 4), "time_saving": round(ts, 4),
                    "ratio": None if ratio is None else round(ratio, 3),
                    "cpu_ratio": None if cratio is None else round(cratio, 3)}
                if p == 0.5:
                    summary[f"{kind}_bs{bs}"] = None if ratio is None else round(ratio, 3)
    print(f"{args.arch}, CPU, torch threads = {args.threads}; static = static net on the same folded-BN "
          "kernels; ratio = wall-clock saving / FLOP saving (gates included); cpu = thread CPU time")
    print(f"{'case':8} {'batch':>5} {'skip':>5} {'sparse ms':>10} {'masked ms':>10} {'cpu ms':>8} {'MFLOPs':>8} "
          f"{'FLOP sav':>8} {'time sav':>8} {'ratio':>6} {'cpu rat':>7}")
    for kind, bs, p, t, td, c, f, ratio, cratio in lines:
        t_static = next(l[3] for l in lines if l[0] == "static" and l[1] == bs)
        print(f"{kind:8} {bs:5d} {int(p * 100):4d}% {1e3 * t:10.2f} {1e3 * td:10.2f} {1e3 * c:8.2f} {f / 1e6:8.1f} "
              f"{1 - f / base_flops:8.1%} {1 - t / t_static:8.1%} {'' if ratio is None else f'{ratio:6.2f}':>6} "
              f"{'' if cratio is None else f'{cratio:7.2f}':>7}")
    summary["threads"] = args.threads
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""Does skipping save wall-clock time? CPU latency of ResNet-74 with forced layer / channel skipping.

For 0/25/50/75% forced skipping (layer: that share of the 34 skippable blocks per sample;
channel: that share of every gated conv's channels per sample; random per sample) at batch 1 and
64, two rows per case, both on the sparse path (skipped blocks / channels not executed):
  - "mechanism": decisions forced, gates NOT executed (a forced model needs no gate to decide):
    the cost of skipping itself. Its FLOPs exclude the gates. JSON keys `layer_bs1`,
    `channel_bs1`, `layer_bs64`, `channel_bs64`.
  - "with gates": gates executed and their output overridden: the real inference cost of the
    gated model, gate overhead included (gate FLOPs counted). Keys `..._gated`.
Baseline: the static ResNet-74 (no gates) on the same folded-BN sparse kernels. The masked dense
path (computes everything, then masks: what SkipNet's public code does) is timed for reference.
ratio = realised time saving / FLOP saving (1.0: fully realised, 0: none of it). At batch 1 each
case is averaged over `--draws` random decision patterns (which blocks are skipped matters: a
16-channel block is slower per FLOP than a 64-channel one); ratio = mean time saving / mean FLOP
saving. Timing: every callable runs interleaved with all others in every round, minimum over
rounds of wall-clock and of thread CPU time (robust against load from other jobs).

    python benchmarks/skip_speed.py [--threads 1] [--rounds-bs1 30] [--rounds-bs64 8] [--draws 3]

Prints a table and, last, one JSON line (the keys above: ratios at 50%, plus every case).
"""
from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from ddi_hw.models import create_model

BS64_CHANNEL_NOTE = (
    "batch-64 channel skipping draws a different random mask per sample, so every conv sees 64 "
    "distinct masks; the sparse path then runs one conv over the union of active channels with "
    "the masks applied (exact, no per-sample loop), and the union of 64 random half-masks is "
    "~every channel: no saving is expected. Grouping samples by mask instead (max_channel_groups=64: 64 "
    "batch-1 runs over exactly their channels) was measured at ~2x the static net's CPU time "
    "(benchmarks/RESULTS.md), so it is not the default.")


NEW_MASKS = 16  # distinct patterns the "new masks" row cycles through


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


def gate_flops(model, out) -> torch.Tensor:
    """Per-sample FLOPs of the gates in `out.cost` (layer gates: every block reached; channel
    gates: blocks that run), from the model's cost plan."""
    plan = model.plan
    return plan.g["flops"].sum() + (out.block_run.double() * plan.c["flops"]).sum(1)


def call(net, x, force, mode="sparse", gates=False):
    """One forward; `gates`: run the gates although every decision is forced."""
    net.skip_forced_gates = not gates
    return net(x, mode=mode, force=force)


def measure(fns: dict, rounds: int) -> tuple[dict, dict]:
    """Fastest wall-clock and CPU (thread) time of each callable. The callables run interleaved,
    one after the other in every round, so load from other jobs on this shared CPU hits all cases
    alike; the minimum over rounds is the most repeatable estimate of the work itself."""
    wall = {k: float("inf") for k in fns}
    cpu = dict(wall)
    for fn in fns.values():  # warm-up (also builds the folded / sliced weight caches)
        fn()
    for _ in range(rounds):
        for k, fn in fns.items():
            t, c = time.perf_counter(), time.thread_time()
            fn()
            cpu[k] = min(cpu[k], time.thread_time() - c)
            wall[k] = min(wall[k], time.perf_counter() - t)
    return wall, cpu


COMPONENTS = (  # (label, object getter, method name): the sparse path's entry points, timed in context
    ("LSTM layer gate (fused C step)", lambda net: [g for g in [net.layer_gate] if g is not None], "fused_step"),
    ("CNN channel gate (conv + C head)", lambda net: [b.cgate for b in net.blocks if b.cgate is not None], "sparse"),
    ("block compute (convs, add, ReLU)", lambda net: list(net.blocks), "sparse"),
    ("force checks", lambda net: [net], "_check_force"),
    ("C runner: program cache check", lambda net: [net], "_program"),
    ("C runner: whole network (one call, incl. the cache check)", lambda net: [net], "_forward_one"),
    ("bookkeeping: record decisions", lambda net: [None], "layer"),
    ("bookkeeping: channel records", lambda net: [None], "channel"),
    ("bookkeeping: flush + costs", lambda net: [None], "finish"),
)


def components(net, x, force, gates: bool, rounds: int) -> list[tuple[str, int, float]]:
    """Per-component thread CPU time of one batch-1 sparse forward, measured in context: each
    entry point is wrapped with a timer (adds ~0.3 us per call), minimum over rounds. `None`
    objects stand for `SparseRun` (patched on the class). Block compute includes gathering the
    active weights (inside the block kernel at batch 1).
    Returns (label, calls per forward, us per forward) plus the whole forward."""
    from ddi_hw.models.base import SparseRun
    acc, calls, undo = {}, {}, []
    for label, objs, attr in COMPONENTS:
        for obj in objs(net):
            target = SparseRun if obj is None else obj
            fn = getattr(target, attr, None)
            if fn is None:
                continue

            def timed(*a, _fn=fn, _label=label, **k):
                t = time.thread_time()
                try:
                    return _fn(*a, **k)
                finally:
                    acc[_label] = acc.get(_label, 0.0) + time.thread_time() - t
                    calls[_label] = calls.get(_label, 0) + 1
            if obj is None:
                undo.append((SparseRun, attr, fn))
                setattr(SparseRun, attr, timed)
            else:
                undo.append((obj, attr, None))
                setattr(obj, attr, timed)
    best, ncalls = {}, {}
    try:
        for r in range(rounds + 2):
            acc.clear(), calls.clear()
            t = time.thread_time()
            call(net, x, force, gates=gates)
            acc["whole forward"] = time.thread_time() - t
            if r >= 2:  # warm-up rounds
                for k, v in acc.items():
                    best[k] = min(best.get(k, float("inf")), v)
                ncalls = dict(calls)
    finally:
        for target, attr, fn in reversed(undo):
            if fn is None:
                delattr(target, attr)
            else:
                setattr(target, attr, fn)
    order = [lb for lb, _, _ in COMPONENTS] + ["whole forward"]
    return [(k, ncalls.get(k, 1), 1e6 * best[k]) for k in order if k in best]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds-bs1", type=int, default=30)
    ap.add_argument("--rounds-bs64", type=int, default=8)  # 3 swung the batch-64 ratios by +-0.3 here
    ap.add_argument("--draws", type=int, default=3, help="random decision patterns per case at batch 1")
    ap.add_argument("--arch", default="resnet74")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    static = create_model(args.arch).eval()
    nets = {"layer": create_model(args.arch, layer_gates=True).eval(),
            "channel": create_model(args.arch, channel_gates=True).eval()}
    base_flops = static.dense_cost("flops")
    pcts = (0.0, 0.25, 0.5, 0.75)
    rows_kinds = ("mechanism", "with gates", "new masks")
    summary, lines = {}, []

    def rows(kind, bs):  # "new masks" (a different mask on every call) only matters for batch-1 channel skipping
        return rows_kinds if (kind, bs) == ("channel", 1) else rows_kinds[:2]
    for bs in (1, 64):
        draws = args.draws if bs == 1 else 1
        x = torch.randn(bs, 3, 32, 32, generator=g)
        fns = {("static",): lambda x=x: static(x, mode="sparse")}
        flops = {}
        for kind, net in nets.items():
            for p in pcts:
                for d in range(draws):
                    force = forced(net, bs, p, p, g)
                    with torch.no_grad():
                        out = call(net, x, force, gates=True)
                    total = float(out.cost["flops"].mean())
                    flops[(kind, p, "with gates", d)] = total
                    flops[(kind, p, "mechanism", d)] = total - float(gate_flops(net, out).mean())
                    flops[(kind, p, "new masks", d)] = flops[(kind, p, "mechanism", d)]
                    for row in rows(kind, bs):
                        fns[(kind, p, row, d)] = (lambda net=net, force=force, x=x, row=row:
                                                  call(net, x, force, gates=row == "with gates"))
                    if "new masks" in rows(kind, bs):  # same share off, a fresh pattern on every call
                        fresh = itertools.cycle([forced(net, bs, p, p, g) for _ in range(NEW_MASKS)])
                        fns[(kind, p, "new masks", d)] = lambda net=net, fresh=fresh, x=x: call(net, x, next(fresh))
                    if d == 0:
                        fns[(kind, p, "dense")] = lambda net=net, force=force, x=x: call(net, x, force, "dense")
        with torch.no_grad():
            wall, cpu = measure(fns, args.rounds_bs1 if bs == 1 else args.rounds_bs64)
        t0, c0 = wall[("static",)], cpu[("static",)]
        lines.append(("static", "", bs, 0.0, t0, None, c0, base_flops, None, None))
        for kind in nets:
            for p in pcts:
                for row in rows(kind, bs):
                    ks = [(kind, p, row, d) for d in range(draws)]
                    t = sum(wall[k] for k in ks) / draws
                    c = sum(cpu[k] for k in ks) / draws
                    f = sum(flops[k] for k in ks) / draws
                    fs, ts, cs = 1 - f / base_flops, 1 - t / t0, 1 - c / c0
                    ratio = ts / fs if fs > 0.02 else None
                    cratio = cs / fs if fs > 0.02 else None
                    td = wall[(kind, p, "dense")]
                    lines.append((kind, row, bs, p, t, td, c, f, ratio, cratio))
                    key = f"{kind}_bs{bs}" + {"mechanism": "", "with gates": "_gated", "new masks": "_newmask"}[row]
                    summary[f"{key}_{int(p * 100)}"] = {
                        "sparse_ms": round(1e3 * t, 3), "masked_dense_ms": round(1e3 * td, 3),
                        "static_ms": round(1e3 * t0, 3), "sparse_cpu_ms": round(1e3 * c, 3),
                        "static_cpu_ms": round(1e3 * c0, 3), "mflops": round(f / 1e6, 2),
                        "flop_saving": round(fs, 4), "time_saving": round(ts, 4),
                        "ratio": None if ratio is None else round(ratio, 3),
                        "cpu_ratio": None if cratio is None else round(cratio, 3)}
                    if p == 0.5:
                        summary[key] = None if ratio is None else round(ratio, 3)
                        summary[key + "_cpu"] = None if cratio is None else round(cratio, 3)
    print(f"{args.arch}, CPU, torch threads = {args.threads}; static = static net on the same folded-BN sparse "
          f"kernels; batch 1: mean over {args.draws} random decision patterns per case")
    print("mechanism = forced decisions, gates not executed (FLOPs without gates); with gates = gates executed, "
          "output overridden (gate FLOPs counted)")
    print(f"channel, batch 1: 'new masks' = mechanism with a different random mask on every call (cycling {NEW_MASKS} "
          "patterns): the block kernel gathers the active weights per call, there is no per-mask cache to hit")
    print("ratio = wall-clock saving / FLOP saving; cpu rat = the same with thread CPU time; masked = masked "
          "dense path (computes everything)")
    print(f"{'case':8} {'row':10} {'batch':>5} {'skip':>5} {'sparse ms':>10} {'masked ms':>10} {'cpu ms':>8} "
          f"{'MFLOPs':>8} {'FLOP sav':>8} {'time sav':>8} {'ratio':>6} {'cpu rat':>7}")
    for kind, row, bs, p, t, td, c, f, ratio, cratio in lines:
        t_static = next(ln[4] for ln in lines if ln[0] == "static" and ln[2] == bs)
        print(f"{kind:8} {row:10} {bs:5d} {int(p * 100):4d}% {1e3 * t:10.2f} "
              f"{'' if td is None else f'{1e3 * td:10.2f}':>10} {1e3 * c:8.2f} {f / 1e6:8.1f} "
              f"{1 - f / base_flops:8.1%} {1 - t / t_static:8.1%} {'' if ratio is None else f'{ratio:6.2f}':>6} "
              f"{'' if cratio is None else f'{cratio:7.2f}':>7}")
    print("note: " + BS64_CHANNEL_NOTE)
    print(f"\nwhere batch-1 time goes at 50% skipping (thread CPU time in context, min over {args.rounds_bs1} rounds; "
          "block compute includes the active-weight gather; shares of the whole forward)")
    x1 = torch.randn(1, 3, 32, 32, generator=g)
    for kind, net in nets.items():
        force = forced(net, 1, 0.5, 0.5, g)
        for gates in (True, False):
            with torch.no_grad():
                parts = components(net, x1, force, gates, args.rounds_bs1)
            whole = parts[-1][2]
            print(f"  {kind} gates {'run' if gates else 'not run'}: " + "; ".join(
                f"{lb} {n}x {us / n:.1f} us = {us / 1e3:.2f} ms ({us / whole:.0%})" for lb, n, us in parts[:-1])
                + f"; whole forward {whole / 1e3:.2f} ms")
    summary["threads"] = args.threads
    summary["draws_bs1"] = args.draws
    summary["note_channel_bs64"] = BS64_CHANNEL_NOTE
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

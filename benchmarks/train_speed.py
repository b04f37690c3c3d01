"""Training throughput on CPU: the old path (NCHW, plain SGD) vs the new one (the static recipes' path:
channels-last tensors, `torch.compile` of the forward, Nesterov SGD + label smoothing), with the
channels-last eager path beside them, interleaved in one run so machine load hits all alike.

    python benchmarks/train_speed.py [--threads 2] [--batch 128] [--rounds 7]

Prints images/s per (model, path) as medians over rounds, a table of ratios, and as its last line a
JSON object (resnet38_img_s_old/new, resnet38_speedup, resnet20_img_s_old/new, resnet20_speedup, and
*_img_s_cl for channels-last without compile). Compiling takes a minute or two per model first.
Synthetic inputs: the data pipeline is batched tensor ops and not what is being timed here.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from ddi_hw.models import create_model


def make_step(arch: str, path: str, batch: int):
    """One full training step (forward, loss, backward, SGD update) of a static `arch` on `path`
    (old | cl | new, see the module docstring)."""
    torch.manual_seed(0)
    new = path != "old"
    fmt = torch.channels_last if new else torch.contiguous_format
    model = create_model(arch, num_classes=10, layer_gates=False, channel_gates=False, exits=False)
    model.to(memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=new, weight_decay=5e-4)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))

    net = torch.compile(model) if path == "new" else model  # what `compile: true` in a recipe does

    def step():
        loss = F.cross_entropy(net(x, mode="dense").logits, y, label_smoothing=0.1 if new else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed round")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    archs, paths = ("resnet20", "resnet38"), ("old", "cl", "new")
    steps = {(a, p): make_step(a, p, args.batch) for a in archs for p in paths}
    for fn in steps.values():  # warm-up: allocator, oneDNN primitive caches
        fn()
        fn()
    rates: dict[tuple[str, str], list[float]] = {k: [] for k in steps}
    for _ in range(args.rounds):
        for key, fn in steps.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                fn()
            rates[key].append(args.batch * args.steps / (time.perf_counter() - t))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"training images/s, batch {args.batch}, {args.threads} threads, median of {args.rounds} rounds")
    print("old = NCHW, plain SGD; cl = channels-last, Nesterov, label smoothing; new = cl + torch.compile")
    print(f"{'model':10s} {'old':>8s} {'cl':>8s} {'new':>8s} {'cl/old':>8s} {'new/old':>8s}")
    for a in archs:
        print(f"{a:10s} {med[a, 'old']:8.1f} {med[a, 'cl']:8.1f} {med[a, 'new']:8.1f} "
              f"{med[a, 'cl'] / med[a, 'old']:8.2f} {med[a, 'new'] / med[a, 'old']:8.2f}")
    out = {}
    for a in archs:
        for p in paths:
            out[f"{a}_img_s_{p}"] = round(med[a, p], 1)
        out[f"{a}_speedup"] = round(med[a, "new"] / med[a, "old"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

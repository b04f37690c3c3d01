"""`ddi-hw export`: quantise a trained gated model (torch) into a bundle (`ddi_hw.deploy.bundle`
owns the format, its checks and its writer), and the deploy folder for the board (`--deploy`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from ddi_hw.deploy.bundle import ENGINE_BLOB, load_bundle, write_bundle
from ddi_hw.deploy.fixedpoint import LayerParams
from ddi_hw.deploy.processor import EXIT_ENGINE_CONVS, GATE_OPS
from ddi_hw.deploy.regmap import load_regmap
from ddi_hw.errors import UserError
from ddi_hw.validate import number

# ----------------------------------------------------------------------------- export (torch)

HEADROOM = 2.0  # calibrated |max| x 2: one bit of margin for test images brighter than calibration


class _Formats:
    """Q formats of activation tensors. Tensors that must share a format are merged (a skipped
    block's output is its input or a copy; concatenated features form one tensor) and get the
    smallest fraction count of the group."""

    def __init__(self, maxabs: dict[str, float]):
        self.maxabs = dict(maxabs)
        self.parent = {n: n for n in maxabs}

    def root(self, n: str) -> str:
        while self.parent[n] != n:
            n = self.parent[n]
        return n

    def same(self, a: str, b: str) -> None:
        self.parent[self.root(a)] = self.root(b)

    def fracs(self) -> dict[str, int]:
        from ddi_hw.deploy.fixedpoint import frac_bits
        group: dict[str, float] = {}
        for n, m in self.maxabs.items():
            r = self.root(n)
            group[r] = max(group.get(r, 0.0), m)
        return {n: frac_bits(group[self.root(n)] * HEADROOM, limit=15) for n in self.maxabs}


def _calibrate(model, images, taps: dict[str, tuple]) -> dict[str, float]:
    """Max |activation| at every tap (name -> (module, relu_after)) over the calibration images."""
    import torch
    stats: dict[str, float] = {}

    def hook(name, relu):
        def fn(_m, _inp, out):
            v = out.clamp(min=0) if relu else out
            stats[name] = max(stats.get(name, 0.0), float(v.abs().max()))
        return fn

    hooks = [mod.register_forward_hook(hook(n, relu)) for n, (mod, relu) in taps.items()]
    try:
        with torch.no_grad():
            for start in range(0, len(images), 64):
                model(images[start:start + 64], mode="dense")
    finally:
        for h in hooks:
            h.remove()
    stats["x"] = float(images.abs().max())
    return stats


def _quantize_conv(name, w, b, *, stride, relu, f_in, f_out, residual=False, f_res=None, pre=None, f_act=None):
    """Quantise one BN-folded conv. f_w: weights fit int16, the bias fits int32 in Q(f_act + f_w).
    `pre` = (scale, shift) float per input channel of a folded pre-activation BN (+ReLU) whose
    output has Q f_act; its scale gets f_s fraction bits, its shift Q(f_in + f_s)."""
    from ddi_hw.deploy.fixedpoint import INT32_MAX, frac_bits, quantize
    w = w.detach().double().numpy()
    b = np.zeros(w.shape[0]) if b is None else b.detach().double().numpy()
    arrays, pre_shift = {}, 0
    if pre is None:
        f_act = f_in
    else:
        s, t = (v.detach().double().numpy() for v in pre)
        f_s = frac_bits(float(np.abs(s).max()), limit=20)
        tmax = float(np.abs(t).max())
        if tmax > 0:
            f_s = min(f_s, int(np.floor(np.log2(INT32_MAX / tmax))) - f_in)
        pre_shift = f_in + f_s - f_act
        arrays["pre"] = np.stack([quantize(s, f_s, -(2 ** 31), INT32_MAX, np.int32),
                                  quantize(t, f_in + f_s, -(2 ** 31), INT32_MAX, np.int32)], axis=1)
    f_w = frac_bits(float(np.abs(w).max()), limit=20)
    bmax = float(np.abs(b).max())
    if bmax > 0:
        f_w = min(f_w, int(np.floor(np.log2(INT32_MAX / bmax))) - f_act)
    params = dict(kernel=w.shape[2], stride=stride, relu=relu, residual=residual,
                  acc_shift=f_act + f_w - f_out, res_shift=(f_act + f_w - f_res) if residual else 0,
                  pre_affine=pre is not None, pre_shift=pre_shift)
    try:
        LayerParams(**params)
    except ValueError as err:
        raise UserError(f"layer {name}: no fixed-point format fits its range ({err}); "
                        "check the checkpoint for exploding weights or activations") from None
    arrays["weights"] = quantize(w, f_w)
    arrays["bias"] = quantize(b, f_act + f_w, -(2 ** 31), INT32_MAX, np.int32)
    entry = {"name": name, "in_ch": w.shape[1], "out_ch": w.shape[0], "params": params, "f_in": f_in,
             "f_act": f_act, "f_w": f_w, "f_out": f_out, "f_res": f_res if residual else None}
    return entry, arrays


class _Builder:
    """Collects engine layers, processor tensors and the program while a model is walked."""

    def __init__(self, frac: dict[str, int], size: int, flags: dict[str, dict] | None = None):
        self.frac, self.layers, self.arrays, self.program = frac, [], [], [{"op": "input", "out": "x"}]
        self.flags = flags or {}  # engine flags per conv from the dataflow (energy_models.dataflow)
        self.shapes: dict[str, list[int]] = {"x": [3, size, size]}
        self.proc: dict[str, np.ndarray] = {}

    def conv(self, name, conv, t_in, t_out, *, bn=None, relu, residual=None, pre=None, t_act=None,
             launch=True, **step) -> int:
        """Add one engine launch (BN `bn` folded after the conv); returns its dense loop count."""
        from ddi_hw.deploy.csim import expected_iterations
        from ddi_hw.models.sparse_ops import fold_bn
        w, b = fold_bn(conv.weight, bn) if bn is not None else (conv.weight, conv.bias)
        k, stride = conv.kernel_size[0], conv.stride[0]
        if conv.kernel_size not in ((1, 1), (3, 3)) or stride not in (1, 2) or conv.padding[0] != k // 2 \
                or conv.groups != 1:
            raise UserError(f"layer {name}: the engine runs 1x1/3x3 'same' convs with stride 1/2 only")
        entry, arr = _quantize_conv(name, w, b, stride=stride, relu=relu, f_in=self.frac[t_in],
                                    f_out=self.frac[t_out], residual=residual is not None,
                                    f_res=self.frac.get(residual), pre=pre,
                                    f_act=self.frac[t_act] if t_act else None)
        entry["params"].update(self.flags.get(name, {}))  # FLAG_POOL / NO_STORE / NO_ZERO
        h = self.shapes[t_in][1]
        oh = (h + 2 * (k // 2) - k) // stride + 1
        self.shapes[t_out] = [conv.out_channels, oh, oh]
        self.layers.append(entry)
        self.arrays.append(arr)
        if launch:  # else a launch another step makes (the CNN channel gate's conv)
            self.program.append({"op": "conv", "layer": len(self.layers) - 1, "in": t_in, "out": t_out,
                                 "residual": residual, **step})
        return expected_iterations(conv.in_channels, conv.out_channels, oh, oh, k)

    def add_proc(self, prefix: str, module, keys=None) -> None:
        """The module's tensors under `prefix` (only `keys` if given: what the processor reads)."""
        for k, v in module.state_dict().items():
            if keys is None or f"{prefix}.{k}" in keys:
                self.proc[f"{prefix}.{k}"] = v.detach().float().numpy()

    def exit(self, model, i: int, t_in: str) -> None:
        """Exit branch i on tensor `t_in` as the dataflow places it: its max pool on the processor in
        one pass (window = stride = 2^pools, ceil mode), in integers in `t_in`'s Q format (tensor
        `e{i}.in`); conv1 and conv2 (BN folded, ReLU) as engine launches named like their table rows
        (flags by name: conv2 writes only its pooled sums), outputs `e{i}.0`, `e{i}.1`; the
        classifier `fc` on the processor."""
        e = model.exits[i]
        c, h, w = self.shapes[t_in]
        k = e.window
        pooled = f"e{i}.in"
        self.frac[pooled], self.shapes[pooled] = self.frac[t_in], [c, -(-h // k), -(-w // k)]
        step = {"op": "exit", "index": i, "in": t_in, "pooled": pooled, "prefix": f"exits.{i}", "pool": k}
        for n, conv in enumerate(EXIT_ENGINE_CONVS):
            self.conv(f"exits.{i}.{conv}", getattr(e, conv), pooled if n == 0 else f"e{i}.{n - 1}", f"e{i}.{n}",
                      bn=getattr(e, _EXIT_BN[conv]), relu=True, launch=False)
            if n == 0:
                step["layer"] = len(self.layers) - 1
        self.add_proc(f"exits.{i}.fc", e.fc)
        self.program.append(step)

    def shared_gates(self, model) -> None:
        """The recurrent parts shared by all gates of a kind, once each under the kind's name."""
        from ddi_hw.models.gates import GATE_KINDS

        for kind in GATE_KINDS.values():
            if kind.shared and getattr(model, kind.shared, None) is not None:
                self.add_proc(kind.shared, getattr(model, kind.shared))

    def gate_steps(self, model, prefix: str, block) -> tuple[dict | None, dict | None]:
        """The block's layer / channel gate entries of its program step (kind = the processor's
        numpy forward, `ddi_hw.deploy.processor.GATE_OPS`), their tensors added to the processor blob."""
        from ddi_hw.models.gates import LAYER_GATE

        lg = cg = None
        if block.lgate is not None:
            lg = {"prefix": f"{prefix}.lgate", "kind": LAYER_GATE.deploy}
            self.add_proc(lg["prefix"], block.lgate)
        if block.cgate is not None:
            name = f"{prefix}.cgate"
            cg = {"name": name, "prefix": name, "kind": model.channel_gate.deploy}
            self.add_proc(name, block.cgate, GATE_OPS[cg["kind"]].keys(name))
        return lg, cg

    def gate_convs(self, cg: dict | None, gate, t_in: str, tag: str) -> None:
        """A channel gate's convs that run on the engine (`GateOp.engine_convs`, the dataflow's
        `gate_conv` rows: the flags come by name): one launch each from `t_in`, ReLU, calibrated Q
        formats `{tag}.0`, `{tag}.1`, ... for their outputs; the gate entry's `layer` is the first."""
        convs = GATE_OPS[cg["kind"]].engine_convs if cg else ()
        for i, conv in enumerate(convs):
            src = t_in if i == 0 else f"{tag}.{i - 1}"
            self.conv(f"{cg['prefix']}.{conv}", getattr(gate, conv), src, f"{tag}.{i}", relu=True, launch=False)
            if i == 0:
                cg["layer"] = len(self.layers) - 1


def _gate_taps(model, gate, tag: str) -> dict[str, tuple]:
    """Calibration taps of a channel gate's engine convs (their ReLU outputs: `tag`.0, .1, ...)."""
    if gate is None:
        return {}
    convs = GATE_OPS[model.channel_gate.deploy].engine_convs
    return {f"{tag}.{i}": (getattr(gate, c), True) for i, c in enumerate(convs)}


_EXIT_BN = {"conv1": "bn1", "conv2": "bn2"}  # ExitBranch: the BN folded into each engine conv


def _exit_taps(model) -> dict[str, tuple]:
    """Calibration taps of the exit branches' engine convs (their ReLU outputs: `e{i}.0`, `e{i}.1`)."""
    return {f"e{i}.{n}": (getattr(e, _EXIT_BN[conv]), True)
            for i, e in enumerate(getattr(model, "exits", [])) for n, conv in enumerate(EXIT_ENGINE_CONVS)}


def _launch_flags(model) -> dict[str, dict]:
    """Engine flags per conv from the dataflow the cost table also costs (one description)."""
    from energy_models.dataflow import launch_flags
    return launch_flags(model.specs())


def _export_resnet(model, calib):
    """CIFAR ResNet: stem conv; per block [projection], conv1 (channel-gated outputs), conv2
    (gated inputs, residual add, ReLU); exit branches (`_Builder.exit`); processor: gates' vector
    layers, exits' max pool and fc, the classifier on the pooled last tensor."""
    taps = {"stem": (model.stem, False)}
    for j, b in enumerate(model.blocks):
        taps[f"b{j}.mid"], taps[f"b{j}.out"] = (b.bn1, True), (b, False)
        if not b.skippable:
            taps[f"b{j}.sc"] = (b.sc_bn, False)
        taps |= _gate_taps(model, b.cgate, f"b{j}.cg")
    taps |= _exit_taps(model)
    fm = _Formats(_calibrate(model, calib, taps))
    prev = "stem"
    for j, b in enumerate(model.blocks):
        if b.skippable:
            fm.same(f"b{j}.out", prev)
        prev = f"b{j}.out"
    bd = _Builder(fm.fracs(), model.input_size, _launch_flags(model))
    bd.shared_gates(model)
    it = bd.conv("stem.conv", model.stem.conv, "x", "stem", bn=model.stem.bn, relu=True)
    bd.program[-1]["dense_iterations"] = it
    h, exit_at = "stem", {p: i for i, p in enumerate(model.exit_positions)}
    for j, b in enumerate(model.blocks):
        lg, cg = bd.gate_steps(model, f"blocks.{j}", b)
        gate = cg["name"] if cg else None
        blk = {"op": "block", "index": j, "in": h, "out": f"b{j}.out", "layer_gate": lg, "channel_gate": cg}
        bd.gate_convs(cg, b.cgate, h, f"b{j}.cg")  # engine launches (dataflow: gate_conv)
        bd.program.append(blk)
        dense, res = 0, h
        if not b.skippable:
            dense += bd.conv(f"blocks.{j}.sc_conv", b.sc_conv, h, f"b{j}.sc", bn=b.sc_bn, relu=False)
            res = f"b{j}.sc"
        dense += bd.conv(f"blocks.{j}.conv1", b.conv1, h, f"b{j}.mid", bn=b.bn1, relu=True, out_gate=gate)
        dense += bd.conv(f"blocks.{j}.conv2", b.conv2, f"b{j}.mid", f"b{j}.out", bn=b.bn2, relu=True,
                         residual=res, in_gate=gate)
        blk["dense_iterations"], blk["end"] = dense, len(bd.program)
        h = f"b{j}.out"
        if j in exit_at:
            bd.exit(model, exit_at[j], h)
    bd.add_proc("fc", model.fc)
    bd.program.append({"op": "head", "in": h, "prefix": "fc"})
    return bd


def _bn_affine(bn):
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    return scale.detach(), (bn.bias - bn.running_mean * scale).detach()


def _export_densenet(model, calib):
    """CIFAR DenseNet-BC: per dense layer the light channel gate's 1x1/2 and 3x3 convs (engine
    launches, the second writing only pooled sums), conv1 (BN1+ReLU as the engine's input affine,
    BN2 folded, gated outputs) and conv2 (gated inputs); concatenation (a channel-offset layout,
    nothing copied) and the transitions' 2x2 average pool on the processor in integer arithmetic;
    one Q format per dense block's features."""
    if model.stem.imagenet:
        raise UserError("export supports CIFAR DenseNets; the ImageNet stem (7x7, max pool) and 56-pixel "
                        "feature maps exceed the engine")
    taps = {"stem": (model.stem, False)}
    for j, layer in enumerate(model.layers):
        taps[f"d{j}.act"], taps[f"d{j}.mid"], taps[f"d{j}.y"] = (layer.bn1, True), (layer.bn2, True), (layer, False)
        taps |= _gate_taps(model, layer.cgate, f"d{j}.cg")
    for t, tr in enumerate(model.transitions):
        taps[f"t{t}.act"], taps[f"t{t}.conv"] = (tr.bn, True), (tr.conv, False)
    taps |= _exit_taps(model)
    stats = _calibrate(model, calib, taps)
    j = 0
    for b, blk in enumerate(model.dense_blocks):  # concatenations share the block's format
        for _ in blk:
            stats[f"d{j}.in"] = 0.0
            j += 1
        stats[f"blk{b}.out"] = 0.0
    fm = _Formats(stats)
    j = 0
    for b, blk in enumerate(model.dense_blocks):
        first = "stem" if b == 0 else f"t{b - 1}.conv"
        for _ in blk:
            fm.same(f"d{j}.y", first)
            fm.same(f"d{j}.in", first)
            j += 1
        fm.same(f"blk{b}.out", first)
    bd = _Builder(fm.fracs(), model.input_size, _launch_flags(model))
    bd.shared_gates(model)
    it = bd.conv("stem.conv", model.stem.conv, "x", "stem", relu=False)
    bd.program[-1]["dense_iterations"] = it
    exit_at = {p: i for i, p in enumerate(model.exit_positions)}
    h, j = "stem", 0
    for b, blk in enumerate(model.dense_blocks):
        feats, prev_y = [h], None
        for layer in blk:
            name = model._names[j]
            t_in = feats[0] if len(feats) == 1 else f"d{j}.in"
            if len(feats) > 1:
                bd.program.append({"op": "concat", "in": list(feats), "out": t_in})
                bd.shapes[t_in] = [sum(bd.shapes[f][0] for f in feats)] + bd.shapes[feats[0]][1:]
            lg, cg = bd.gate_steps(model, name, layer)
            gate = cg["name"] if cg else None
            step = {"op": "block", "index": j, "in": t_in, "out": f"d{j}.y", "skip_from": prev_y,
                    "layer_gate": lg, "channel_gate": cg}
            bd.gate_convs(cg, layer.cgate, t_in, f"d{j}.cg")  # the light gate's two convs: engine launches
            bd.program.append(step)
            dense = bd.conv(f"{name}.conv1", layer.conv1, t_in, f"d{j}.mid", bn=layer.bn2, relu=True,
                            pre=_bn_affine(layer.bn1), t_act=f"d{j}.act", out_gate=gate)
            dense += bd.conv(f"{name}.conv2", layer.conv2, f"d{j}.mid", f"d{j}.y", relu=False, in_gate=gate)
            step["dense_iterations"], step["end"] = dense, len(bd.program)
            feats.append(f"d{j}.y")
            prev_y = f"d{j}.y"
            if j in exit_at:
                cat = f"d{j}.cat"
                bd.frac[cat] = bd.frac[feats[0]]
                bd.shapes[cat] = [sum(bd.shapes[f][0] for f in feats)] + bd.shapes[feats[0]][1:]
                bd.program.append({"op": "concat", "in": list(feats), "out": cat})
                bd.exit(model, exit_at[j], cat)
            j += 1
        out = f"blk{b}.out"
        bd.program.append({"op": "concat", "in": list(feats), "out": out})
        bd.shapes[out] = [sum(bd.shapes[f][0] for f in feats)] + bd.shapes[feats[0]][1:]
        h = out
        if b < len(model.transitions):
            tr = model.transitions[b]
            it = bd.conv(f"transitions.{b}.conv", tr.conv, h, f"t{b}.conv", relu=False,
                         pre=_bn_affine(tr.bn), t_act=f"t{b}.act")
            bd.program[-1]["dense_iterations"] = it
            pooled = f"t{b}.pool"
            bd.frac[pooled] = bd.frac[f"t{b}.conv"]
            c, hh, _ = bd.shapes[f"t{b}.conv"]
            bd.shapes[pooled] = [c, hh // 2, hh // 2]
            bd.program.append({"op": "avgpool2", "in": f"t{b}.conv", "out": pooled})
            h = pooled
    scale, shift = _bn_affine(model.norm)
    bd.proc["norm.scale"], bd.proc["norm.shift"] = scale.float().numpy(), shift.float().numpy()
    bd.add_proc("fc", model.fc)
    bd.program.append({"op": "head", "in": h, "prefix": "fc", "norm": "norm"})
    return bd


_EXPORTERS = {"resnet": _export_resnet, "densenet": _export_densenet}  # model family -> walker


def _budget_plan(model, metric: str = "flops") -> dict:
    """The model's cost plan (ddi_hw.models.base.CostPlan, one source for every cost) as plain
    numbers, so the processor computes the same per-image cost and takes the same budgeted exits."""
    plan = model.plan
    events, fixed_i = [], 0
    block_i = 0
    for kind, _ in model.events:
        if kind == "fixed":
            events.append({"kind": "fixed", "cost": float(plan.fixed[metric][fixed_i])})
            fixed_i += 1
        elif kind == "block":
            K = int(plan.K[block_i])
            events.append({"kind": "block", "index": block_i, "g": float(plan.g[metric][block_i]),
                           "f": float(plan.f[metric][block_i]), "c": float(plan.c[metric][block_i]),
                           "s": float(plan.s[metric][block_i]),  # paid only when skipped (a DenseNet copy)
                           "V": [float(v) for v in plan.V[metric][block_i, :K + 1]]})
            block_i += 1
        else:
            i = sum(1 for e in events if e["kind"] == "exit")
            events.append({"kind": "exit", "index": i, "cost": float(plan.exit[metric][i])})
    return {"metric": metric, "events": events, "min_event": [float(v) for v in plan.min_event[metric]]}


def export_model(model, out_dir: str | Path, calib_images, source: str = "", dataset: str | None = None) -> Path:
    """Quantise a gated CIFAR ResNet or DenseNet (`ddi_hw.models`) into a bundle directory.

    BN is folded into every engine conv (pre-activation BN becomes the engine's input affine);
    conv weights (backbone, the gates' and exit branches' engine convs) go to engine.bin in the
    engine's layout; the gates' vector layers, the exits' and the final classifier (float32) go to
    processor.safetensors."""
    model.eval()
    mc = load_regmap().constants
    if getattr(model, "input_size", 10 ** 6) > mc["MAX_W"]:
        raise UserError(f"input width {getattr(model, 'input_size', '?')} exceeds the engine's MAX_W={mc['MAX_W']}")
    exporter = _EXPORTERS.get(getattr(model, "family", None))
    if exporter is None:
        raise UserError(f"export supports the ResNets and DenseNets of ddi_hw.models, not {type(model).__name__}")
    bd = exporter(model, calib_images)

    return write_bundle(out_dir, bd.layers, bd.arrays, bd.proc, {
        "source": source, "dataset": dataset,
        "model": {"class": type(model).__name__, "num_classes": int(model.fc.out_features),
                  "input_size": model.input_size},
        "number_format": "int16 activations/weights, Q(f) = int / 2**f per tensor, int32 bias in "
                         "Q(f_act + f_w), 48-bit accumulators, round half up, saturate",
        "tensors": {n: {"frac": bd.frac[n], "shape": bd.shapes.get(n)} for n in sorted(bd.frac)},
        "program": bd.program, "cost_plan": _budget_plan(model)})


# ----------------------------------------------------------------------------- command


def export_command(
    checkpoint: str = typer.Argument(..., help="run directory with model.safetensors + model.json"),
    out: Optional[str] = typer.Option(None, "--out", help="bundle directory to write"),
    deploy: Optional[str] = typer.Option(None, "--deploy", help="write a self-contained board folder instead: bundle, "
                                         "test images/labels .npy, validate.py, README (overlay dropped in by name)"),
    dataset: Optional[str] = typer.Option(None, help="data set (default: the run's config)"),
    data_dir: Optional[str] = typer.Option(None, help="data directory (CIFAR-10 python batches)"),
    calib: int = typer.Option(256, callback=number(1, integer=True),
                              help="training images used to choose the Q formats"),
    eval_limit: int = typer.Option(500, callback=number(1, integer=True),
                                   help="test images for the quantised-vs-float accuracy report"),
) -> None:
    """Quantise a trained gated model into a fixed-point bundle and report the accuracy drop."""
    import torch

    from ddi_hw.data import test_images
    from ddi_hw.deploy.backends import ReferenceBackend, rows_csv, run_images, summarize
    from ddi_hw.runs import load_run
    from ddi_hw.validate import output_dir
    from energy_models.atomic import atomic_write_text

    if (out is None) == (deploy is None):
        raise UserError("pass exactly one of --out BUNDLE_DIR or --deploy FOLDER")
    out = out or deploy
    output_dir(out, "--deploy" if deploy else "--out")
    run = load_run(checkpoint)
    model, side = run.model, run.side
    name = dataset or side.get("config", {}).get("dataset")
    if not name:
        raise UserError("cannot tell the data set of this run: pass --dataset cifar10|smoke")
    xc, _ = test_images(name, data_dir, calib, split="train")
    path = export_model(model, out, torch.from_numpy(xc), source=str(checkpoint), dataset=name)
    bundle = load_bundle(path)
    x, y = test_images(name, data_dir, eval_limit)
    with torch.no_grad():
        fp = torch.cat([model(torch.from_numpy(x[i:i + 100]), mode="sparse").logits.argmax(1)
                        for i in range(0, len(x), 100)]).numpy()
    rows = run_images(bundle, x, y, ReferenceBackend(), float_predictions=fp)
    summary = summarize(rows)
    atomic_write_text(Path(out) / "quantization_report.csv", rows_csv(rows))
    atomic_write_text(Path(out) / "quantization_summary.json", json.dumps(summary, indent=1) + "\n")
    print(f"bundle: {path} ({len(bundle.layers)} engine layers, {len(bundle.engine_blob)} bytes in {ENGINE_BLOB})")
    print(f"float accuracy {summary['float_accuracy']:.4f}, fixed-point (reference) {summary['accuracy']:.4f}, "
          f"drop {summary['accuracy_drop']:+.4f}, prediction agreement {summary['agreement_with_float']:.4f} "
          f"on {summary['images']} {name} test images")
    if deploy:
        write_deploy_extras(Path(deploy), x, y, name)


DEPLOY_README = """# ddi-hw deploy folder

Exported by `ddi-hw export RUN --deploy`: everything the ZedBoard runs.

| file | what |
|---|---|
| `manifest.json`, `engine.bin`, `processor.safetensors` | the bundle (checked on load: digests, ranges, program) |
| `test_images.npy`, `test_labels.npy` | {n} normalised {dataset} test images (N, 3, H, W) float32 and labels |
| `validate.py` | runs them, prints accuracy and per-image cost |
| `ddi_engine.bit`, `ddi_engine.hwh` | the Vivado build's overlay (`fpga/README.md`), copied in by these names |

On the board (PYNQ 3.0/3.1 image, Python 3.10; full steps in fpga/README.md of the repository):

    sudo -i                                  # pynq needs root (/dev/mem)
    source /etc/profile.d/pynq_venv.sh       # the image's Python 3.10 venv (pynq inside)
    pip install ./ddi-hw          # a copy of the repository: the light core only (numpy, PyYAML,
                                  # safetensors, typer), no torch, no C compiler needed
    python validate.py            # --backend board (default) needs the .bit/.hwh here
    python validate.py --backend reference   # the same images on the numpy reference, no overlay
    ddi-hw run . --backend board --limit 100 # the CLI equivalent (per-image CSV: run_board.csv)
"""

VALIDATE_PY = """#!/usr/bin/env python3
\"\"\"Run this folder's test images on the board (or --backend reference|csim); print accuracy and cost.\"\"\"
import sys
from pathlib import Path

from ddi_hw.deploy.runner import validate_main

sys.exit(validate_main(Path(__file__).resolve().parent, sys.argv[1:]))
"""


def write_deploy_extras(folder: Path, x: np.ndarray, y: np.ndarray, dataset: str) -> None:
    """Next to the bundle: the test images/labels, validate.py, a README, and the overlay if the
    checkout has a built one (fpga/overlay/); a one-line note when it does not."""
    import io
    import shutil

    from ddi_hw.deploy.board import DEFAULT_BITFILE
    from ddi_hw.deploy.runner import BITFILE, HWHFILE, IMAGES_NPY, LABELS_NPY
    from energy_models.atomic import atomic_write_bytes, atomic_write_text

    for fname, arr in ((IMAGES_NPY, x.astype(np.float32)), (LABELS_NPY, y.astype(np.int64))):
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        atomic_write_bytes(folder / fname, buf.getvalue())
    atomic_write_text(folder / "validate.py", VALIDATE_PY)
    atomic_write_text(folder / "README.md", DEPLOY_README.format(n=len(x), dataset=dataset))
    src = DEFAULT_BITFILE.parent
    for fname in (BITFILE, HWHFILE):
        if (src / fname).is_file() and not (folder / fname).is_file():
            shutil.copyfile(src / fname, folder / fname)
    missing = [f for f in (BITFILE, HWHFILE) if not (folder / f).is_file()]
    print(f"deploy folder: {folder} ({len(x)} test images, validate.py, README.md)")
    if missing:
        print(f"no overlay yet: copy {' and '.join(missing)} from the Vivado build (fpga/README.md) into {folder}")

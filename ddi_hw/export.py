"""Fixed-point bundles: written by `ddi-hw export`, validated on load, run by every backend.

A bundle directory holds
- `engine.bin`: everything the FPGA engine reads from DDR, per conv layer int16 weights (OIHW),
  int32 bias and the optional int32 input affine, each 64-byte aligned (AXI burst friendly). The
  board copies this one file to DDR once and points the engine at offsets inside it.
- `processor.safetensors`: float32 parameters of what runs on the ARM processor (layer and
  channel gates, exit branches, the final pooling + classifier).
- `manifest.json`: layer list (shapes, Q formats, shifts, offsets), tensor formats, the program
  (the order of engine launches and processor steps per image), the register-map version and the
  sha256 and size of every blob.

`load_bundle` checks all of it (files present, hashes, offsets inside the blob, shapes consistent
with the layer, shifts consistent with the Q formats, register-map version) and raises UserError
before anything is sent to hardware. This module imports torch only inside the export functions,
so loading works on the board's PYNQ image.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from ddi_hw.errors import UserError
from ddi_hw.fixedpoint import LayerParams
from ddi_hw.regmap import load_regmap
from ddi_hw.validate import fields, number, read_json

FORMAT = "ddi-hw-bundle/1"
MANIFEST, ENGINE_BLOB, PROC_BLOB = "manifest.json", "engine.bin", "processor.safetensors"
ALIGN = 64
_DTYPES = {"int16": np.dtype("<i2"), "int32": np.dtype("<i4")}


@dataclass
class BundleLayer:
    """One engine launch's constant data. `offsets` are byte offsets into engine.bin (the board
    adds the DDR address of its copy of the blob); the arrays are views of the loaded blob."""
    name: str
    index: int
    params: LayerParams
    in_ch: int
    out_ch: int
    f_in: int
    f_w: int
    f_out: int
    f_res: int | None
    weights: np.ndarray  # (out_ch, in_ch, k, k) int16
    bias: np.ndarray  # (out_ch,) int32
    pre: np.ndarray | None  # (in_ch, 2) int32
    offsets: dict[str, int] = field(default_factory=dict)  # "weights" | "bias" | "pre" -> byte offset


@dataclass
class Bundle:
    path: Path
    manifest: dict
    layers: list[BundleLayer]
    engine_blob: bytes
    processor: dict[str, np.ndarray]  # float32 arrays by name

    @property
    def program(self) -> list[dict]:
        return self.manifest["program"]

    def tensor_frac(self, name: str) -> int:
        return int(self.manifest["tensors"][name]["frac"])


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _bad(path: Path, msg: str) -> UserError:
    return UserError(f"bundle {path}: {msg}; re-export it with `ddi-hw export`")


def _array(path: Path, blob: bytes, ref: dict, shape: tuple, what: str) -> np.ndarray:
    if ref is None:
        raise _bad(path, f"{what} is missing")
    if not isinstance(ref, dict) or not isinstance(ref.get("shape", []), list):
        raise _bad(path, f"{what} must be a mapping with offset, shape and dtype")
    dtype = _DTYPES.get(ref.get("dtype"))
    if dtype is None:
        raise _bad(path, f"{what} has dtype {ref.get('dtype')!r}, expected int16 or int32")
    if tuple(ref.get("shape", ())) != tuple(shape):
        raise _bad(path, f"{what} has shape {ref.get('shape')}, expected {list(shape)}")
    off = ref.get("offset")
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if not isinstance(off, int) or off < 0 or off % ALIGN or off + nbytes > len(blob):
        raise _bad(path, f"{what} at offset {off} (+{nbytes} bytes) lies outside the {len(blob)}-byte "
                   f"{ENGINE_BLOB} or is not {ALIGN}-byte aligned")
    return np.frombuffer(blob, dtype=dtype, count=int(np.prod(shape)), offset=off).reshape(shape)


def _layer(path: Path, blob: bytes, i: int, e: dict) -> BundleLayer:
    what = f"layer {i} ({e.get('name', '?')})"
    try:
        p = LayerParams(**e["params"])
        in_ch, out_ch = int(e["in_ch"]), int(e["out_ch"])
        f_in, f_w, f_out = int(e["f_in"]), int(e["f_w"]), int(e["f_out"])
        f_act = int(e.get("f_act", f_in))
        f_res = None if e.get("f_res") is None else int(e["f_res"])
    except (KeyError, TypeError, ValueError) as err:
        raise _bad(path, f"{what} has bad parameters ({err})") from None
    mc = load_regmap().constants
    if max(in_ch, out_ch) > mc["MAX_CH"] or in_ch < 1 or out_ch < 1:
        raise _bad(path, f"{what}: {in_ch}->{out_ch} channels outside 1..{mc['MAX_CH']}")
    if p.acc_shift != f_act + f_w - f_out or (p.residual and p.res_shift != f_act + f_w - f_res) \
            or (not p.pre_affine and f_act != f_in):
        raise _bad(path, f"{what}: shifts do not match its Q formats")
    k = p.kernel
    layer = BundleLayer(
        name=e["name"], index=i, params=p, in_ch=in_ch, out_ch=out_ch, f_in=f_in, f_w=f_w, f_out=f_out,
        f_res=f_res, weights=_array(path, blob, e.get("weights"), (out_ch, in_ch, k, k), f"{what} weights"),
        bias=_array(path, blob, e.get("bias"), (out_ch,), f"{what} bias"),
        pre=_array(path, blob, e.get("pre"), (in_ch, 2), f"{what} pre") if p.pre_affine else None)
    layer.offsets = {key: e[key]["offset"] for key in ("weights", "bias", "pre") if e.get(key)}
    return layer


def load_bundle(path: str | Path) -> Bundle:
    """Read and validate a bundle (see module docstring); every problem is a one-line UserError."""
    from safetensors import SafetensorError
    from safetensors.numpy import load as st_load

    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise UserError(f"{mpath} not found: pass a directory written by `ddi-hw export`")
    man = read_json(mpath, "bundle manifest", "re-export it with `ddi-hw export`")
    if not isinstance(man, dict):
        raise _bad(path, f"{MANIFEST} is not a mapping")
    if man.get("format") != FORMAT:
        raise _bad(path, f"format {man.get('format')!r}, expected {FORMAT!r}")
    rm_version = load_regmap().version
    if man.get("regmap_version") != rm_version:
        raise _bad(path, f"register-map version {man.get('regmap_version')} but this engine is version {rm_version}")
    fields(man, MANIFEST_SCHEMA, str(mpath), "re-export the bundle with `ddi-hw export`")
    _check_cost_plan(path, man.get("cost_plan"))
    blobs = {}
    for name in (ENGINE_BLOB, PROC_BLOB):
        info = man["blobs"].get(name)
        if info is not None and not (isinstance(info, dict) and isinstance(info.get("size"), int)
                                     and isinstance(info.get("sha256"), str)):
            raise _bad(path, f"manifest entry of {name} must hold an integer size and a sha256")
        f = path / name
        if info is None:
            raise _bad(path, f"manifest lists no {name}")
        if not f.is_file():
            raise _bad(path, f"{name} is missing")
        if f.stat().st_size != info.get("size"):
            raise _bad(path, f"{name} has {f.stat().st_size} bytes, manifest says {info.get('size')} (truncated?)")
        if sha256_file(f) != info.get("sha256"):
            raise _bad(path, f"{name} sha256 mismatch (file changed or corrupted)")
        blobs[name] = f.read_bytes()
    try:
        proc = st_load(blobs[PROC_BLOB])
    except (SafetensorError, ValueError) as err:
        raise _bad(path, f"{PROC_BLOB} unreadable ({err})") from None
    layers = [_layer(path, blobs[ENGINE_BLOB], i, e) for i, e in enumerate(man.get("layers", []))]
    for key, shape in man.get("processor_shapes", {}).items():
        if key not in proc or list(proc[key].shape) != list(shape):
            raise _bad(path, f"processor tensor {key!r} missing or not of shape {shape}")
    bundle = Bundle(path, man, layers, blobs[ENGINE_BLOB], proc)
    _check_program(bundle)
    return bundle


def _all(kind, what):
    return (kind, what, lambda v: all(isinstance(x, dict) for x in (v.values() if isinstance(v, dict) else v)))


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    import math

    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


MANIFEST_SCHEMA = {
    "blobs": dict, "layers": _all(list, "a list of layer mappings"),
    "program": _all(list, "a list of step mappings"),
    "tensors": (dict, "a mapping of tensor names to {frac: integer, shape}",
                lambda v: all(isinstance(t, dict) and _int(t.get("frac")) and 0 <= t["frac"] <= 31
                              for t in v.values())),
    "?processor_shapes": (dict, "a mapping of names to lists of integers",
                          lambda v: all(isinstance(s, list) and all(_int(n) and n >= 0 for n in s)
                                        for s in v.values())),
    "?cost_plan": (dict, type(None)), "?dataset": (str, type(None)),
    "?model": dict, "?model.input_size": (int, "a positive integer", lambda v: v > 0),
}


def _check_cost_plan(path: Path, plan) -> None:
    """The budgeted-exit plan read by backends._Budget: events and their cheapest continuations."""
    if plan is None:
        return
    ev, low = plan.get("events"), plan.get("min_event")
    ok = isinstance(ev, list) and isinstance(low, list) and len(low) == len(ev) and all(_num(x) for x in low)
    exits = 0
    for e in ev if ok else []:
        kind = e.get("kind") if isinstance(e, dict) else None
        if kind in ("fixed", "exit"):
            ok &= _num(e.get("cost"))
            if kind == "exit":
                ok &= e.get("index") == exits
                exits += 1
        elif kind == "block":
            ok &= _int(e.get("index")) and all(_num(e.get(k)) for k in "gfc") and isinstance(e.get("V"), list) \
                and len(e["V"]) > 0 and all(_num(x) for x in e["V"])
        else:
            ok = False
    if not ok:
        raise _bad(path, "cost_plan is malformed (events of kind fixed/block/exit with numeric costs, "
                   "exits numbered 0, 1, ..., one min_event per event)")


def _check_program(b: Bundle) -> None:
    """Every step names known layers, tensors and processor parameters."""
    from ddi_hw.backends import PROGRAM_OPS, step_processor_keys  # the interpreter defines the steps
    from ddi_hw.processor import GATE_OPS

    tensors = b.manifest.get("tensors", {})
    exits = 0
    for i, step in enumerate(b.program):
        op = step.get("op")
        if op not in PROGRAM_OPS:
            raise _bad(b.path, f"program step {i} has unknown op {op!r}")
        for gate in (step.get("layer_gate"), step.get("channel_gate")) if op == "block" else ():
            if gate and gate.get("kind") not in GATE_OPS:
                raise _bad(b.path, f"program step {i} uses gate kind {gate.get('kind')!r}, unknown to this version "
                           f"(known: {', '.join(GATE_OPS)})")
        if op == "block" and not (isinstance(step.get("end"), int) and i < step["end"] <= len(b.program)):
            raise _bad(b.path, f"program step {i} jumps to {step.get('end')!r} (must lie after it)")
        if op == "exit" and not (isinstance(step.get("pools"), int) and 0 <= step["pools"] <= 8):
            raise _bad(b.path, f"program step {i} has a bad pool count {step.get('pools')!r}")
        if op == "conv" and not (_int(step.get("layer")) and 0 <= step["layer"] < len(b.layers)):
            raise _bad(b.path, f"program step {i} refers to layer {step.get('layer')!r} (have {len(b.layers)})")
        if op == "block" and not (_int(step.get("index")) and _int(step.get("dense_iterations", 0))):
            raise _bad(b.path, f"program step {i} (block) needs an integer index and dense_iterations")
        if op == "exit":
            if step.get("index") != exits:
                raise _bad(b.path, f"program step {i} is exit {step.get('index')!r}; exits must be numbered "
                           f"0, 1, ... in order (expected {exits})")
            exits += 1
        for key in ("layer_gate", "channel_gate"):
            g = step.get(key)
            if g is not None and not (isinstance(g, dict) and isinstance(g.get("prefix"), str)
                                      and (key == "layer_gate" or isinstance(g.get("name"), str))):
                raise _bad(b.path, f"program step {i} has a malformed {key}")
        for key in ("in", "out", "residual", "skip_from"):
            for t in step[key] if isinstance(step.get(key), list) else [step.get(key)]:
                if t is not None and t not in tensors:
                    raise _bad(b.path, f"program step {i} uses undeclared tensor {t!r}")
        try:
            keys = step_processor_keys(step)
        except (KeyError, TypeError) as err:
            raise _bad(b.path, f"program step {i} lacks {err}") from None
        for key in keys:
            if key not in b.processor:
                raise _bad(b.path, f"program step {i} needs processor tensor {key!r}")


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
        from ddi_hw.fixedpoint import frac_bits
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
    from ddi_hw.fixedpoint import INT32_MAX, frac_bits, quantize
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
        from ddi_hw.csim import expected_iterations
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

    def add_proc(self, prefix: str, module) -> None:
        for k, v in module.state_dict().items():
            self.proc[f"{prefix}.{k}"] = v.detach().float().numpy()

    def exit(self, model, i: int, t_in: str) -> None:
        from ddi_hw.models.sparse_ops import fold_bn
        e = model.exits[i]
        for cname, bname in (("conv1", "bn1"), ("conv2", "bn2")):
            w, bias = fold_bn(getattr(e, cname).weight, getattr(e, bname))
            self.proc[f"exits.{i}.{cname}.weight"] = w.float().numpy()
            self.proc[f"exits.{i}.{cname}.bias"] = bias.float().numpy()
        self.add_proc(f"exits.{i}.fc", e.fc)
        self.program.append({"op": "exit", "index": i, "in": t_in, "prefix": f"exits.{i}", "pools": e.pools})

    def shared_gates(self, model) -> None:
        """The recurrent parts shared by all gates of a kind, once each under the kind's name."""
        from ddi_hw.models.gates import GATE_KINDS

        for kind in GATE_KINDS.values():
            if kind.shared and getattr(model, kind.shared, None) is not None:
                self.add_proc(kind.shared, getattr(model, kind.shared))

    def gate_steps(self, model, prefix: str, block) -> tuple[dict | None, dict | None]:
        """The block's layer / channel gate entries of its program step (kind = the processor's
        numpy forward, `ddi_hw.processor.GATE_OPS`), their tensors added to the processor blob."""
        from ddi_hw.models.gates import LAYER_GATE

        lg = cg = None
        if block.lgate is not None:
            lg = {"prefix": f"{prefix}.lgate", "kind": LAYER_GATE.deploy}
            self.add_proc(lg["prefix"], block.lgate)
        if block.cgate is not None:
            name = f"{prefix}.cgate"
            cg = {"name": name, "prefix": name, "kind": model.channel_gate.deploy}
            self.add_proc(name, block.cgate)
        return lg, cg


def _launch_flags(model) -> dict[str, dict]:
    """Engine flags per conv from the dataflow the cost table also costs (one description)."""
    from energy_models.dataflow import launch_flags
    return launch_flags(model.specs())


def _export_resnet(model, calib):
    """CIFAR ResNet: stem conv; per block [projection], conv1 (channel-gated outputs), conv2
    (gated inputs, residual add, ReLU); processor: gates, exits, pool + fc."""
    taps = {"stem": (model.stem, False)}
    for j, b in enumerate(model.blocks):
        taps[f"b{j}.mid"], taps[f"b{j}.out"] = (b.bn1, True), (b, False)
        if not b.skippable:
            taps[f"b{j}.sc"] = (b.sc_bn, False)
        if b.cgate is not None and model.channel_gate.deploy == "cnn":
            taps[f"b{j}.cg"] = (b.cgate.conv, True)  # the gate conv's ReLU output (pooled on the engine)
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
        if cg and cg["kind"] == "cnn":  # its conv is an engine launch (dataflow: gate_conv)
            bd.conv(f"{gate}.conv", b.cgate.conv, h, f"b{j}.cg", relu=True, launch=False)
            cg["layer"] = len(bd.layers) - 1
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
    """CIFAR DenseNet-BC: per dense layer conv1 (BN1+ReLU as the engine's input affine, BN2 folded,
    gated outputs) and conv2 (gated inputs); concatenation and the transitions' 2x2 average pool
    on the processor in integer arithmetic; one Q format per dense block's features."""
    if model.stem.imagenet:
        raise UserError("export supports CIFAR DenseNets; the ImageNet stem (7x7, max pool) and 56-pixel "
                        "feature maps exceed the engine")
    taps = {"stem": (model.stem, False)}
    for j, layer in enumerate(model.layers):
        taps[f"d{j}.act"], taps[f"d{j}.mid"], taps[f"d{j}.y"] = (layer.bn1, True), (layer.bn2, True), (layer, False)
    for t, tr in enumerate(model.transitions):
        taps[f"t{t}.act"], taps[f"t{t}.conv"] = (tr.bn, True), (tr.conv, False)
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
                           "V": [float(v) for v in plan.V[metric][block_i, :K + 1]]})
            block_i += 1
        else:
            i = sum(1 for e in events if e["kind"] == "exit")
            events.append({"kind": "exit", "index": i, "cost": float(plan.exit[metric][i])})
    return {"metric": metric, "events": events, "min_event": [float(v) for v in plan.min_event[metric]]}


def export_model(model, out_dir: str | Path, calib_images, source: str = "", dataset: str | None = None) -> Path:
    """Quantise a gated CIFAR ResNet or DenseNet (`ddi_hw.models`) into a bundle directory.

    BN is folded into every engine conv (pre-activation BN becomes the engine's input affine);
    conv weights go to engine.bin in the engine's layout; gates, exit branches (BN folded,
    float32) and the classifier go to processor.safetensors."""
    from safetensors.numpy import save as st_save

    from energy_models.atomic import atomic_write_bytes, atomic_write_text

    model.eval()
    mc = load_regmap().constants
    if getattr(model, "input_size", 10 ** 6) > mc["MAX_W"]:
        raise UserError(f"input width {getattr(model, 'input_size', '?')} exceeds the engine's MAX_W={mc['MAX_W']}")
    exporter = _EXPORTERS.get(getattr(model, "family", None))
    if exporter is None:
        raise UserError(f"export supports the ResNets and DenseNets of ddi_hw.models, not {type(model).__name__}")
    bd = exporter(model, calib_images)

    budget = _budget_plan(model)
    blob = bytearray()  # engine.bin: weights, bias (and input affine) of every layer, 64-byte aligned
    for entry, arr in zip(bd.layers, bd.arrays):
        for key in ("weights", "bias", "pre"):
            if key not in arr:
                continue
            a = arr[key]
            blob += b"\0" * (-len(blob) % ALIGN)
            entry[key] = {"offset": len(blob), "shape": list(a.shape), "dtype": str(a.dtype)}
            blob += a.astype(a.dtype.newbyteorder("<")).tobytes()
    proc_bytes = st_save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in bd.proc.items()})

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / ENGINE_BLOB, bytes(blob))
    atomic_write_bytes(out / PROC_BLOB, proc_bytes)
    manifest = {
        "format": FORMAT, "regmap_version": load_regmap().version, "source": source, "dataset": dataset,
        "model": {"class": type(model).__name__, "num_classes": int(model.fc.out_features),
                  "input_size": model.input_size},
        "number_format": "int16 activations/weights, Q(f) = int / 2**f per tensor, int32 bias in "
                         "Q(f_act + f_w), 48-bit accumulators, round half up, saturate",
        "tensors": {n: {"frac": bd.frac[n], "shape": bd.shapes.get(n)} for n in sorted(bd.frac)},
        "layers": bd.layers, "program": bd.program, "cost_plan": budget,
        "processor_shapes": {k: list(v.shape) for k, v in bd.proc.items()},
        "blobs": {name: {"sha256": sha256_file(out / name), "size": (out / name).stat().st_size}
                  for name in (ENGINE_BLOB, PROC_BLOB)},
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return out


# ----------------------------------------------------------------------------- command


def test_images(dataset: str, data_dir, limit: int | None, split: str = "test"):
    """(normalised float32 images, labels) as numpy, first `limit` of a split, centre view."""
    import torch

    from ddi_hw.data import load_dataset, normalize

    ds = load_dataset(dataset, data_dir)
    src = ds.test if split == "test" else ds.train
    n = len(src) if limit is None else min(limit, len(src))
    x, y = src.load(torch.arange(n))
    if x.shape[-1] != ds.image_size:
        off = (x.shape[-1] - ds.image_size) // 2
        x = x[..., off:off + ds.image_size, off:off + ds.image_size]
    return normalize(x, ds).numpy(), y.numpy()


def export_command(
    checkpoint: str = typer.Argument(..., help="run directory with model.safetensors + model.json"),
    out: str = typer.Option(..., "--out", help="bundle directory to write"),
    dataset: Optional[str] = typer.Option(None, help="data set (default: the run's config)"),
    data_dir: Optional[str] = typer.Option(None, help="data directory (CIFAR-10 python batches)"),
    calib: int = typer.Option(256, callback=number(1, integer=True),
                              help="training images used to choose the Q formats"),
    eval_limit: int = typer.Option(500, callback=number(1, integer=True),
                                   help="test images for the quantised-vs-float accuracy report"),
) -> None:
    """Quantise a trained gated model into a fixed-point bundle and report the accuracy drop."""
    import torch

    from ddi_hw.backends import ReferenceBackend, run_images, summarize
    from ddi_hw.runs import load_run
    from ddi_hw.validate import output_dir
    from energy_models.atomic import atomic_write_text

    output_dir(out, "--out")
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
    df = run_images(bundle, x, y, ReferenceBackend(), float_predictions=fp)
    summary = summarize(df)
    atomic_write_text(Path(out) / "quantization_report.csv", df.to_csv(index=False))
    atomic_write_text(Path(out) / "quantization_summary.json", json.dumps(summary, indent=1) + "\n")
    print(f"bundle: {path} ({len(bundle.layers)} engine layers, {len(bundle.engine_blob)} bytes in {ENGINE_BLOB})")
    print(f"float accuracy {summary['float_accuracy']:.4f}, fixed-point (reference) {summary['accuracy']:.4f}, "
          f"drop {summary['accuracy_drop']:+.4f}, prediction agreement {summary['agreement_with_float']:.4f} "
          f"on {summary['images']} {name} test images")

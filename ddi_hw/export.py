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
        f_res = None if e.get("f_res") is None else int(e["f_res"])
    except (KeyError, TypeError, ValueError) as err:
        raise _bad(path, f"{what} has bad parameters ({err})") from None
    mc = load_regmap().constants
    if max(in_ch, out_ch) > mc["MAX_CH"] or in_ch < 1 or out_ch < 1:
        raise _bad(path, f"{what}: {in_ch}->{out_ch} channels outside 1..{mc['MAX_CH']}")
    if p.acc_shift != f_in + f_w - f_out or (p.residual and p.res_shift != f_in + f_w - f_res):
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
    try:
        man = json.loads(mpath.read_text())
    except json.JSONDecodeError as err:
        raise _bad(path, f"{MANIFEST} is not valid JSON ({err})") from None
    if man.get("format") != FORMAT:
        raise _bad(path, f"format {man.get('format')!r}, expected {FORMAT!r}")
    rm_version = load_regmap().version
    if man.get("regmap_version") != rm_version:
        raise _bad(path, f"register-map version {man.get('regmap_version')} but this engine is version {rm_version}")
    blobs = {}
    for name in (ENGINE_BLOB, PROC_BLOB):
        info = man.get("blobs", {}).get(name)
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


def _check_program(b: Bundle) -> None:
    """Every step names known layers, tensors and processor parameters."""
    from ddi_hw.backends import PROGRAM_OPS, step_processor_keys  # the interpreter defines the steps

    tensors = b.manifest.get("tensors", {})
    for i, step in enumerate(b.program):
        op = step.get("op")
        if op not in PROGRAM_OPS:
            raise _bad(b.path, f"program step {i} has unknown op {op!r}")
        if op == "conv" and not (0 <= step.get("layer", -1) < len(b.layers)):
            raise _bad(b.path, f"program step {i} refers to layer {step.get('layer')} (have {len(b.layers)})")
        for key in ("in", "out", "residual"):
            if step.get(key) is not None and step[key] not in tensors:
                raise _bad(b.path, f"program step {i} uses undeclared tensor {step[key]!r}")
        for key in step_processor_keys(step):
            if key not in b.processor:
                raise _bad(b.path, f"program step {i} needs processor tensor {key!r}")


# ----------------------------------------------------------------------------- export (torch)

HEADROOM = 2.0  # calibrated |max| x 2: one bit of margin for test images brighter than calibration


class _Formats:
    """Q formats of activation tensors; tensors that must share a format (a skippable block's
    output is its input when skipped) are merged and get the smallest fraction count."""

    def __init__(self):
        self.maxabs: dict[str, float] = {}
        self.parent: dict[str, str] = {}

    def add(self, name: str, maxabs: float) -> None:
        self.maxabs[name] = max(self.maxabs.get(name, 0.0), float(maxabs))
        self.parent.setdefault(name, name)

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


def _calibrate(model, images) -> dict[str, float]:
    """Max |activation| of every engine tensor over the calibration images (dense path, eval)."""
    import torch
    stats: dict[str, float] = {}

    def hook(name, relu=False):
        def fn(_m, _inp, out):
            v = out.clamp(min=0) if relu else out
            stats[name] = max(stats.get(name, 0.0), float(v.abs().max()))
        return fn

    hooks = [model.stem.register_forward_hook(hook("stem"))]
    for j, b in enumerate(model.blocks):
        hooks.append(b.bn1.register_forward_hook(hook(f"b{j}.mid", relu=True)))
        hooks.append(b.register_forward_hook(hook(f"b{j}.out")))
        if not b.skippable:
            hooks.append(b.sc_bn.register_forward_hook(hook(f"b{j}.sc")))
    try:
        with torch.no_grad():
            for start in range(0, len(images), 64):
                model(images[start:start + 64], mode="dense")
    finally:
        for h in hooks:
            h.remove()
    stats["x"] = float(images.abs().max())
    return stats


def _conv_entry(name, w, b, *, stride, relu, f_in, f_out, residual=False, f_res=None):
    """Quantise one BN-folded conv: pick f_w so weights fit int16, the bias fits int32 in
    Q(f_in + f_w) and every shift is in the engine's range."""
    from ddi_hw.fixedpoint import INT32_MAX, frac_bits, quantize
    w, b = w.detach().double().numpy(), b.detach().double().numpy()
    f_w = frac_bits(float(np.abs(w).max()), limit=20)
    bmax = float(np.abs(b).max())
    if bmax > 0:
        f_w = min(f_w, int(np.floor(np.log2(INT32_MAX / bmax))) - f_in)
    params = dict(kernel=w.shape[2], stride=stride, relu=relu, residual=residual,
                  acc_shift=f_in + f_w - f_out, res_shift=(f_in + f_w - f_res) if residual else 0)
    try:
        LayerParams(**params)
    except ValueError as err:
        raise UserError(f"layer {name}: no fixed-point format fits its range ({err}); "
                        "check the checkpoint for exploding weights or activations") from None
    arrays = {"weights": quantize(w, f_w), "bias": quantize(b, f_in + f_w, -(2 ** 31), INT32_MAX, np.int32)}
    entry = {"name": name, "in_ch": w.shape[1], "out_ch": w.shape[0], "params": params,
             "f_in": f_in, "f_w": f_w, "f_out": f_out, "f_res": f_res if residual else None}
    return entry, arrays


def export_model(model, out_dir: str | Path, calib_images, source: str = "", dataset: str | None = None) -> Path:
    """Quantise a gated CIFAR ResNet (`ddi_hw.models`) into a bundle directory.

    BN is folded into every engine conv; conv weights go to engine.bin in the engine's layout;
    gates, exit branches (BN folded, float32) and the classifier go to processor.safetensors."""
    import torch
    from safetensors.numpy import save as st_save

    from ddi_hw.checkpoint import atomic_write_bytes, atomic_write_text
    from ddi_hw.csim import expected_iterations
    from ddi_hw.models.sparse_ops import fold_bn

    if not hasattr(model, "blocks") or not hasattr(model, "stem"):
        raise UserError(f"export supports the CIFAR ResNets of ddi_hw.models, not {type(model).__name__}")
    model.eval()
    mc = load_regmap().constants
    size = model.input_size
    if size > mc["MAX_W"]:
        raise UserError(f"input width {size} exceeds the engine's MAX_W={mc['MAX_W']}")
    stats = _calibrate(model, calib_images)
    fm = _Formats()
    for n, v in stats.items():
        fm.add(n, v)
    prev = "stem"
    for j, b in enumerate(model.blocks):
        if b.skippable:
            fm.same(f"b{j}.out", prev)
        prev = f"b{j}.out"
    frac = fm.fracs()

    layers, arrays, program = [], [], [{"op": "input", "out": "x"}]
    shapes = {"x": [3, size, size]}

    def add_conv(name, conv, bn, stride, relu, t_in, t_out, residual=None, **step):
        w, bias = fold_bn(conv.weight, bn)
        entry, arr = _conv_entry(name, w, bias, stride=stride, relu=relu, f_in=frac[t_in], f_out=frac[t_out],
                                 residual=residual is not None, f_res=frac.get(residual))
        h = shapes[t_in][1]
        oh = (h + 2 * (conv.kernel_size[0] // 2) - conv.kernel_size[0]) // stride + 1
        shapes[t_out] = [conv.out_channels, oh, oh]
        layers.append(entry)
        arrays.append(arr)
        program.append({"op": "conv", "layer": len(layers) - 1, "in": t_in, "out": t_out,
                        "residual": residual, **step})
        return expected_iterations(conv.in_channels, conv.out_channels, oh, oh, conv.kernel_size[0])

    it = add_conv("stem.conv", model.stem.conv, model.stem.bn, 1, True, "x", "stem")
    program[-1]["dense_iterations"] = it
    h, exit_at = "stem", {p: i for i, p in enumerate(model.exit_positions)}
    for j, b in enumerate(model.blocks):
        gate = f"blocks.{j}.cgate" if b.cgate is not None else None
        blk = {"op": "block", "index": j, "in": h, "out": f"b{j}.out",
               "layer_gate": {"prefix": f"blocks.{j}.lgate"} if b.lgate is not None else None,
               "channel_gate": {"name": gate, "prefix": gate, "kind": model.channel_gate_kind} if gate else None}
        program.append(blk)
        dense = 0
        res = h
        if not b.skippable:
            dense += add_conv(f"blocks.{j}.sc_conv", b.sc_conv, b.sc_bn, b.stride, False, h, f"b{j}.sc")
            res = f"b{j}.sc"
        dense += add_conv(f"blocks.{j}.conv1", b.conv1, b.bn1, b.stride, True, h, f"b{j}.mid", out_gate=gate)
        dense += add_conv(f"blocks.{j}.conv2", b.conv2, b.bn2, 1, True, f"b{j}.mid", f"b{j}.out",
                          residual=res, in_gate=gate)
        blk["dense_iterations"], blk["end"] = dense, len(program)
        h = f"b{j}.out"
        if j in exit_at:
            e = model.exits[exit_at[j]]
            program.append({"op": "exit", "index": exit_at[j], "in": h, "prefix": f"exits.{exit_at[j]}",
                            "pools": e.pools})
    program.append({"op": "head", "in": h, "prefix": "fc"})

    # engine.bin: weights, bias (and pre) of every layer, 64-byte aligned
    blob = bytearray()
    for entry, arr in zip(layers, arrays):
        for key, a in arr.items():
            blob += b"\0" * (-len(blob) % ALIGN)
            entry[key] = {"offset": len(blob), "shape": list(a.shape), "dtype": str(a.dtype)}
            blob += a.astype(a.dtype.newbyteorder("<")).tobytes()
    # processor.safetensors: gates, exits (BN folded), classifier, float32
    sd = model.state_dict()
    proc = {k: v.float().numpy() for k, v in sd.items()
            if k.startswith(("layer_gate.", "channel_rnn.", "fc.")) or ".lgate." in k or ".cgate." in k}
    for i, e in enumerate(model.exits):
        for cname, bname in (("conv1", "bn1"), ("conv2", "bn2")):
            w, bias = fold_bn(getattr(e, cname).weight, getattr(e, bname))
            proc[f"exits.{i}.{cname}.weight"], proc[f"exits.{i}.{cname}.bias"] = w.float().numpy(), bias.float().numpy()
        proc[f"exits.{i}.fc.weight"], proc[f"exits.{i}.fc.bias"] = e.fc.weight.detach().float().numpy(), e.fc.bias.detach().float().numpy()
    proc_bytes = st_save({k: np.ascontiguousarray(v) for k, v in proc.items()})

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / ENGINE_BLOB, bytes(blob))
    atomic_write_bytes(out / PROC_BLOB, proc_bytes)
    manifest = {
        "format": FORMAT, "regmap_version": load_regmap().version, "source": source, "dataset": dataset,
        "model": {"class": type(model).__name__, "depth": getattr(model, "depth", None),
                  "num_classes": int(model.fc.out_features), "input_size": size},
        "number_format": "int16 activations/weights, Q(f) = int / 2**f per tensor, int32 bias in "
                         "Q(f_in + f_w), 48-bit accumulators, round half up, saturate",
        "tensors": {n: {"frac": frac[n], "shape": shapes.get(n)} for n in sorted(frac)},
        "layers": layers, "program": program,
        "processor_shapes": {k: list(v.shape) for k, v in proc.items()},
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


def load_checkpoint_model(run_dir):
    """A DynamicNet rebuilt from a run directory (safetensors + JSON sidecar, nothing unpickled)."""
    from ddi_hw.checkpoint import load_model_state
    from ddi_hw.train import build_model

    state, side = load_model_state(run_dir)
    if "model" not in side:
        raise UserError(f"{run_dir}/model.json has no 'model' entry; it was not written by ddi-hw train")
    model = build_model(side["model"])
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"{run_dir}: weights do not match the model in model.json ({str(err)[:120]})") from None
    return model.eval(), side


def export_command(
    checkpoint: str = typer.Argument(..., help="run directory with model.safetensors + model.json"),
    out: str = typer.Option(..., "--out", help="bundle directory to write"),
    dataset: Optional[str] = typer.Option(None, help="data set (default: the run's config)"),
    data_dir: Optional[str] = typer.Option(None, help="data directory (CIFAR-10 python batches)"),
    calib: int = typer.Option(256, help="training images used to choose the Q formats"),
    eval_limit: int = typer.Option(500, help="test images for the quantised-vs-float accuracy report"),
) -> None:
    """Quantise a trained gated model into a fixed-point bundle and report the accuracy drop."""
    import torch

    from ddi_hw.backends import ReferenceBackend, run_images, summarize
    from ddi_hw.checkpoint import atomic_write_text

    model, side = load_checkpoint_model(checkpoint)
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

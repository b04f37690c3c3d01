"""The bundle format: one owner for what a bundle holds, how it is checked and what its program may say.

A bundle directory holds
- `engine.bin`: everything the FPGA engine reads from DDR, per conv layer int16 weights (OIHW),
  int32 bias and the optional int32 input affine, each 64-byte aligned (AXI burst friendly). The
  board copies this one file to DDR once and points the engine at offsets inside it.
- `processor.safetensors`: float32 parameters of what runs on the ARM processor (the gates'
  vector layers, the exit branches' and the final classifiers).
- `manifest.json`: layer list (shapes, Q formats, shifts, offsets), tensor formats, the program
  (the order of engine launches and processor steps per image), the register-map version, the
  sha256 and size of every blob, and `manifest_sha256`, a digest of all the rest of the manifest.

`load_bundle` checks all of it before anything is sent to hardware and raises a one-line
UserError: files present, the manifest digest (an edited manifest is refused even when its
per-blob hashes were recomputed to match replaced blobs), blob hashes and sizes, array ranges
inside engine.bin that are aligned and do not overlap (two layers cannot share weights), shapes
consistent with the layer, shifts consistent with the Q formats, the register-map version, and
the program rules (`PROGRAM_OPS`, `check_program`). The digests catch corruption and careless
edits; they are not a signature (whoever can write the folder can recompute them).

`write_bundle` is the only writer (the exporter calls it). numpy, safetensors' numpy API and the
standard library only: this module runs on the board.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ddi_hw.deploy.fixedpoint import LayerParams
from ddi_hw.deploy.processor import EXIT_ENGINE_CONVS, EXIT_TENSORS, GATE_OPS
from ddi_hw.deploy.regmap import load_regmap
from ddi_hw.errors import UserError
from ddi_hw.validate import fields, read_json

FORMAT = "ddi-hw-bundle/6"  # /2: manifest digest, non-overlapping blob ranges; /3: every gate kind with
#   engine convs (CNN channel gate, DenseNet light gate) has them as engine layers (`layer`); /4: exit
#   branches' convs are engine layers (`layer`), their max pools integer on the processor (`pooled`);
#   /5: an exit's max pools are one pass (`pool`: window = stride, was `pools` 2x2 passes), and the
#   cost plan prices that one pass; /6: the cost plan's block events carry `s` (cost paid only when the
#   block is skipped: a DenseNet layer's copy) and charge pooled sums to the conv that writes them
MANIFEST, ENGINE_BLOB, PROC_BLOB = "manifest.json", "engine.bin", "processor.safetensors"
ALIGN = 64
DIGEST_KEY = "manifest_sha256"
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


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest without its own digest, in a canonical JSON form (sorted keys)."""
    body = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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


def _check_ranges(path: Path, layers: list[BundleLayer]) -> None:
    """No two arrays of engine.bin may share bytes: an edited manifest that points two layers at
    the same weights would otherwise run with wrong weights and exit 0."""
    spans = sorted((layer.offsets[k], layer.offsets[k] + getattr(layer, k).nbytes, f"layer {layer.index} {k}")
                   for layer in layers for k in layer.offsets)
    for (a0, a1, wa), (b0, _, wb) in zip(spans, spans[1:]):
        if b0 < a1:
            raise _bad(path, f"{wa} (bytes {a0}..{a1}) overlaps {wb} (from byte {b0}) in {ENGINE_BLOB}")


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
    if man.get(DIGEST_KEY) != manifest_digest(man):
        raise _bad(path, f"{MANIFEST} was edited after export (its {DIGEST_KEY} does not match its content)")
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
    _check_ranges(path, layers)
    for key, shape in man.get("processor_shapes", {}).items():
        if key not in proc or list(proc[key].shape) != list(shape):
            raise _bad(path, f"processor tensor {key!r} missing or not of shape {shape}")
    bundle = Bundle(path, man, layers, blobs[ENGINE_BLOB], proc)
    check_program(bundle)
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
    """The cost plan read by deploy.budget (the budget rule, the executed cost): events and their cheapest costs."""
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
            ok &= _int(e.get("index")) and all(_num(e.get(k)) for k in "gfcs") and isinstance(e.get("V"), list) \
                and len(e["V"]) > 0 and all(_num(x) for x in e["V"])
        else:
            ok = False
    if not ok:
        raise _bad(path, "cost_plan is malformed (events of kind fixed/block/exit with numeric costs, "
                   "exits numbered 0, 1, ..., one min_event per event)")


# ----------------------------------------------------------------------------- program rules

# What a program step may be (the interpreter, `ddi_hw.deploy.backends.run_image`, runs these):
#   input     quantise the image into tensor `out`
#   block     a residual block / dense layer: optional `layer_gate` (skip to step `end`) and
#             `channel_gate` (masks of the convs that name it in `out_gate` / `in_gate`; a gate
#             kind with engine convs runs them as the engine layers `layer`, `layer` + 1, ...)
#   conv      one engine launch of `layer` from `in` (+ `residual`) to `out`
#   concat    channel concatenation of `in` (a list) into `out` (integer, processor)
#   avgpool2  2x2 average pool of `in` into `out` (integer, processor)
#   exit      exit branch `index` from `in`: one `pool` x `pool` max pool, stride `pool`, ceil mode (a
#             power of two, 1 = none; integer, processor) into `pooled`,
#             its convs as the engine layers `layer`, `layer` + 1 (`EXIT_ENGINE_CONVS`), its FC on the processor
#   head      final pool + classifier (`norm`: DenseNet's final BN + ReLU first)
PROGRAM_OPS = ("input", "block", "conv", "concat", "avgpool2", "exit", "head")
MAX_POOL_WINDOWS = tuple(2 ** n for n in range(9))  # an exit's `pool`: 1 (none) .. 256


def step_processor_keys(step: dict) -> list[str]:
    """processor.safetensors entries a program step reads (checked when a bundle is loaded)."""
    op, keys = step.get("op"), []
    if op == "block":
        for gate in (step.get("layer_gate"), step.get("channel_gate")):
            if gate:
                keys += GATE_OPS[gate["kind"]].keys(gate["prefix"])
    elif op == "exit":
        keys += [f"{step['prefix']}.{n}" for n in EXIT_TENSORS]
    elif op == "head":
        keys += [f"{step['prefix']}.weight", f"{step['prefix']}.bias"]
        if step.get("norm"):
            keys += [f"{step['norm']}.scale", f"{step['norm']}.shift"]
    return keys


def _check_engine_layers(b: Bundle, i: int, first, prefix, convs: tuple[str, ...], what: str) -> None:
    """A gate kind with engine convs, or an exit branch, names its first engine layer (`layer`);
    the next ones follow it, each named `<prefix>.<conv>` (the cost table's row, whose engine
    flags it carries)."""
    if not convs:
        return
    if not _int(first):
        raise _bad(b.path, f"program step {i}: its {what} names no engine layer")
    for n, conv in enumerate(convs):
        if not 0 <= first + n < len(b.layers):
            raise _bad(b.path, f"program step {i}: its {what}'s engine layer {first + n} does not exist "
                       f"(have {len(b.layers)})")
        if b.layers[first + n].name != f"{prefix}.{conv}":
            raise _bad(b.path, f"program step {i}: its {what}'s engine layer {first + n} is "
                       f"{b.layers[first + n].name!r}, not {prefix}.{conv}")


def check_program(b: Bundle) -> None:
    """Every step names known layers, tensors and processor parameters."""
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
            if gate:
                _check_engine_layers(b, i, gate.get("layer"), gate.get("prefix"), GATE_OPS[gate["kind"]].engine_convs,
                                     f"{gate['kind']} gate")
        if op == "block" and not (isinstance(step.get("end"), int) and i < step["end"] <= len(b.program)):
            raise _bad(b.path, f"program step {i} jumps to {step.get('end')!r} (must lie after it)")
        if op == "exit" and not (_int(step.get("pool")) and step["pool"] in MAX_POOL_WINDOWS):
            raise _bad(b.path, f"program step {i} (exit) has a bad max-pool window {step.get('pool')!r} "
                       f"(a power of two, 1..{MAX_POOL_WINDOWS[-1]})")
        if op == "conv" and not (_int(step.get("layer")) and 0 <= step["layer"] < len(b.layers)):
            raise _bad(b.path, f"program step {i} refers to layer {step.get('layer')!r} (have {len(b.layers)})")
        if op == "block" and not (_int(step.get("index")) and _int(step.get("dense_iterations", 0))):
            raise _bad(b.path, f"program step {i} (block) needs an integer index and dense_iterations")
        if op == "exit":
            _check_engine_layers(b, i, step.get("layer"), step.get("prefix"), EXIT_ENGINE_CONVS, "exit branch")
            if step.get("index") != exits:
                raise _bad(b.path, f"program step {i} is exit {step.get('index')!r}; exits must be numbered "
                           f"0, 1, ... in order (expected {exits})")
            exits += 1
        for key in ("layer_gate", "channel_gate"):
            g = step.get(key)
            if g is not None and not (isinstance(g, dict) and isinstance(g.get("prefix"), str)
                                      and (key == "layer_gate" or isinstance(g.get("name"), str))):
                raise _bad(b.path, f"program step {i} has a malformed {key}")
        if op == "exit" and step.get("pooled") not in tensors:
            raise _bad(b.path, f"program step {i} (exit) names no declared `pooled` tensor")
        for key in ("in", "out", "residual", "skip_from", "pooled"):
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


# ----------------------------------------------------------------------------- writing


def write_bundle(out_dir: str | Path, layers: list[dict], arrays: list[dict[str, np.ndarray]],
                 processor: dict[str, np.ndarray], manifest: dict) -> Path:
    """Write a bundle: pack each layer's arrays (weights, bias, pre) 64-byte aligned into
    engine.bin (their offsets go into the layer entries), the processor tensors as float32
    safetensors, then the manifest (`manifest` = the exporter's fields: source, model, tensors,
    program, cost_plan, ...) with blob hashes and its digest. Each file is written atomically."""
    from safetensors.numpy import save as st_save

    from energy_models.atomic import atomic_write_bytes, atomic_write_text

    blob = bytearray()
    for entry, arr in zip(layers, arrays):
        for key in ("weights", "bias", "pre"):
            if key not in arr:
                continue
            a = arr[key]
            blob += b"\0" * (-len(blob) % ALIGN)
            entry[key] = {"offset": len(blob), "shape": list(a.shape), "dtype": str(a.dtype)}
            blob += a.astype(a.dtype.newbyteorder("<")).tobytes()
    proc = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in processor.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / ENGINE_BLOB, bytes(blob))
    atomic_write_bytes(out / PROC_BLOB, st_save(proc))
    man = {"format": FORMAT, "regmap_version": load_regmap().version, **manifest, "layers": layers,
           "processor_shapes": {k: list(v.shape) for k, v in proc.items()},
           "blobs": {name: {"sha256": sha256_file(out / name), "size": (out / name).stat().st_size}
                     for name in (ENGINE_BLOB, PROC_BLOB)}}
    man[DIGEST_KEY] = manifest_digest(man)
    atomic_write_text(out / MANIFEST, json.dumps(man, indent=1) + "\n")
    return out

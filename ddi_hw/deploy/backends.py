"""Where a bundle's conv layers run: one interface, three implementations.

    reference  the numpy fixed-point model of the engine (ddi_hw.deploy.fixedpoint), no toolchain needed
    csim       the HLS C++ engine compiled with g++ and called through ctypes (ddi_hw.deploy.csim)
    board      the engine in the ZedBoard's programmable logic through PYNQ (ddi_hw.deploy.board)

What runs where follows the engine's dataflow (energy_models/engines/ddi_engine.yaml; the cost
table costs the same): the engine writes the global-average-pool sums of a tensor while it
writes the tensor (FLAG_POOL, set by the exporter from the dataflow), and runs the channel gates'
convs (the CNN gate's 3x3/2 conv, the DenseNet light gate's 1x1/2 and 3x3 convs, each + ReLU)
and the exit branches' two 3x3 convs (+ BN + ReLU), with only the last one's pooled sums written
(FLAG_NO_STORE). The processor, in numpy float32/float64, runs the gates' vector layers from
those pooled vectors (layer gate: 1x1 embedding, shared LSTM cell, linear; channel gate: its FC,
or the RNN variant), the exits' and the final classifier on the pooled last tensor, and the
budgeted-exit decisions (RADI) from the exported cost plan. A tensor no launch wrote pooled sums
for (a DenseNet concatenation or transition output, the DenseNet head's BN + ReLU output) is
pooled by the processor from the map; DenseNet's 2x2 average pools and the exit branches' max
pools (one 2^k x 2^k pass each) also run there, in integer arithmetic; a concatenation copies nothing
(`_BlockBuffers`), except a skipped dense layer's features, which the processor copies from the previous
layer's into the layer's slot (a `copy` map op, the cost table's `.skip_copy` row).
The gates' numpy forwards are `ddi_hw.deploy.processor.GATE_OPS`, one per gate kind. Layer
skipping = the processor does not launch the engine; channel skipping = the engine's output/input
channel masks.

Implementing a backend (the contract `ddi_hw.deploy.board.BoardBackend` follows):

    class BoardBackend(Backend):
        name = "board"
        def prepare(self, bundle):        # once per bundle: e.g. copy bundle.engine_blob to a DDR
            ...                           # buffer; layer.offsets[...] are byte offsets inside it
        def run_layer(self, layer, x, residual=None, out_mask=None, in_mask=None) -> LayerRun:
            ...                           # x: (in_ch, H, W) int16 CHW; masks: 0/1 arrays or None
        def close(self): ...

`run_layer` must return exactly `fixedpoint.conv_layer(x, layer.weights, layer.bias,
layer.params, residual, layer.pre, out_mask, in_mask)` (shape (out_ch, OH, OW), int16) -- the
tests hold reference and csim to that bit for bit -- plus the engine's `iterations` register if
it has one. Register values come from `ddi_hw.deploy.regmap.load_regmap()` (flag_word, mask_words,
register offsets), never hard-coded. `run_image(bundle, image, backend)` drives one image.
"""
from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from ddi_hw.deploy.budget import GATES_AND_CHANNEL_GATE, GATES_ONLY, BudgetPlan, BudgetWalk
from ddi_hw.deploy.fixedpoint import conv_layer, dequantize, quantize
from ddi_hw.deploy.processor import EXIT_ENGINE_CONVS, GATE_OPS, maxpool_ceil
from ddi_hw.errors import UserError


@dataclass
class LayerRun:
    output: np.ndarray  # (out_ch, OH, OW) int16 (zeros if the layer does not store: FLAG_NO_STORE)
    iterations: int | None = None  # engine compute-loop iterations (None: backend cannot count)
    pooled: np.ndarray | None = None  # (out_ch,) int32 output sums if the layer pools (FLAG_POOL)


class Backend(ABC):
    """Runs one conv layer of a bundle on the engine (or a model of it)."""
    name = "abstract"

    def prepare(self, bundle) -> None:
        """Called once before the first layer of a bundle (e.g. load weights into DDR)."""

    @abstractmethod
    def run_layer(self, layer, x: np.ndarray, residual: np.ndarray | None = None,
                  out_mask: np.ndarray | None = None, in_mask: np.ndarray | None = None) -> LayerRun:
        """One engine launch; `layer` is a `bundle.BundleLayer`."""

    def close(self) -> None:
        """Release hardware / buffers."""


class ReferenceBackend(Backend):
    name = "reference"

    def run_layer(self, layer, x, residual=None, out_mask=None, in_mask=None) -> LayerRun:
        from ddi_hw.deploy.csim import expected_iterations
        from ddi_hw.deploy.fixedpoint import pooled_sums

        out = conv_layer(x, layer.weights, layer.bias, layer.params, residual, layer.pre, out_mask, in_mask)
        n_in = layer.in_ch if in_mask is None else int(np.count_nonzero(in_mask))
        n_out = layer.out_ch if out_mask is None else int(np.count_nonzero(out_mask))
        pooled = pooled_sums(out) if layer.params.pool else None
        if not layer.params.store:
            out = np.zeros_like(out)
        # the engine's loop count follows from the shapes alone (same formula the C-sim is tested on)
        return LayerRun(out, expected_iterations(n_in, n_out, out.shape[1], out.shape[2], layer.params.kernel),
                        pooled)


class CsimBackend(Backend):
    name = "csim"

    def prepare(self, bundle) -> None:
        from ddi_hw.deploy.csim import load_library
        load_library()

    def run_layer(self, layer, x, residual=None, out_mask=None, in_mask=None) -> LayerRun:
        from ddi_hw.deploy.csim import run_layer_full
        r = run_layer_full(x, layer.weights, layer.bias, layer.params, residual, layer.pre,
                           out_mask, in_mask)
        return LayerRun(r.output, r.iterations, r.pooled)


@dataclass
class ImageResult:
    """One image through a bundle (processor decisions + engine launches)."""
    logits: np.ndarray
    exit_taken: int = -1  # -1 = final classifier
    block_run: list[int] = field(default_factory=list)  # 1 = block ran, per block
    channel_masks: dict[str, np.ndarray] = field(default_factory=dict)
    launches: int = 0  # engine launches
    iterations: int = 0  # summed engine compute-loop iterations (cycle proxy), gate convs included
    dense_iterations: int = 0  # the static network's (every block and channel on, no gates, no exits)
    cost: float = 0.0  # executed cost from the model's cost table (manifest cost_plan): all it ran
    processor_maps: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (op, input shape,
    #   output shape) of every op the processor ran on a map in DRAM (pools, the exits' max pool, a
    #   skipped dense layer's copy)
    exits_run: list[int] = field(default_factory=list)  # exit branches run (under a budget: every fallback)
    stopped_at: int = -1  # the exit the program stopped at (-1: none); blocks after it never ran
    stopped_block: int = -1  # under a budget: the block it stopped in (its gates ran, not its convs; -1: none)
    stopped_after_channel_gate: bool = False  # ... after that block's channel gate too

    @property
    def prediction(self) -> int:
        return int(np.argmax(self.logits))


class _Processor:
    """State and float ops of the processor side while one image runs."""

    def __init__(self, bundle, maps: list, layout: "_BlockBuffers"):
        self.b, self.p, self.maps, self.layout = bundle, bundle.processor, maps, layout
        self.state: dict[str, tuple] = {}  # shared recurrent prefix -> LSTM (h, c) of this image
        self.pooled: dict[str, np.ndarray] = {}  # tensor -> int32 channel sums from the engine
        self.sums: dict[str, np.ndarray] = {}  # tensor -> channel sums the processor computed

    def f(self, env, t):
        return dequantize(env[t], self.b.tensor_frac(t)).astype(np.float32)

    def mean(self, env, t) -> np.ndarray:
        """Global average pool of tensor t from its channel sums; a concatenation's sums are its
        parts' sums (`channel_sums`), so features already summed are not read again."""
        x = env[t]
        sums = np.concatenate([self.channel_sums(env, part) for part in self.layout.parts.get(t, [t])])
        return (dequantize(sums, self.b.tensor_frac(t)) / (x.shape[1] * x.shape[2])).astype(np.float32)

    def channel_sums(self, env, t) -> np.ndarray:
        """Channel sums of tensor t: the engine's (FLAG_POOL) when it wrote them, else computed
        once by the processor from the map (read from DRAM)."""
        if t in self.pooled:
            return self.pooled[t]
        if t not in self.sums:
            x = env[t]
            self.maps.append(("pool", x.shape, (x.shape[0], 1, 1)))
            self.sums[t] = x.astype(np.int64).sum(axis=(1, 2))
        return self.sums[t]

    def gate(self, gate: dict, env, t, backend, res) -> np.ndarray:
        """0/1 decisions of a layer or channel gate on tensor t. A gate kind with engine convs
        (`GateOp.engine_convs`: the CNN channel gate, DenseNet's light gate) launches them on the
        engine from t (consecutive bundle layers from `gate["layer"]`; the last writes only its
        pooled sums) and runs its FC here on their means; every other gate is its kind's numpy
        forward (`ddi_hw.deploy.processor.GATE_OPS`), fed the pooled vector when the kind needs no
        more (`GateOp.pooled`), else the map."""
        p, pre = self.p, gate["prefix"]
        op = GATE_OPS[gate["kind"]]
        if op.engine_convs:
            mean = self.launch_chain(gate["layer"], len(op.engine_convs), env[t], backend, res)
            logit = p[f"{pre}.fc.weight"] @ mean + p[f"{pre}.fc.bias"]
            return (logit > 0).astype(np.uint8)
        x = self.mean(env, t) if op.pooled else self.f(env, t)
        logit, new = op.forward(p, pre, op.shared, x, self.state.get(op.shared))
        if op.shared:
            self.state[op.shared] = new
        return (logit > 0).astype(np.uint8)

    def launch_chain(self, first: int, n: int, x: np.ndarray, backend, res) -> np.ndarray:
        """Engine layers first, first + 1, ... (n of them) one after another from map x (a gate's or
        an exit's convs); the last writes only pooled sums: returns their means (float32)."""
        for i in range(n):
            layer = self.b.layers[first + i]
            r = backend.run_layer(layer, x)
            res.launches += 1
            res.iterations += r.iterations or 0
            oh, ow = layer.params.out_hw(*x.shape[1:])
            x = r.output
        return (dequantize(r.pooled, layer.f_out) / (oh * ow)).astype(np.float32)

    def exit_branch(self, step, env, backend, res) -> np.ndarray:
        """Exit branch: its max pool here on the int16 map in one pass (`pool` x `pool`, stride
        `pool`, ceil mode = the model's successive 2x2 pools; exact, same Q format: the map read
        once, the pooled map written back), its convs on the engine, its FC here."""
        res.exits_run.append(step["index"])
        x = env[step["in"]]
        if step["pool"] > 1:
            y = maxpool_ceil(x, step["pool"])
            self.maps.append(("maxpool", x.shape, y.shape))
            x = y
        mean = self.launch_chain(step["layer"], len(EXIT_ENGINE_CONVS), x, backend, res)
        pre = step["prefix"]
        return self.p[f"{pre}.fc.weight"] @ mean + self.p[f"{pre}.fc.bias"]

    def head(self, step, env, t) -> np.ndarray:
        p = self.p
        if step.get("norm"):  # DenseNet: final BN + ReLU before the pool (not linear: from the map)
            x = self.f(env, t)
            self.maps.append(("pool", x.shape, (x.shape[0], 1, 1)))
            x = np.maximum(x * p[f"{step['norm']}.scale"][:, None, None] + p[f"{step['norm']}.shift"][:, None, None], 0)
            return p[f"{step['prefix']}.weight"] @ x.mean(axis=(1, 2)) + p[f"{step['prefix']}.bias"]
        return p[f"{step['prefix']}.weight"] @ self.mean(env, t) + p[f"{step['prefix']}.bias"]


class _BlockBuffers:
    """Concatenation without copies (the dataflow's layout, energy_models/engines/ddi_engine.yaml):
    the features of a dense block live in one CHW buffer, each written once at its channel offset
    when first concatenated; a concatenation is a view of the buffer's first channels. Buffers are
    keyed by the first tensor of the chain (the block input) and sized from the manifest."""

    def __init__(self, bundle):
        shapes = {n: t.get("shape") for n, t in bundle.manifest["tensors"].items()}
        self.size: dict[str, int] = {}
        for st in bundle.program:
            if st["op"] == "concat":
                n = sum(shapes[t][0] for t in st["in"])
                self.size[st["in"][0]] = max(self.size.get(st["in"][0], 0), n)
        self.bufs: dict[str, tuple[np.ndarray, list[str]]] = {}
        self.parts: dict[str, list[str]] = {}  # concatenation -> the tensors it is made of

    def concat(self, env, names: list[str], out: str) -> np.ndarray:
        first = env[names[0]]
        if names[0] not in self.bufs:
            self.bufs[names[0]] = (np.empty((self.size[names[0]], *first.shape[1:]), np.int16), [])
        buf, placed = self.bufs[names[0]]
        if names[:len(placed)] != placed[:len(names)]:
            raise UserError(f"concatenation of {names} does not extend its block's features {placed}; "
                            "re-export the bundle")
        c = sum(env[t].shape[0] for t in placed)
        for t in names[len(placed):]:  # the features not yet in the buffer, written once
            buf[c:c + env[t].shape[0]] = env[t]
            c += env[t].shape[0]
            placed.append(t)
        self.parts[out] = list(names)
        return buf[:sum(env[t].shape[0] for t in names)]


class _Budget:
    """One image's decisions as the cost plan's (1, J) arrays, read by the budget rule
    (`ddi_hw.deploy.budget`, the model's own) and by the executed cost."""

    def __init__(self, plan: dict, budget: float | None):
        self.plan = BudgetPlan(plan)
        self.L = np.ones((1, self.plan.J))
        self.k = self.plan.K[None].astype(np.float64).copy()
        self.walk = BudgetWalk(self.plan, budget, self.L, self.k) if budget is not None else None

    def cost(self, stop_col: int | None = None, stage: int = 0, ran: np.ndarray | None = None) -> float:
        """Executed cost of the events before `stop_col` (None: all), plus the gates of the block
        there when stage > 0; the exit branches `ran` ((1, exits) bool; None: none)."""
        col = self.plan.S if stop_col is None else stop_col
        return float(self.plan.charged(self.L, self.k, np.array([col]), np.array([stage]), ran)[0])


def static_iterations(bundle) -> int:
    """Engine iterations of the static network: every backbone launch (stem, transitions, every
    block's convs) with all channels on; no gate convs, no exits. The reference of the iteration
    saving, the same network the cost table's saving is measured against (`static_cost`)."""
    return sum(int(st.get("dense_iterations") or 0) for st in bundle.program)


def static_cost(plan: dict | None) -> float | None:
    """The cost plan's static network (`ddi_hw.models.base.CostPlan.dense_cost`): every fixed
    event and every block with all channels, no gates, no exits."""
    if not plan:
        return None
    return sum(e["cost"] if e["kind"] == "fixed" else e["f"] + e["V"][-1] if e["kind"] == "block" else 0.0
               for e in plan["events"])


def run_image(bundle, image: np.ndarray, backend: Backend, exit_at: int | None = None,
              budget: float | None = None) -> ImageResult:
    """One normalised (3, H, W) float image through the bundle's program.

    Steps: `input` quantises the image; `conv` launches the engine; `block` opens a residual block
    or dense layer (its `layer_gate` may skip it: nothing is launched, the output is the input, or
    the previous layer's features copied into its slot); `channel_gate` sets the masks of the block's
    convs; `concat` / `avgpool2` are integer processor ops; `exit` runs an exit branch when `exit_at`
    names it (the image stops there) or, under a `budget` (in the cost plan's metric, FLOPs), when the
    image may need it (the fallback answer; not when it is sure to reach the next exit); `head` pools
    and classifies. Under a budget the image stops where the rule of `ddi_hw.deploy.budget` says (at
    an exit, or in a block before its channel gate or its convs), answers with its last exit branch
    and is charged all it ran (`cost`). `exit_at` overrides a budget."""
    res = ImageResult(logits=np.zeros(0), dense_iterations=static_iterations(bundle))  # also if it exits early
    layout = _BlockBuffers(bundle)
    proc, env = _Processor(bundle, res.processor_maps, layout), {}
    masks: dict[str, np.ndarray] = {}
    plan = bundle.manifest.get("cost_plan")
    if budget is not None and (plan is None or not any(e["kind"] == "exit" for e in plan["events"])):
        raise UserError("a budget needs a bundle exported from a model with exit branches")
    bud = _Budget(plan, None if exit_at is not None else budget) if plan else None
    walk = bud.walk if bud else None
    fallback = None

    def stop() -> ImageResult:  # the budget stopped the image: it answers with its last exit branch
        res.logits, res.exit_taken = fallback
        res.cost = bud.cost(int(walk.stop_col[0]), int(walk.stage[0]), walk.ran)
        return res

    prog = bundle.program
    i = 0
    while i < len(prog):
        st = prog[i]
        op = st["op"]
        if op == "input":
            env[st["out"]] = quantize(image, bundle.tensor_frac(st["out"]))
        elif op == "block":
            j = st["index"]
            run = True
            if st.get("layer_gate"):
                run = bool(proc.gate(st["layer_gate"], env, st["in"], backend, res)[0])
            if bud:
                bud.L[0, j] = int(run)
            if run and walk and not walk.admit(j, np.array([0]), GATES_ONLY)[0]:
                res.stopped_block = j
                return stop()
            if st.get("channel_gate") and run:
                cg = st["channel_gate"]
                masks[cg["name"]] = proc.gate(cg, env, st["in"], backend, res)
                res.channel_masks[cg["name"]] = masks[cg["name"]]
                if bud:
                    bud.k[0, j] = int(masks[cg["name"]].sum())
                if walk and not walk.admit(j, np.array([0]), GATES_AND_CHANNEL_GATE)[0]:
                    res.stopped_block, res.stopped_after_channel_gate = j, True
                    return stop()
            res.block_run.append(int(run))
            if not run:  # skipped block: nothing launched; output = input (ResNet: its pooled sums,
                src = st.get("skip_from") or st["in"]  # if a conv wrote them, serve the next gate) or
                env[st["out"]] = env[src]  # the previous layer's features (DenseNet), which the
                if st.get("skip_from"):  # processor copies into this layer's slot of the block buffer
                    res.processor_maps.append(("copy", env[src].shape, env[src].shape))  # (`concat`)
                if src in proc.pooled:
                    proc.pooled[st["out"]] = proc.pooled[src]
                i = st["end"]
                continue
        elif op == "conv":
            layer = bundle.layers[st["layer"]]
            om = masks.get(st["out_gate"]) if st.get("out_gate") else None
            im = masks.get(st["in_gate"]) if st.get("in_gate") else None
            r = backend.run_layer(layer, env[st["in"]], env[st["residual"]] if st.get("residual") else None, om, im)
            env[st["out"]] = r.output
            if r.pooled is not None:
                proc.pooled[st["out"]] = r.pooled
            res.launches += 1
            res.iterations += r.iterations or 0
        elif op == "concat":  # channel concatenation (same Q format by construction)
            env[st["out"]] = layout.concat(env, st["in"], st["out"])
        elif op == "avgpool2":  # 2x2 average pool in integers: (sum + 2) >> 2, round half up
            a = env[st["in"]].astype(np.int32)
            c, h, w = a.shape
            a = a[:, : h // 2 * 2, : w // 2 * 2].reshape(c, h // 2, 2, w // 2, 2).sum(axis=(2, 4))
            env[st["out"]] = ((a + 2) >> 2).astype(np.int16)
            res.processor_maps.append(("avgpool2", (c, h, w), env[st["out"]].shape))
        elif op == "exit":
            if exit_at is not None and st["index"] == exit_at:  # the events before it, no other branch
                res.logits, res.exit_taken = proc.exit_branch(st, env, backend, res), st["index"]
                res.stopped_at = st["index"]
                if bud:
                    col = bud.plan.exit_col[st["index"]]
                    res.cost = bud.cost(col) + bud.plan.cost[col]
                return res
            if walk:  # the branch runs if the image may need it (its fallback from now on)
                if walk.at_exit(st["index"])[0]:
                    fallback = (proc.exit_branch(st, env, backend, res), st["index"])
                if not walk.alive[0]:
                    res.stopped_at = st["index"]
                    return stop()
        elif op == "head":
            res.logits = proc.head(st, env, st["in"])
        i += 1
    if bud:  # (under a budget the head is reached only when the whole path fits)
        res.cost = bud.cost(ran=walk.ran if walk else None)
    return res


def run_images(bundle, images: np.ndarray, labels: np.ndarray, backend: Backend, exit_at: int | None = None,
               budget: float | None = None, float_predictions: np.ndarray | None = None,
               progress: bool = True) -> list[dict]:
    """Run normalised images (N, 3, H, W) through the bundle; one row (dict) per image."""
    rows = []
    progress = progress and sys.stderr.isatty()
    backend.prepare(bundle)
    for i, (img, y) in enumerate(zip(images, labels)):
        r = run_image(bundle, np.asarray(img, dtype=np.float32), backend, exit_at=exit_at, budget=budget)
        row = {"index": i, "label": int(y), "prediction": r.prediction, "exit_taken": r.exit_taken,
               "blocks_run": sum(r.block_run), "blocks": len(r.block_run), "launches": r.launches,
               "iterations": r.iterations, "dense_iterations": r.dense_iterations, "cost": r.cost}
        if float_predictions is not None:
            row["float_prediction"] = int(float_predictions[i])
        rows.append(row)
        if progress:
            print(f"\r{backend.name}: {i + 1}/{len(images)} images", end="", file=sys.stderr, flush=True)
    if progress and len(images):
        print(file=sys.stderr)
    return rows


def rows_csv(rows: list[dict]) -> str:
    """CSV text of run_images rows (header = the first row's keys)."""
    import csv
    import io

    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def summarize(rows: list[dict], static: float | None = None) -> dict:
    """Accuracy, savings and float agreement of run_images rows. Both savings are 1 - executed /
    static network, gates counted as executed: `engine_iteration_saving` in engine iterations
    (cycle proxy; gates on the processor cost the engine nothing), `cost_saving` in the cost plan's
    metric (the table's saving for these images; `static` = `static_cost(plan)`)."""
    n = max(len(rows), 1)

    def mean(f):
        return sum(f(r) for r in rows) / n

    dense = sum(r["dense_iterations"] for r in rows)
    out = {"images": len(rows), "accuracy": mean(lambda r: r["prediction"] == r["label"]),
           "mean_blocks_run": mean(lambda r: r["blocks_run"]), "mean_cost": mean(lambda r: r["cost"]),
           "engine_iteration_saving": 1 - sum(r["iterations"] for r in rows) / dense if dense else 0.0}
    if static:
        out["cost_saving"] = 1 - out["mean_cost"] / static
    if rows and "float_prediction" in rows[0]:
        out["float_accuracy"] = mean(lambda r: r["float_prediction"] == r["label"])
        out["accuracy_drop"] = out["float_accuracy"] - out["accuracy"]
        out["agreement_with_float"] = mean(lambda r: r["float_prediction"] == r["prediction"])
    return {k: float(v) if k != "images" else v for k, v in out.items()}

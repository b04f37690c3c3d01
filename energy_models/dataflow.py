"""What runs where: the engine's dataflow (energy_models/engines/ddi_engine.yaml) applied to the
traced layer specs, so the cost table costs the operations and memory traffic the deployed
engine and driver perform, not one pass per traced op.

Placement of every spec (`place`), in execution order:
- `conv`          a backbone or exit-branch conv on a feature map: one engine launch, SCALE-Sim. An
                  exit branch's last conv, whose only consumer is its global pool, never writes
                  its ofmap (FLAG_NO_STORE), like a gate's.
- `gate_conv`     a gate's conv on a feature map (the CNN channel gate's conv, the DenseNet light
                  gate's two convs): an engine launch; if its only consumer is a global pool, its
                  ofmap is never written (FLAG_NO_STORE).
- `residual_add`  fused into the conv that ran just before it in its block (FLAG_RESIDUAL): the
                  residual is read once per output word in that conv's STORE loop, nothing else.
- `global_pool`   fused into the conv that produced exactly its input (same channels and size:
                  FLAG_POOL): sums accumulated in STORE, one int32 per channel written after the
                  ofmap; the feature map is not read again. The pool's row prices what its consumer
                  does: the processor reads the sums (2 words per channel). The engine's part is a
                  `sums` row of the producing conv (below): a pool whose producer did not run this
                  time (a skipped ResNet block: the next gate reads the sums of the block's input,
                  written by an earlier conv) costs only that read.
- `sums`          (no traced op) the pooled sums one FLAG_POOL launch accumulates and writes, once
                  however many pools read them: the adds, 2 words per channel, the WRITE_POOL loop.
                  Named `<conv>.sums`, in the conv's block and gates, so it is paid exactly when
                  that launch runs; its role is "gate" (with the first reader's gate kind) when
                  only gates read the sums (the static network would not write them), else the conv's.
- `copy`          (no traced op) the features of a skipped layer whose output is the previous
                  layer's (`LayerSpec.skip == "copy"`, DenseNet): the processor copies the k maps
                  into the layer's slot of the block buffer (each word read and written once over
                  DRAM, one op per word on the processor, no arithmetic: 0 MACs). Named
                  `<block>.skip_copy`, paid only when the layer is skipped (the cost plan's
                  skip-only term).
- `processor_map` a pool the processor runs on a map in DRAM: a global pool whose input no single
                  conv produced (DenseNet: the head's BN + ReLU + pool over the last concatenation,
                  the gates' pools over a concatenation or a transition's output) and every non-global
                  pool (DenseNet transitions' 2x2 average pools, an exit branch's max pool: one
                  2^k x 2^k pass, the k 2x2 halvings it equals; the engine has no pooling unit).
                  The ARM reads the map once from DRAM and writes a result map back (a global
                  pool's vector stays in its cache); time = ops / `proc_macs_per_s`. A gate's
                  pool over a concatenation keeps the channel sums it already has (`reuse`: those
                  of the previous gate pool over a map of the same size, a prefix of the same dense
                  block's features) and reads only the channels added since. On a preset without a
                  processor: an analytic row on the array, as `other`.
- `vector`        a layer on a pooled vector (gate 1x1 embeddings, LSTM cells, gate FCs, the exit
                  branches' and the head's classifiers): on the host processor when the preset has
                  one (time only: its power is the preset's board power), else on the array (SCALE-Sim).
- `other`         everything else as traced (an add no conv can take): analytic rows.
Concatenation has no row: a dense block's features are one DRAM buffer in CHW layout, each
producer writes its channels at their offset and a consumer reads a prefix, so nothing is copied
(the runner does the same: `ddi_hw.deploy.backends`, `concat`) -- except a skipped layer's slot
(`copy`). `table_specs` lists every row's spec, the traced ones and the `sums` / `copy` ones.
The `source` column of the table says which rule costed a row.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

WORDS_PER_POOLED = 2  # one int32 per channel = two 16-bit words
SUMS_SUFFIX, COPY_SUFFIX = ".sums", ".skip_copy"  # the rows with no traced op (`table_specs`)
COPY_SOURCE = "skipped-layer copy"


@dataclass(frozen=True)
class Placement:
    op: str  # conv | gate_conv | residual_add | global_pool | sums | copy | processor_map | vector | other
    fused_into: str = ""  # the engine launch this op happens inside (residual_add, global_pool)
    store: bool = True  # a gate / exit conv: False when only its pooled sums are used
    reuse: int = 0  # processor_map of a gate pool: leading channels whose sums the processor has


def _is_vector(s) -> bool:
    return s.kind == "linear" or (s.kind == "conv" and s.in_h * s.in_w == 1)


def place(specs) -> dict[str, Placement]:
    """Placement of every spec by name (rules in the module docstring)."""
    out: dict[str, Placement] = {}
    pooled_producers = set()
    for i, s in enumerate(specs):
        if s.kind in ("conv", "linear"):
            if _is_vector(s):
                out[s.name] = Placement("vector")
            else:
                out[s.name] = Placement("gate_conv" if s.role == "gate" else "conv")
        elif s.kind == "add":
            prod = next((p.name for p in reversed(specs[:i]) if p.kind == "conv"
                         and p.role == "backbone" and p.block == s.block and not _is_vector(p)), None)
            out[s.name] = Placement("residual_add", prod) if prod else Placement("other")
        elif s.kind == "pool" and s.out_h * s.out_w == 1:
            prod = _pool_producer(specs, i)
            if prod is None:
                out[s.name] = Placement("processor_map", reuse=_reused_sums(specs, i, out))
            else:
                out[s.name] = Placement("global_pool", prod)
                pooled_producers.add(prod)
        elif s.kind == "pool":  # a 2x2 pool of the backbone or an exit branch
            out[s.name] = Placement("processor_map")
        else:
            out[s.name] = Placement("other")
    branch = {s.name for s in specs if s.role in ("gate", "exit")}
    for name, p in out.items():
        if p.op in ("conv", "gate_conv") and name in pooled_producers and name in branch:
            # a gate's / exit's last conv: no consumer but its pool, never written (FLAG_NO_STORE)
            out[name] = Placement(p.op, store=False)
    return out


def table_specs(specs) -> list[tuple]:
    """(spec, placement) of every cost-table row in execution order: the traced specs, a `sums`
    spec right after each conv that writes pooled sums (FLAG_POOL; its channels, block and gates; role
    "gate" when only gates read them, else its role), and a `copy` spec after each layer whose skip
    is a copy (`skip == "copy"`; k maps of its output's size, its block and layer gate, no channel
    gate)."""
    where = place(specs)
    readers: dict[str, list] = {}
    for s in specs:
        if where[s.name].op == "global_pool":
            readers.setdefault(where[s.name].fused_into, []).append(s)
    out = []
    for s in specs:
        out.append((s, where[s.name]))
        if s.name in readers:
            gates = [r for r in readers[s.name] if r.role == "gate"]
            role, kind = ("gate", gates[0].gate_kind) if len(gates) == len(readers[s.name]) else (s.role, s.gate_kind)
            out.append((replace(s, name=s.name + SUMS_SUFFIX, kind="sums", in_ch=s.out_ch, in_h=s.out_h,
                                in_w=s.out_w, kernel_h=1, kernel_w=1, stride=1, padding=0, groups=1,
                                in_gate=None, skip=None, role=role, gate_kind=kind), Placement("sums", s.name)))
        if s.skip == "copy":
            out.append((replace(s, name=s.block + COPY_SUFFIX, kind="copy", in_ch=s.out_ch, in_h=s.out_h,
                                in_w=s.out_w, kernel_h=1, kernel_w=1, stride=1, padding=0, groups=1,
                                out_gate=None, in_gate=None, skip=None), Placement("copy")))
    return out


def row_macs(spec, p: Placement, axis: str, active: int) -> int:
    """MACs of a row (FLOPs = 2 x MACs, the same rule for the FLOPs-only table and every preset):
    the traced count, except a global pool's row (its adds are the producing launch's: `sums`) and a
    skipped layer's copy (no arithmetic)."""
    if p.op in ("global_pool", "copy"):
        return 0
    if p.op == "sums":
        return spec.out_h * spec.out_w * active
    return spec.macs_at(active, spec.in_ch) if axis == "out" else spec.macs_at(spec.out_ch, active)


def _pool_producer(specs, i) -> str | None:
    """The conv whose output a global pool reads: a conv of the same gate or exit module (a channel
    gate or an exit branch pools its own last conv), else the last feature-map conv of the backbone before it -- only if
    that conv's output is exactly the pooled tensor (same channels and size). Otherwise (a
    concatenation, a map pooled or normalised after the conv) no launch can write the sums."""
    s = specs[i]
    owner = s.name.rsplit(".pool", 1)[0]
    prod = next((p for p in reversed(specs[:i]) if p.kind == "conv" and not _is_vector(p)
                 and p.name.startswith(owner + ".")), None)
    if prod is None:
        prod = next((p for p in reversed(specs[:i]) if p.kind == "conv" and not _is_vector(p)
                     and p.role == "backbone"), None)
    if prod is None or (prod.out_ch, prod.out_h, prod.out_w) != (s.in_ch, s.in_h, s.in_w):
        return None
    return prod.name


def _reused_sums(specs, i, placed) -> int:
    """Channels of a gate pool's input whose sums the processor already holds: the input of the
    previous gate pool over features of the same size (pooled by the processor or fused into a
    backbone conv; not a gate's pool of its own conv), if this input extends it (a DenseNet
    concatenation grows by appending channels). 0 for a backbone pool (the DenseNet head pools
    after BN + ReLU, per element: no sums to reuse)."""
    s = specs[i]
    if s.role != "gate":
        return 0
    for p in reversed(specs[:i]):
        q = placed.get(p.name)
        if p.kind != "pool" or p.role != "gate" or p.out_h * p.out_w != 1 or (p.in_h, p.in_w) != (s.in_h, s.in_w):
            continue
        if q.op == "global_pool" and not _backbone_producer(specs, q.fused_into):
            continue  # a gate's pool of its own conv (the light gate's), not of the features
        return p.in_ch if p.in_ch <= s.in_ch else 0
    return 0


def _backbone_producer(specs, name: str) -> bool:
    return any(p.name == name and p.role == "backbone" for p in specs)


def fused_counts(spec, p: Placement, active: int) -> dict:
    """Counts of a fused op with `active` channels (words are 16-bit)."""
    from energy_models.scalesim_runner import COUNT_COLUMNS

    c = dict.fromkeys(COUNT_COLUMNS, 0)
    if p.op == "residual_add":
        words = spec.out_h * spec.out_w * active
        c.update(macs=words, dram_reads_ifmap=words)  # the adds; the residual read in STORE
    elif p.op == "global_pool":  # its consumer's part: the processor reads the sums
        c.update(dram_reads_ifmap=WORDS_PER_POOLED * active)
    elif p.op == "sums":  # the producing launch's part
        c.update(macs=row_macs(spec, p, "out", active),  # the sums, in STORE
                 dram_writes_ofmap=WORDS_PER_POOLED * active,  # written after the ofmap
                 cycles=WORDS_PER_POOLED * active)  # the WRITE_POOL loop (II=2 per channel)
    else:
        raise ValueError(f"{p.op} is not a fused op")
    return c


def processor_counts(spec, p: Placement, active: int) -> dict:
    """Counts of a `processor_map` op with `active` channels: one op per element read, the map
    read once from DRAM (only the channels past `p.reuse`), a pooled map written back for the
    engine (a global pool's vector stays in the processor's cache). `macs` stays the traced count,
    so FLOPs are the same on every preset; the processor's time is charged for the elements read."""
    from energy_models.scalesim_runner import COUNT_COLUMNS

    c = dict.fromkeys(COUNT_COLUMNS, 0)
    out_words = spec.out_h * spec.out_w * active if spec.out_h * spec.out_w > 1 else 0
    c.update(macs=spec.macs_at(active, active), dram_reads_ifmap=spec.in_h * spec.in_w * max(0, active - p.reuse),
             dram_writes_ofmap=out_words)
    return c


def copy_counts(spec, active: int, array_cols: int, on_processor: bool) -> dict:
    """Counts of a skipped layer's copy of `active` maps: each word read and written once over DRAM,
    no MACs; on a preset without a processor, through SRAM on the array's lanes (like `other`).
    Processor time (one op per word read) is the caller's, as for `processor_map`."""
    import math

    from energy_models.scalesim_runner import COUNT_COLUMNS

    words = spec.out_h * spec.out_w * active
    c = dict.fromkeys(COUNT_COLUMNS, 0)
    c.update(dram_reads_ifmap=words, dram_writes_ofmap=words)
    if not on_processor:
        c.update(sram_reads_ifmap=words, sram_writes_ofmap=words, cycles=math.ceil(words / array_cols))
    return c


def source_label(p: Placement, on_processor: bool) -> str:
    if p.op == "copy":
        return f"{'processor' if on_processor else 'analytic'}, {COPY_SOURCE}"
    if p.op in ("residual_add", "global_pool", "sums"):
        return f"fused into {p.fused_into}"
    if p.op in ("conv", "gate_conv") and not p.store:
        return "scalesim, ofmap not stored"
    if p.op in ("vector", "processor_map") and on_processor:
        return "processor"
    if p.op in ("other", "processor_map"):
        return "analytic"
    return "scalesim"


def launch_flags(specs) -> dict[str, dict]:
    """Engine flags of every engine launch (conv spec name -> LayerParams fields), from the same
    placement the cost table uses, for the exporter: `pool` (FLAG_POOL) on the producer of a
    global pool, `store=False` (FLAG_NO_STORE) on a gate / exit conv only its pool reads, and
    `zero_masked=False` (FLAG_NO_ZERO) on an output-gated conv whose consumer reads the same
    channels through its input mask (the zeros would never be read)."""
    where = place(specs)
    in_gates = {s.in_gate for s in specs if s.in_gate}
    flags: dict[str, dict] = {}
    for s in specs:
        p = where[s.name]
        if p.op in ("residual_add", "global_pool") and p.fused_into:
            if p.op == "global_pool":
                flags.setdefault(p.fused_into, {})["pool"] = True
        if p.op in ("conv", "gate_conv") and s.kind == "conv":
            f = flags.setdefault(s.name, {})
            if not p.store:
                f["store"] = False
            if s.out_gate and s.out_gate in in_gates:
                f["zero_masked"] = False
    return flags


def launch_counts(df, layer: str, axis: str, active: int) -> dict:
    """What the cost table says one engine launch costs: its conv row at (axis, active) plus the
    rows fused into it (residual add: the residual read; its `sums` row: the pooled words the engine
    writes -- a global pool's own row, the processor's read of them, is not engine traffic), for
    comparison with the C-simulated engine's counters. Words are 16-bit."""
    conv = df[(df.layer == layer) & (df.axis == axis) & (df.active == active)]
    if len(conv) != 1:
        raise ValueError(f"no single table row for {layer} {axis}={active}")
    r = conv.iloc[0]
    out_active = active if axis == "out" else int(r.out_ch)
    dram = int(r.dram_reads_ifmap + r.dram_reads_filter + r.dram_writes_ofmap)
    cycles = int(r.cycles)
    if "fused_into" in df:
        fused = df[(df.fused_into == layer) & (df.axis == "out") & (df.active == out_active)]
        for _, f in fused.iterrows():
            cycles += int(f.cycles)
            dram += int(f.dram_reads_ifmap) if f.kind == "add" else int(f.dram_writes_ofmap)
    return {"cycles": cycles, "dram_words": dram, "macs": int(r.macs)}

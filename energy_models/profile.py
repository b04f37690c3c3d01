"""`profile_model`: any PyTorch CNN -> layer specs -> SCALE-Sim counts -> Eq. 6 cost table.

One row per (layer, axis, active) as in docs/CONTRACTS.md: axis "out" sweeps active output
channels 0..out_ch for every layer, axis "in" sweeps active input channels 0..in_ch for layers
whose input channels are gated (`in_gate`). What each row costs follows the engine's dataflow
(energy_models/dataflow.py): conv rows are simulated by SCALE-Sim (`source` "scalesim", or
"scalesim, ofmap not stored" for a gate conv whose only consumer is its pool); residual adds and
global pools are fused into the conv that produces their input ("fused into <layer>", named in
`fused_into`: a pool's own row is its consumer's read of the sums, the conv's `<conv>.sums` row the
engine's accumulate and write); layers on pooled vectors and pools of maps the engine cannot fuse
run on the preset's processor if it has one ("processor"); other pools are analytic ("analytic");
a skipped DenseNet layer's copy of the previous layer's features is `<layer>.skip_copy`
("processor, skipped-layer copy"). The rows with no traced op: `dataflow.table_specs`.
"""
from __future__ import annotations

import pandas as pd

from energy_models.dataflow import (
    copy_counts,
    fused_counts,
    place,
    processor_counts,
    row_macs,
    source_label,
    table_specs,
)
from energy_models.energy import add_energy, analytic_counts
from energy_models.errors import UserError
from energy_models.presets import DATAFLOWS, DEFAULT_PRESET, load_preset
from energy_models.scalesim_runner import COUNT_COLUMNS, SimLayer, run_sweeps, sim_fields
from energy_models.specs import LayerSpec, extract_specs

SPEC_COLUMNS = ("layer", "kind", "block", "role", "out_gate", "in_gate", "layer_gate", "gate_kind", "in_ch",
                "out_ch", "in_h", "in_w", "out_h", "out_w", "kernel_h", "kernel_w", "stride",
                "padding", "groups")


def sim_layer(spec: LayerSpec) -> SimLayer:
    """The (per-group) layer SCALE-Sim simulates for a conv/linear spec."""
    ih, iw = spec.sim_input_hw()
    return SimLayer(ifmap_h=ih, ifmap_w=iw, kernel_h=spec.kernel_h, kernel_w=spec.kernel_w,
                    channels=spec.in_ch // spec.groups, filters=spec.out_ch // spec.groups,
                    stride=spec.stride)


def tile_requests(spec: LayerSpec, eng) -> list:
    """SCALE-Sim requests of an engine-tiled conv (see `Engine.simulator_fields`): per row-tile
    shape, tiles of TILE_OUT filters (and of out_ch % TILE_OUT for axis in), for the active counts
    and for the lane-padded counts the engine's loops take cycles for (`tiled_counts`)."""
    to, ti = eng.constants["TILE_OUT"], eng.constants["TILE_IN"]
    reqs = []
    for layer, _n, _valid in _tile_layers(spec, eng):
        for axis, n in axes(spec):
            if axis == "out":
                reqs.append((layer, "out", list(range(1, min(to, n) + 1)), 1))
                cpad = -(-spec.in_ch // ti) * ti
                if cpad != spec.in_ch or spec.out_ch < to:  # the idle lanes of a partial tile
                    reqs.append((_lane_padded(layer, cpad, to), "out", [to], 1))
            else:
                for f in {min(to, spec.out_ch), spec.out_ch % to, to} - {0}:
                    reqs.append((layer.with_active("out", f), "in",
                                 list(range(1, -(-n // ti) * ti + 1)), 1))
    return reqs


def _lane_padded(layer, cpad: int, to: int):
    """The tile the engine's loops iterate over: TILE_IN-padded input channels, TILE_OUT filter
    slots (also when the layer has fewer output channels than one tile)."""
    return layer.with_active("in", cpad).with_active("out", to)


def _tile_layers(spec, eng):
    to = eng.constants["TILE_OUT"]
    iw = (spec.out_w - 1) * spec.stride + spec.kernel_w
    return [(SimLayer(ifmap_h=ir, ifmap_w=iw, kernel_h=spec.kernel_h, kernel_w=spec.kernel_w,
                      channels=spec.in_ch, filters=min(to, spec.out_ch), stride=spec.stride), n, valid)
            for ir, n, valid in eng.row_tiles(spec)]


def tiled_counts(spec: LayerSpec, eng, axis: str, active: int, counts: dict) -> dict:
    """Counts of one engine launch with `active` channels on `axis`, summed over its tiles as the
    engine runs them: row tiles x output-channel tiles (full tiles of TILE_OUT plus one partial),
    each simulated by SCALE-Sim.
    - Accesses and MACs: the active channels; input reads scaled by the share of the slab inside
      the image (the padding is made on chip, not fetched).
    - Cycles: SCALE-Sim's compute cycles plus the un-overlapped loads and stores
      (`Engine.transfer_cycles`), both at the lane-padded tile the engine's loops iterate over:
      a partial output tile still loads TILE_OUT filters' weight slots, a partial input tile
      TILE_IN channels of slab (padding positions included), and its MAC loop takes as long."""
    to, ti = eng.constants["TILE_OUT"], eng.constants["TILE_IN"]
    cpad = -(-spec.in_ch // ti) * ti
    tot = dict.fromkeys(COUNT_COLUMNS, 0.0)
    lanes = dict(cycles=0, words=0)
    for layer, n, valid in _tile_layers(spec, eng):
        if axis == "out":
            parts = [(active // to, layer, "out", to, to), (1, layer, "out", active % to, to)]
        else:
            pin = -(-active // ti) * ti
            parts = [(spec.out_ch // to, layer.with_active("out", to), "in", active, pin),
                     (1, layer.with_active("out", spec.out_ch % to), "in", active, pin)]
        for mult, lay, ax, act, pad_act in parts:
            if not (mult and act and lay.filters):
                continue
            r = counts[(lay, ax, 1)][act]
            for col in COUNT_COLUMNS:
                tot[col] += mult * n * (r[col] * valid if col == "dram_reads_ifmap" else r[col])
            if ax == "out":  # lane-padded: TILE_OUT filter slots, input channels up to TILE_IN lanes
                rp = counts[(_lane_padded(lay, cpad, to), "out", 1)][pad_act]
            else:  # lane-padded input channels, TILE_OUT filter slots
                rp = counts[(lay.with_active("out", to), "in", 1)][pad_act]
            lanes["cycles"] += mult * n * rp["cycles"]
            lanes["words"] += mult * n * (rp["dram_reads_ifmap"] + rp["dram_reads_filter"]
                                          + r["dram_writes_ofmap"])  # stores: only real outputs
    tot = {k: int(round(v)) for k, v in tot.items()}
    tot["cycles"] = int(lanes["cycles"]) + eng.transfer_cycles(lanes["words"])
    return tot


def axes(spec: LayerSpec) -> list[tuple[str, int]]:
    out = [("out", spec.out_ch)]
    if spec.in_gate:
        out.append(("in", spec.in_ch))
    return out


def profile_specs(specs, hardware=DEFAULT_PRESET, dataflow: str | None = None, cache_dir=None,
                  jobs: int | None = None, progress=True) -> pd.DataFrame:
    """Cost table for already extracted specs (see `profile_model`)."""
    preset = load_preset(hardware)
    dataflow = dataflow or preset.dataflow
    if dataflow not in DATAFLOWS:
        raise UserError(f"unknown dataflow '{dataflow}'; choose one of {', '.join(DATAFLOWS)}")
    sim = sim_fields(preset, dataflow)
    rows_of = table_specs(specs)
    where = {s.name: p for s, p in rows_of}
    on_proc = preset.proc_macs_per_s is not None
    eng = None
    if preset.engine is not None:
        from energy_models.engine import load_engine
        eng = load_engine(preset.engine)

    def simulated(s):
        return _simulated(where[s.name], on_proc)

    def tiled(s):  # an engine launch, simulated tile by tile as the engine runs it
        return eng is not None and s.kind == "conv" and s.groups == 1 and \
            where[s.name].op in ("conv", "gate_conv")

    requests = []
    for s in specs:
        if tiled(s):
            requests += tile_requests(s, eng)
        elif simulated(s):
            requests += [(sim_layer(s), axis, list(range(1, n + 1)), s.groups) for axis, n in axes(s)]
    counts = _run(requests, sim, cache_dir, jobs, progress)
    rows = []
    for s, p in rows_of:
        spec_cols = s.as_dict()
        spec_cols["layer"] = spec_cols.pop("name")
        for axis, n in axes(s):
            for active in range(n + 1):
                proc_s = 0.0
                if tiled(s):
                    c = tiled_counts(s, eng, axis, active, counts)
                    if not p.store:  # FLAG_NO_STORE: only the pooled sums leave (the STORE
                        c["dram_writes_ofmap"] = 0  # loop still runs: it accumulates them)
                elif simulated(s):
                    c = (dict(counts[(sim_layer(s), axis, s.groups)][active]) if active
                         else dict.fromkeys(COUNT_COLUMNS, 0))
                    if not p.store:
                        c["dram_writes_ofmap"] = 0  # FLAG_NO_STORE: only the pooled sums leave
                elif p.op == "vector":
                    c = dict.fromkeys(COUNT_COLUMNS, 0)
                    c["macs"] = row_macs(s, p, axis, active)
                    proc_s = c["macs"] / preset.proc_macs_per_s
                elif p.op in ("residual_add", "global_pool", "sums"):
                    c = fused_counts(s, p, active)
                elif p.op == "copy":
                    c = copy_counts(s, active, preset.array_cols, on_proc)
                    if on_proc:  # one op per word read, as the processor's other map ops
                        proc_s = c["dram_reads_ifmap"] / preset.proc_macs_per_s
                elif p.op == "processor_map" and on_proc:
                    c = processor_counts(s, p, active)
                    proc_s = c["dram_reads_ifmap"] / preset.proc_macs_per_s  # one op per element read
                else:
                    c = analytic_counts(s, axis, active, preset.array_cols)
                rows.append({**spec_cols, "axis": axis, "active": active, **c, "proc_s": proc_s,
                             "source": source_label(p, on_proc), "fused_into": p.fused_into})
    df = pd.DataFrame(rows)
    df = df[list(SPEC_COLUMNS) + ["axis", "active", *COUNT_COLUMNS, "proc_s", "source",
                                  "fused_into"]]
    df = add_energy(df, preset, dataflow)
    df["hardware"] = preset.name
    df["dataflow"] = dataflow
    return df


def _simulated(p, on_proc: bool) -> bool:
    return p.op in ("conv", "gate_conv") or (p.op == "vector" and not on_proc)


def scalesim_layers(specs, hardware=DEFAULT_PRESET) -> list[tuple[str, SimLayer, int]]:
    """(name, SimLayer, groups) of every layer the table costs with SCALE-Sim, all channels
    active: what `energy_models.scalesim_files.topology_csv` writes for plain `scalesim`. (On an
    engine preset the table sums the engine's tiles of these layers instead.)"""
    preset = load_preset(hardware)
    where = place(specs)
    return [(s.name, sim_layer(s), s.groups) for s in specs
            if _simulated(where[s.name], preset.proc_macs_per_s is not None)]


def _run(requests, sim, cache_dir, jobs, progress):
    if not progress:
        return run_sweeps(requests, sim, cache_dir=cache_dir, jobs=jobs)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("SCALE-Sim"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=False) as bar:
        task = bar.add_task("sim", total=None)

        def update(done, total):
            bar.update(task, completed=done, total=total)

        return run_sweeps(requests, sim, cache_dir=cache_dir, jobs=jobs, progress=update)


def profile_model(model, input_shape, hardware=DEFAULT_PRESET, dataflow: str | None = None,
                  cache_dir=None, jobs: int | None = None, progress=True) -> pd.DataFrame:
    """Per-layer, per-active-channel access counts and Eq. 6 energy of `model` on `hardware`
    (a preset name, a YAML path or a `Preset`) with `dataflow` (default: the preset's). SCALE-Sim
    results are cached in `cache_dir` (default `$DDI_HW_CACHE` or ~/.cache/ddi-hw/scalesim) and
    run in `jobs` processes."""
    specs = extract_specs(model, input_shape)
    return profile_specs(specs, hardware, dataflow, cache_dir, jobs, progress)

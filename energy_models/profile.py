"""`profile_model`: any PyTorch CNN -> layer specs -> SCALE-Sim counts -> Eq. 6 cost table.

One row per (layer, axis, active) as in docs/CONTRACTS.md: axis "out" sweeps active output
channels 0..out_ch for every layer, axis "in" sweeps active input channels 0..in_ch for layers
whose input channels are gated (`in_gate`). Conv/linear rows are simulated by SCALE-Sim
(`source` = "scalesim"); pool/add rows are analytic (`source` = "analytic").
"""
from __future__ import annotations

import pandas as pd

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
    requests = [(sim_layer(s), axis, list(range(1, n + 1)), s.groups)
                for s in specs if s.kind in ("conv", "linear") for axis, n in axes(s)]
    counts = _run(requests, sim, cache_dir, jobs, progress)
    rows = []
    for s in specs:
        spec_cols = s.as_dict()
        spec_cols["layer"] = spec_cols.pop("name")
        for axis, n in axes(s):
            for active in range(n + 1):
                if s.kind in ("conv", "linear"):
                    c = (counts[(sim_layer(s), axis, s.groups)][active] if active
                         else dict.fromkeys(COUNT_COLUMNS, 0))
                    source = "scalesim"
                else:
                    c = analytic_counts(s, axis, active, preset.array_cols)
                    source = "analytic"
                rows.append({**spec_cols, "axis": axis, "active": active, **c, "source": source})
    df = pd.DataFrame(rows)
    df = df[list(SPEC_COLUMNS) + ["axis", "active", *COUNT_COLUMNS, "source"]]
    df = add_energy(df, preset, dataflow)
    df["hardware"] = preset.name
    df["dataflow"] = dataflow
    return df


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

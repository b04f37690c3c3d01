"""`ddi-hw profile`: what does a network cost on an accelerator? (simulated: SCALE-Sim + Eq. 6)

Writes the per-(layer, axis, active) cost table as CSV and Parquet, a per-layer energy breakdown
plot and an energy-vs-active-output-channels plot, and prints a summary. Everything is checked
(architecture, preset, output folder) before simulating, and every file is first written to a
temporary name and moved into place only when all of them are ready, so a failure never leaves
a half-written table or destroys an earlier one.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import typer

from ddi_hw.errors import UserError
from ddi_hw.validate import number, safe_name
from energy_models.presets import DEFAULT_PRESET

LEVELS = (("DRAM", "e_dram_pj"), ("SRAM", "e_sram_pj"), ("array/NoC", "e_noc_pj"),
          ("RF", "e_rf_pj"), ("MAC", "e_mac_pj"), ("static", "e_static_pj"), ("board", "e_board_pj"))
MIN_INPUT = 8  # smallest input side every shipped network (three stride-2 stages) still maps to pixels
FILES = ("cost_table.csv", "cost_table.parquet", "energy_per_layer.png", "energy_vs_channels.png")


def profile_command(
    arch: str = typer.Option("resnet74", help="Architecture from ddi_hw.models "
                             "(resnet14/20/26/38/74/110, densenet100, densenet201, ...)."),
    hardware: str = typer.Option(DEFAULT_PRESET, help="Shipped preset (eyeriss-65nm, zedboard), "
                                 "a YAML file copied from one, or a SCALE-Sim .cfg with its energy "
                                 "sidecar <stem>.energy.yaml (docs/SCALESIM.md)."),
    dataflow: Optional[str] = typer.Option(None, help="Systolic dataflow: os, ws or is "
                                           "(default: the preset's)."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default "
                                       "profile_out/<arch>-<hardware>/)."),
    cache_dir: Optional[Path] = typer.Option(None, help="SCALE-Sim result cache (default "
                                             "$DDI_HW_CACHE or ~/.cache/ddi-hw/scalesim)."),
    jobs: Optional[int] = typer.Option(None, callback=number(1, integer=True),
                                       help="Parallel SCALE-Sim processes (default: number of cores)."),
    layer_gates: bool = typer.Option(False, help="Profile the model with its layer gates."),
    channel_gates: bool = typer.Option(False, help="Profile the model with channel gates "
                                       "(adds input-channel sweeps of gated layers)."),
    exits: bool = typer.Option(False, help="Profile the model with its early-exit branches."),
    input_size: Optional[int] = typer.Option(None, callback=number(MIN_INPUT, 4096, integer=True),
                                             help="Input height/width (default: the model's, "
                                             "e.g. 224 for densenet201, 32 for CIFAR nets)."),
    topology_csv: Optional[Path] = typer.Option(None, "--topology-csv",
                                                help="Also write the SCALE-Sim topology CSV of the "
                                                "traced model's simulated layers (inputs padded), "
                                                "to cross-check with plain scalesim."),
) -> None:
    """Profile a network on a systolic-array accelerator: per-layer, per-channel energy table."""
    from energy_models.presets import DATAFLOWS, load_preset

    preset = load_preset(hardware)
    if dataflow is not None and dataflow not in DATAFLOWS:
        raise UserError(f"unknown dataflow '{dataflow}'; choose one of {', '.join(DATAFLOWS)}")
    model = _build(arch, layer_gates, channel_gates, exits, input_size)
    out = out or default_out(arch, preset.name)
    _check_writable(out)
    if topology_csv is not None:
        if topology_csv.is_dir():
            raise UserError(f"--topology-csv {topology_csv} is a folder; give a file name such as "
                            f"{topology_csv / 'topology.csv'}")
        _check_writable(topology_csv.parent if str(topology_csv.parent) else Path("."), "--topology-csv")
    size = model.input_size

    from rich.console import Console

    from energy_models.profile import profile_specs
    from energy_models.specs import extract_specs

    console = Console()
    specs = extract_specs(model, (1, 3, size, size))
    df = profile_specs(specs, preset, dataflow=dataflow or preset.dataflow, cache_dir=cache_dir,
                       jobs=jobs, progress=True)
    _write_all(df, out, preset)
    _summary(console, df, arch, preset, out)
    if topology_csv is not None:
        _write_topology(specs, preset, topology_csv)
        console.print(f"wrote SCALE-Sim topology {topology_csv}")


def _build(arch, layer_gates, channel_gates, exits, input_size):
    try:
        from ddi_hw.models import create_model
    except ImportError as err:
        raise UserError(f"ddi_hw.models is not available ({err}); profile custom models "
                        "from Python with energy_models.profile_model") from None
    return create_model(arch, layer_gates=layer_gates, channel_gates=channel_gates, exits=exits,
                        input_size=input_size)


def default_out(arch: str, hardware: str) -> Path:
    """Where `ddi-hw profile` writes without --out (relative to the working directory)."""
    return Path("profile_out") / safe_name(f"{arch}-{hardware}")  # a preset name is not a path


def _check_writable(out: Path, option: str = "--out") -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".probe"):
            pass
    except OSError as err:
        raise UserError(f"cannot write to output folder {out} ({err.strerror}); "
                        f"choose another with {option}") from None


def _write_topology(specs, preset, path: Path) -> None:
    from energy_models.atomic import atomic_write_text
    from energy_models.profile import scalesim_layers
    from energy_models.scalesim_files import topology_csv

    try:
        atomic_write_text(path, topology_csv(scalesim_layers(specs, preset)))
    except OSError as err:
        raise UserError(f"could not write {path} ({err.strerror}); choose another --topology-csv") from None


def _write_all(df, out: Path, preset) -> None:
    """Write every file under a temporary name, then move them all into place (nothing is
    replaced unless all four were written)."""
    from contextlib import ExitStack

    from energy_models.atomic import atomic_path

    try:
        with ExitStack() as stack:
            tmp = {name: stack.enter_context(atomic_path(out / name, suffix=Path(name).suffix)) for name in FILES}
            df.to_csv(tmp["cost_table.csv"], index=False)
            df.to_parquet(tmp["cost_table.parquet"], index=False)
            plot_energy_per_layer(df, tmp["energy_per_layer.png"], preset)
            plot_energy_vs_channels(df, tmp["energy_vs_channels.png"], preset)
    except OSError as err:
        raise UserError(f"could not write results to {out} ({err.strerror}); nothing was "
                        "replaced") from None


def dense_rows(df):
    """One row per layer: all output channels active (the static network)."""
    return df[(df.axis == "out") & (df.active == df.out_ch)]


def plot_energy_per_layer(df, path, preset) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = dense_rows(df)
    x = range(len(d))
    fig, ax = plt.subplots(figsize=(max(8, len(d) * 0.12), 4.5))
    bottom = None
    for label, col in LEVELS:
        vals = d[col].to_numpy() / 1e6
        ax.bar(x, vals, bottom=bottom, width=0.85, label=label)
        bottom = vals if bottom is None else bottom + vals
    step = max(1, len(d) // 40)
    ax.set_xticks(list(x)[::step], list(d.layer)[::step], rotation=90, fontsize=6)
    ax.set_ylabel("energy per layer (uJ)")
    ax.set_title(f"Per-layer energy by memory level on {preset.name} "
                 f"({d.dataflow.iloc[0]} dataflow) - simulated (SCALE-Sim + Eq. 6)")
    ax.legend(ncol=6, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def pick_layers(df, n=4) -> list[str]:
    """A few conv layers with different shapes, widest first (where the steps show best)."""
    d = dense_rows(df)
    d = d[d.kind == "conv"].drop_duplicates(["in_ch", "out_ch", "in_h", "kernel_h", "stride"])
    return list(d.sort_values(["out_ch", "macs"], ascending=False).layer[:n])


def plot_energy_vs_channels(df, path, preset) -> None:
    """Energy (top) and cycles (bottom) of a few layers vs active output channels: both step
    where another fold of the array is needed (multiples of the array width, dotted)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = pick_layers(df)
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    kmax = 1
    for name in layers:
        g = df[(df.layer == name) & (df.axis == "out")].sort_values("active")
        ax.step(g.active, g.energy_pj / 1e6, where="mid", marker=".", ms=3, label=name)
        axc.step(g.active, g.cycles, where="mid", marker=".", ms=3, label=name)
        kmax = max(kmax, int(g.active.max()))
    for a in (ax, axc):
        for m in range(preset.array_cols, kmax + 1, preset.array_cols):
            a.axvline(m, color="grey", ls=":", lw=0.8)
    axc.set_xlabel(f"active output channels (dotted: multiples of the array width "
                   f"{preset.array_cols})")
    ax.set_ylabel("layer energy (uJ)")
    axc.set_ylabel("layer cycles")
    ax.set_title(f"Cost vs active output channels on {preset.name} "
                 f"({df.dataflow.iloc[0]} dataflow) - simulated")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def _summary(console, df, arch, preset, out) -> None:
    from rich.table import Table

    d = dense_rows(df)
    total = d.energy_pj.sum()
    t = Table(title=f"{arch} on {preset.name}, {d.dataflow.iloc[0]} dataflow",
              caption="simulated: SCALE-Sim access counts + Eq. 6 energies (not measured)")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_row("layers", str(len(d)))
    t.add_row("MACs", f"{d.macs.sum() / 1e6:,.1f} M")
    t.add_row("cycles", f"{d.cycles.sum():,}")
    t.add_row("latency", f"{d.latency_s.sum() * 1e3:,.3f} ms")
    t.add_row("energy", f"{total / 1e6:,.2f} uJ")
    for label, col in LEVELS:
        t.add_row(f"  {label} share", f"{100 * d[col].sum() / total:5.1f} %")
    console.print(t)
    console.print(f"wrote {', '.join(FILES)} to {out}/")

"""`ddi-hw power log|analyze`: record a power meter, then turn the log into energy per inference."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ddi_hw.errors import UserError
from ddi_hw.validate import number

power_app = typer.Typer(no_args_is_help=True, help="Power meter logging and energy per inference.")


def _atomic_csv(df, path: Path) -> None:
    from energy_models.atomic import atomic_write_text

    atomic_write_text(path, df.to_csv(index=False))


@power_app.command("log")
def log_command(
    out: Path = typer.Option(..., "--out", help="append-only CSV of samples (resumes if it exists)"),
    meter: Optional[str] = typer.Option(None, "--meter", help="serial meter profile: csv-stream, hp34401a-shunt, "
                                        "um25c, um24c, um34c (RDTech USB meters, binary frames; "
                                        "--supply-v/--shunt-ohm unused)"),
    port: Optional[str] = typer.Option(None, "--port", help="serial device, e.g. /dev/ttyUSB0, or /dev/rfcomm0 "
                                       "for a Bluetooth UM25C"),
    visa: Optional[str] = typer.Option(None, "--visa", help="VISA address of a SCPI DMM, "
                                       "e.g. 'USB0::0x2A8D::0x0101::MY1::INSTR'"),
    visa_backend: str = typer.Option("", "--visa-backend", help="pyvisa backend, e.g. '@py' or '@sim'"),
    duration: Optional[float] = typer.Option(None, "--duration", callback=number(0, low_open=True),
                                             help="seconds to log (default: until Ctrl-C or SIGTERM)"),
    baud: Optional[int] = typer.Option(None, "--baud", callback=number(1, integer=True),
                                       help="override the profile's baud rate"),
    supply_v: float = typer.Option(12.0, "--supply-v", callback=number(0, low_open=True),
                                   help="board supply voltage for shunt meters"),
    shunt_ohm: float = typer.Option(0.010, "--shunt-ohm", callback=number(0, low_open=True),
                                    help="shunt resistance (ZedBoard J21: 0.010)"),
    interval: float = typer.Option(0.0, "--interval", callback=number(0),
                                   help="minimum seconds between polled readings"),
    open_timeout: float = typer.Option(10.0, "--open-timeout", callback=number(0, low_open=True),
                                       help="seconds to wait for the meter to appear (then exit 2)"),
) -> None:
    """Log a meter into OUT; counters of garbage lines, gaps, disconnects go to OUT.status.json.

    Ctrl-C, SIGTERM and SIGHUP (also in a background job, where Ctrl-C is ignored) stop it
    cleanly: every sample already read is written before it exits."""
    import signal

    from rich.live import Live
    from rich.text import Text

    from ddi_hw.power.logger import PowerCsv, make_logger, status_path
    from ddi_hw.power.meters import Shunt
    from ddi_hw.validate import output_file

    output_file(out, "--out")
    PowerCsv.check(out)
    logger = make_logger(out, meter=meter, port=port, visa=visa, visa_backend=visa_backend,
                         shunt=Shunt(supply_v, shunt_ohm), baudrate=baud, min_interval_s=interval,
                         open_timeout_s=open_timeout)
    got = []

    def stop(signum, _frame):  # finish the loop: it flushes what it read, then returns
        got.append(signal.Signals(signum).name)
        logger.stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)

    def line(c) -> Text:
        w = "-" if c.last_watts is None else f"{c.last_watts:.3f} W"
        return Text(f"{c.samples} samples  last {w}  garbage {c.garbage_lines}  gaps {c.gaps}  "
                    f"disconnects {c.disconnects}  clock jumps {c.clock_jumps}  -> {out}")

    with Live(line(logger.counters), refresh_per_second=4, transient=False) as live:
        try:
            c = logger.run(duration, on_batch=lambda c: live.update(line(c)))
        except KeyboardInterrupt:
            logger.stop.set()
            c = logger.counters
    if not live.console.is_terminal:
        typer.echo()  # rich leaves a log file's last status line unterminated
    why = f" (stopped by {got[0]})" if got else ""
    typer.echo(f"logged {c.samples} samples to {out}{why}; status in {status_path(Path(out))}")
    if c.samples == 0:  # nothing measured is a failure a script must see, with the likely causes
        typer.echo(f"warning: no samples read from the meter (garbage {c.garbage_lines}, timeouts {c.timeouts}, "
                   f"open failures {c.open_failures}); check that --meter names this meter, --baud its rate, "
                   "and that it is sending", err=True)
        raise typer.Exit(1)


@power_app.command("analyze")
def analyze_command(
    power_csv: Path = typer.Argument(..., help="power log written by `ddi-hw power log`"),
    windows_csv: Path = typer.Argument(..., help="windows written by the board driver"),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="where results go (default: next to the log)"),
    max_gap: float = typer.Option(0.5, "--max-gap", callback=number(0, low_open=True),
                                  help="reject windows with a sample gap longer than this (s)"),
    clock: str = typer.Option("mono", "--clock",
                              help="mono: log and windows from one machine; wall: the log was recorded on "
                                   "another machine (both clocks NTP-synced)"),
) -> None:
    """Energy per inference (baseline-subtracted) per configuration with a 95% t-interval."""
    from rich.console import Console
    from rich.table import Table

    from ddi_hw.power.analysis import plot_trace, read_power, read_windows, summarize, window_energies
    from ddi_hw.validate import output_dir

    if clock not in ("mono", "wall"):
        raise UserError(f"--clock {clock!r}: choose mono (one machine) or wall (log from another machine)")
    out_dir = output_dir(out_dir or power_csv.parent, "--out-dir")
    power, bad = read_power(power_csv)
    windows = read_windows(windows_csv)
    per_window = window_energies(power, windows, time_col=f"host_{clock}_s", max_gap_s=max_gap)
    summary = summarize(per_window)
    _atomic_csv(per_window, out_dir / "energy_windows.csv")
    _atomic_csv(summary, out_dir / "energy_summary.csv")
    plot_trace(power, windows, per_window, out_dir / "power_trace.png", clock)
    table = Table(title=f"measured energy per inference ({len(power)} samples, {bad} unreadable rows)")
    for col in ("config", "repeats", "energy/inf (mJ)", "95% CI (mJ)", "gross/inf (mJ)", "baseline (W)"):
        table.add_column(col)
    for _, r in summary.iterrows():
        table.add_row(str(r["config"]), str(r["repeats"]), f"{r['energy_per_inference_j'] * 1e3:.4f}",
                      f"±{r['ci95_half_j'] * 1e3:.4f}", f"{r['gross_per_inference_j'] * 1e3:.4f}",
                      f"{r['baseline_w']:.3f}")
    Console().print(table)
    rejected = per_window[per_window["status"] != "ok"] if len(per_window) else per_window
    if len(rejected):
        typer.echo(f"{len(rejected)} windows rejected: {rejected['status'].value_counts().to_dict()}")
    typer.echo(f"wrote {out_dir / 'energy_summary.csv'}, energy_windows.csv, power_trace.png")

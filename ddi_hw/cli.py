"""`ddi-hw` command line. Each command lives in its own module; this file only wires them up.

Commands import their heavy dependencies inside the function so `ddi-hw --help` stays fast.
A `UserError` (bad flag, file, preset, data) becomes one line on stderr and exit code 2.
"""
from __future__ import annotations

import sys

import typer

from ddi_hw.backends import run_command
from ddi_hw.calibrate import calibrate_command
from ddi_hw.errors import UserError
from ddi_hw.evaluate import eval_command
from ddi_hw.export import export_command
from ddi_hw.power.cli import power_app
from ddi_hw.profile_cmd import profile_command
from ddi_hw.table1 import table1_command
from ddi_hw.train import train_command

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Energy-aware dual dynamic inference: profile, train, evaluate, export, run, measure.",
)

# --- command registrations (keep the order of the pipeline) ---
app.add_typer(power_app, name="power")
app.command("train")(train_command)
app.command("eval")(eval_command)
app.command("calibrate")(calibrate_command)
app.command("table1")(table1_command)
app.command("export")(export_command)
app.command("run")(run_command)
app.command("profile")(profile_command)


def main() -> None:
    try:
        app()
    except UserError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()

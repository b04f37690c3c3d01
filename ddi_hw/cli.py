"""`ddi-hw` command line. Each command lives in its own module; this file only wires them up.

Commands import their heavy dependencies inside the function so `ddi-hw --help` stays fast.
A `UserError` (bad flag, file, preset, data) and a usage error become one line on stderr and
exit code 2 (`ddi_hw.validate` holds the shared checks); anything else unexpected becomes one line
and exit 1 (set DDI_HW_TRACEBACK=1 to see the traceback).
"""
from __future__ import annotations

import os
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


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main() -> None:
    try:
        import click
    except ImportError:  # typer >= 0.20 vendors click
        from typer import _click as click

    try:
        code = app(standalone_mode=False)
    except UserError as err:
        typer.echo(f"error: {_one_line(err)}", err=True)
        sys.exit(2)
    except getattr(click.exceptions, "NoArgsIsHelpError", ()) as err:
        typer.echo(err.ctx.get_help() if err.ctx else str(err))
        sys.exit(2)
    except click.ClickException as err:  # usage: unknown option, bad type, missing argument
        cmd = err.ctx.command_path if getattr(err, "ctx", None) else "ddi-hw"
        typer.echo(f"error: {_one_line(err.format_message())} (see `{cmd} --help`)", err=True)
        sys.exit(err.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except MemoryError:
        typer.echo("error: out of memory; use a smaller --batch-size / --limit or a bigger machine", err=True)
        sys.exit(2)
    except OSError as err:  # the file system said no: a path the checks could not foresee
        where = f" {err.filename}" if err.filename else ""
        typer.echo(f"error: cannot access{where} ({err.strerror or err}); check the path and its permissions",
                   err=True)
        sys.exit(2)
    except Exception as err:
        if os.environ.get("DDI_HW_TRACEBACK"):
            raise
        typer.echo(f"internal error: {type(err).__name__}: {_one_line(err)[:300]} (a bug in ddi-hw; "
                   "DDI_HW_TRACEBACK=1 shows where)", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()

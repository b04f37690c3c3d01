"""`ddi-hw` command line. Each command lives in its own module; this file only wires them up.

Only the invoked command's module is imported, so `ddi-hw run` never imports torch and works on
the board, where only the light core is installed (the workstation commands need the
`workstation` extra; without it they say so on one line). Other commands are listed with their
one-line help. A `UserError` (bad flag, file, preset, data) and a usage error become one line on
stderr and exit code 2 (`ddi_hw.validate` holds the shared checks); anything else unexpected becomes
one line and exit 1 (set DDI_HW_TRACEBACK=1 to see the traceback).
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from ddi_hw.errors import UserError
from ddi_hw.validate import number

# name -> (module, attribute, one-line help); the order of the pipeline. "power" is a sub-app.
COMMANDS = {
    "power": ("ddi_hw.power.cli", "power_app", "Power meters: log, analyze."),
    "train": ("ddi_hw.train", "train_command", "Train a gated model (static, IADI, DDI)."),
    "eval": ("ddi_hw.evaluate", "eval_command", "Accuracy vs cost of trained runs."),
    "calibrate": ("ddi_hw.calibrate", "calibrate_command", "Fit Eq. 6 coefficients to measured energy."),
    "table1": ("ddi_hw.table1", "table1_command", "The paper's Table I from runs and measurements."),
    "export": ("ddi_hw.export", "export_command", "Quantise a run into a bundle / deploy folder."),
    "run": ("ddi_hw.cli", "run_command", "Run a bundle on test images (reference, csim, board)."),
    "profile": ("ddi_hw.profile_cmd", "profile_command", "Energy profile of a model on a hardware preset."),
}
WORKSTATION_MODULES = {"torch", "scalesim", "pandas", "pyarrow", "sklearn", "scipy", "matplotlib", "serial",
                       "pyvisa", "PIL", "rich"}


def run_command(
    bundle: str = typer.Argument(..., help="bundle directory (or deploy folder) written by `ddi-hw export`"),
    backend: str = typer.Option("reference", help="reference | csim | board"),
    images: Optional[str] = typer.Option(None, help="test images .npy (N, 3, H, W) normalised float32"),
    labels: Optional[str] = typer.Option(None, help="test labels .npy (N,)"),
    dataset: Optional[str] = typer.Option(None, help="data set instead of .npy (workstation; default: the bundle's)"),
    data_dir: Optional[str] = typer.Option(None, help="data directory (CIFAR-10 python batches)"),
    limit: int = typer.Option(200, callback=number(1, integer=True), help="number of test images"),
    exit_at: Optional[int] = typer.Option(None, "--exit", callback=number(0, integer=True),
                                          help="stop every image at this exit branch"),
    budget: Optional[float] = typer.Option(None, callback=number(0, low_open=True),
                                           help="per-image hard budget in FLOPs: early exits (RADI)"),
    bitfile: Optional[str] = typer.Option(None, help="overlay .bit for --backend board (.hwh beside it)"),
    out: Optional[str] = typer.Option(None, help="per-image CSV (default BUNDLE/run_<backend>.csv)"),
) -> None:
    """Run a bundle on test images with the reference, C-simulation or board backend (no torch needed).
    Images: --images/--labels, else test_images.npy in the bundle folder, else the data set."""
    import json

    from ddi_hw.deploy.runner import run_bundle

    bit = bitfile or (Path(bundle) / "ddi_engine.bit" if (Path(bundle) / "ddi_engine.bit").is_file() else None)
    summary, path = run_bundle(bundle, backend, images=images, labels=labels, dataset=dataset, data_dir=data_dir,
                               limit=limit, exit_at=exit_at, budget=budget, out=out, bitfile=bit)
    print(json.dumps(summary, indent=1))
    print(f"per-image results: {path}")


def _missing(name: str | None, module: str) -> str:
    return (f"`ddi-hw {name}` needs the workstation stack ({module} is not installed): "
            "pip install 'ddi-hw[workstation]' (the board needs only `run`)")


def _unavailable(name: str, missing: str, help_text: str):
    def command(ctx: typer.Context) -> None:
        raise UserError(_missing(name, missing))
    command.__doc__ = help_text
    return command


def _placeholder(help_text: str):
    def command() -> None:  # never called: only listed by `ddi-hw --help`
        raise AssertionError("placeholder")
    command.__doc__ = help_text
    return command


def build_app(wanted: str | None, everything: bool = False) -> typer.Typer:
    """The app with `wanted`'s real command (all of them if `everything`), the others as placeholders."""
    app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                      help="Energy-aware dual dynamic inference: profile, train, evaluate, export, run, measure.")
    app.callback()(lambda: None)  # keep it a group even with one real command
    for name, (module, attr, help_text) in COMMANDS.items():
        if name != wanted and not everything:
            app.command(name, help=help_text)(_placeholder(help_text))
            continue
        try:
            obj = getattr(importlib.import_module(module), attr)
        except ImportError as err:
            if (err.name or "").split(".")[0] not in WORKSTATION_MODULES:
                raise
            ctx = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}
            app.command(name, context_settings=ctx)(_unavailable(name, err.name, help_text))
            continue
        if isinstance(obj, typer.Typer):
            app.add_typer(obj, name=name)
        else:
            app.command(name)(obj)
    return app


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main() -> None:
    try:
        import click
    except ImportError:  # typer >= 0.20 vendors click
        from typer import _click as click

    args = sys.argv[1:]
    wanted = next((a for a in args if not a.startswith("-")), None)
    try:
        code = build_app(wanted if wanted in COMMANDS else None)(standalone_mode=False)
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
    except ModuleNotFoundError as err:  # a workstation command on the board's light install
        if (err.name or "").split(".")[0] not in WORKSTATION_MODULES:
            raise
        typer.echo(f"error: {_missing(wanted, err.name)}", err=True)
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


def __getattr__(name: str):
    if name == "app":  # every command real (tests drive it with typer's CliRunner)
        return build_app(None, everything=True)
    raise AttributeError(f"module 'ddi_hw.cli' has no attribute {name!r}")


if __name__ == "__main__":
    main()

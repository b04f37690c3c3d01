"""What `ddi-hw run` and a deploy folder's `validate.py` do: images through a bundle on a backend.

Test images come as `.npy` (normalised float32 (N, 3, H, W) and int labels (N,)): given
explicitly, or `test_images.npy` / `test_labels.npy` next to the bundle (a deploy folder written
by `ddi-hw export --deploy`). Only on a workstation, with the `workstation` extra installed, can
they be read from a data set instead (`ddi_hw.data`, torch). Results: one CSV row per image and a
JSON summary (accuracy, mean per-image cost, engine-iteration and cost-plan savings vs the static network). Torch-free.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ddi_hw.deploy.backends import Backend, CsimBackend, ReferenceBackend, rows_csv, run_images, static_cost, summarize
from ddi_hw.deploy.bundle import load_bundle
from ddi_hw.errors import UserError

IMAGES_NPY, LABELS_NPY = "test_images.npy", "test_labels.npy"
BITFILE, HWHFILE = "ddi_engine.bit", "ddi_engine.hwh"  # the Vivado build's overlay, dropped in by name


BACKENDS = ("reference", "csim", "board")


def get_backend(name: str, bitfile=None) -> Backend:
    """A backend by name; `bitfile` is the overlay the board backend loads (default: its own)."""
    if name == "reference":
        return ReferenceBackend()
    if name == "csim":
        return CsimBackend()
    if name == "board":
        try:
            from ddi_hw.deploy.board import BoardBackend  # needs pynq (the board image)
        except ImportError as err:
            raise UserError(f"the board backend is unavailable here ({err}); use --backend reference or csim") from None
        return BoardBackend(bitfile)
    raise UserError(f"unknown backend {name!r}; choose reference, csim or board")


def load_npy_images(images: str | Path, labels: str | Path, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) from .npy files, checked: (N, 3, H, W) float images, N integer labels."""
    out = []
    for path in (Path(images), Path(labels)):
        if not path.is_file():
            raise UserError(f"{path} not found: pass the .npy files written by `ddi-hw export --deploy`")
        try:
            out.append(np.load(path, allow_pickle=False))
        except ValueError as err:
            raise UserError(f"{path} is not a numpy .npy array ({err})") from None
    x, y = out
    if x.ndim != 4 or x.shape[1] != 3 or (size is not None and x.shape[2:] != (size, size)):
        want = f"(N, 3, {size}, {size})" if size else "(N, 3, H, W)"
        raise UserError(f"{images} has shape {x.shape}, expected {want} normalised images")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{labels} must hold {len(x)} integer labels, has shape {y.shape} dtype {y.dtype}")
    return x.astype(np.float32), y


def find_images(bundle_dir: Path, manifest: dict, images=None, labels=None, dataset=None, data_dir=None,
                limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The test images of a run (see the module docstring for the order they are looked for)."""
    size = manifest.get("model", {}).get("input_size")
    if images or labels:
        if not (images and labels):
            raise UserError("pass both --images and --labels (.npy)")
        x, y = load_npy_images(images, labels, size)
    elif (bundle_dir / IMAGES_NPY).is_file() and dataset is None:
        x, y = load_npy_images(bundle_dir / IMAGES_NPY, bundle_dir / LABELS_NPY, size)
    else:
        name = dataset or manifest.get("dataset")
        if not name:
            raise UserError("the bundle does not record its data set: pass --dataset cifar10|smoke "
                            "or --images/--labels .npy")
        try:
            from ddi_hw.data import test_images  # workstation only (torch)
        except ImportError as err:
            raise UserError(f"no {IMAGES_NPY} next to the bundle and reading data set {name!r} needs the "
                            f"workstation extra ({err.name} missing): pass --images/--labels .npy "
                            "or export with `ddi-hw export --deploy`") from None
        return test_images(name, data_dir, limit)
    return (x, y) if limit is None else (x[:limit], y[:limit])


def run_bundle(bundle_dir: str | Path, backend: str = "reference", *, images=None, labels=None, dataset=None,
               data_dir=None, limit: int | None = None, exit_at: int | None = None, budget: float | None = None,
               out: str | Path | None = None, bitfile: str | Path | None = None,
               progress: bool = True) -> tuple[dict, Path]:
    """Check the bundle, run its test images on `backend`, write the per-image CSV; (summary, csv path).
    Every check (bundle integrity, images, overlay files) runs before the first engine launch."""
    from ddi_hw.validate import output_file

    if exit_at is not None and budget is not None:
        raise UserError("give --exit (a fixed exit) or --budget (anytime exits), not both")
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; choose {', '.join(BACKENDS)}")
    bundle_dir = Path(bundle_dir)
    b = load_bundle(bundle_dir)
    n_exits = sum(1 for st in b.program if st.get("op") == "exit")
    if exit_at is not None and exit_at >= n_exits:
        raise UserError(f"--exit {exit_at}: this bundle has {n_exits} exit branch(es)"
                        + (f"; choose 0..{n_exits - 1}" if n_exits else "; drop --exit"))
    path = output_file(Path(out) if out else bundle_dir / f"run_{backend}.csv", "--out")
    x, y = find_images(bundle_dir, b.manifest, images, labels, dataset, data_dir, limit)
    be = get_backend(backend, bitfile=bitfile)
    try:
        rows = run_images(b, x, y, be, exit_at=exit_at, budget=budget, progress=progress)
    finally:
        be.close()
    from energy_models.atomic import atomic_write_text

    atomic_write_text(path, rows_csv(rows))
    plan = b.manifest.get("cost_plan")
    metric = (plan or {}).get("metric")
    return {"backend": backend, "metric": metric, **summarize(rows, static_cost(plan))}, path


def overlay_files(folder: Path) -> Path:
    """The overlay's .bit in a deploy folder, with its .hwh beside it (pynq reads both)."""
    missing = [n for n in (BITFILE, HWHFILE) if not (folder / n).is_file()]
    if missing:
        raise UserError(f"{' and '.join(missing)} not in {folder}: copy them from the Vivado build "
                        f"(fpga/overlay/, see fpga/README.md) or run with --backend reference|csim")
    return folder / BITFILE


def validate_main(folder: str | Path, argv: list[str] | None = None) -> int:
    """A deploy folder's `validate.py`: run its test images, print accuracy and per-image cost.
    Exit 0, or 2 with one line for a bad bundle, missing images or overlay."""
    import sys

    ap = argparse.ArgumentParser(prog="validate.py", description=validate_main.__doc__)
    ap.add_argument("--backend", default="board", choices=["board", "csim", "reference"])
    ap.add_argument("--limit", type=int, default=None, help="first N test images")
    ap.add_argument("--exit", type=int, default=None, dest="exit_at", help="stop every image at this exit")
    ap.add_argument("--budget", type=float, default=None, help="per-image budget (cost-plan metric): RADI")
    args = ap.parse_args(argv)
    folder = Path(folder)
    try:
        bit = overlay_files(folder) if args.backend == "board" else None
        summary, path = run_bundle(folder, args.backend, limit=args.limit, exit_at=args.exit_at,
                                   budget=args.budget, bitfile=bit, progress=False)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{summary['images']} images on {args.backend}: accuracy {summary['accuracy']:.4f}, "
          f"mean per-image cost {summary['mean_cost']:.4g} ({summary['metric'] or 'no cost plan'}), "
          f"engine-iteration saving {summary['engine_iteration_saving']:.3f}"
          + (f", {summary['metric']} saving {summary['cost_saving']:.3f}" if "cost_saving" in summary else "")
          + " (both vs the static network, gates counted)")
    print(f"per-image results: {path}")
    print(json.dumps(summary, indent=1))
    return 0

"""Checkpoints as safetensors + JSON, written atomically; nothing is ever unpickled.

A run directory holds:
- `model.safetensors` + `model.json`: the weights and a readable sidecar (config, model kwargs,
  metrics, cost-table identity, step). This is what `ddi-hw eval` / `export` read.
- `resume.safetensors`: everything `--resume` needs in ONE file (weights, optimizer tensors,
  torch/numpy RNG states as tensors; the step, stage phase, LR-schedule position, python RNG state
  and optimizer hyper-parameters as JSON in the safetensors metadata). One file replaced with
  os.replace means a crash can never leave weights and optimizer state from different steps.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ddi_hw.errors import UserError
from ddi_hw.validate import fields, read_json
from energy_models.atomic import atomic_write_bytes, atomic_write_text

FORMAT = "ddi-hw-checkpoint/1"
MODEL_FILE, SIDECAR_FILE, RESUME_FILE = "model.safetensors", "model.json", "resume.safetensors"


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise UserError(f"{path} not found: expected a ddi-hw run directory (train one with `ddi-hw train`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return st_load(path.read_bytes()), meta
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable safetensors file ({err}); re-run training or restore it") from None


# ----------------------------------------------------------------------------- model checkpoint


def save_model(run_dir: str | Path, model: torch.nn.Module, sidecar: dict[str, Any]) -> None:
    """Weights to model.safetensors, then the sidecar JSON (config, metrics, cost table, step)."""
    run_dir = Path(run_dir)
    side = {"format": FORMAT, **sidecar}
    text = json.dumps(side, indent=2, sort_keys=True, default=_json_default)
    atomic_write_bytes(run_dir / MODEL_FILE, st_save(_tensors(model.state_dict()), metadata={"sidecar": text}))
    atomic_write_text(run_dir / SIDECAR_FILE, text + "\n")


def load_model_state(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, sidecar) of a run directory; the sidecar JSON file wins over the embedded copy."""
    run_dir = Path(run_dir)
    state, meta = _read_safetensors(run_dir / MODEL_FILE)
    side_path = run_dir / SIDECAR_FILE
    if side_path.exists():
        side = read_json(side_path, "run sidecar", _DAMAGED)
    else:
        try:
            side = json.loads(meta["sidecar"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise UserError(f"{side_path} is missing and {run_dir / MODEL_FILE} holds no readable copy ({err}); "
                            f"{_DAMAGED}") from None
    if not isinstance(side, dict) or side.get("format") != FORMAT:
        raise UserError(f"{side_path} has format {side.get('format') if isinstance(side, dict) else None!r}, "
                        f"expected {FORMAT!r}")
    return state, side


def check_sidecar(side: dict[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """The fields every reader of a trained run's model.json relies on (eval, export, train's
    init), each wrong or missing one a one-line error naming it."""
    return fields(side, SIDECAR_SCHEMA, str(Path(run_dir) / SIDECAR_FILE), _DAMAGED)


_DAMAGED = "the run directory is damaged; re-run `ddi-hw train` or restore it"
_int_list = ((list, type(None)), "a list of integers or null",
             lambda v: v is None or all(isinstance(i, int) and not isinstance(i, bool) for i in v))
# what every reader of model.json relies on (eval, export, train's init); see ddi_hw.validate.fields
SIDECAR_SCHEMA = {
    "config": dict, "?config.arch": str, "?config.dataset": str, "?config.stage": str,
    "?config.hardware": str, "?config.resource": str,
    "model": dict, "model.name": str, "?model.num_classes": (int, "a positive integer", lambda v: v > 0),
    "?model.layer_gates": bool, "?model.channel_gates": bool, "?model.exits": bool,
    "?model.channel_gate_kind": str, "?model.exit_positions": _int_list, "?metrics": dict,
}
RESUME_SCHEMA = {  # the caller's `state` mapping is checked by its owner (train.TRAIN_STATE_SCHEMA)
    "state": dict, "optimizer": dict, "optimizer.param_groups": (list, "a list of mappings",
                                                  lambda v: all(isinstance(g, dict) for g in v)),
    "optimizer.scalars": dict,
    "rng": dict, "rng.numpy": (list, "[kind, pos, has_gauss, cached]", lambda v: len(v) == 4),
    "rng.python": (list, "[version, state, gauss_next]", lambda v: len(v) == 3 and isinstance(v[1], list)),
}


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ----------------------------------------------------------------------------- resume state


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch / numpy / python RNG states split into tensors and JSON."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, pystate, gauss_next = random.getstate()
    tensors = {"rng.torch": torch.get_rng_state(), "rng.numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64))}
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)],
            "python": [version, list(pystate), gauss_next]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, pystate, gauss_next = meta["python"]
    random.setstate((version, tuple(pystate), gauss_next))


def save_resume(run_dir: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                state: dict[str, Any]) -> None:
    """Everything to continue exactly, in one atomically replaced safetensors file."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    opt_meta: dict[str, Any] = {"param_groups": opt["param_groups"], "scalars": {}}
    for idx, pstate in opt["state"].items():
        for key, val in pstate.items():
            if isinstance(val, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = val
            elif val is not None:
                opt_meta["scalars"][f"{idx}.{key}"] = val
    rng_t, rng_m = rng_state()
    tensors.update(rng_t)
    meta = {"format": FORMAT, "state": state, "optimizer": opt_meta, "rng": rng_m}
    text = json.dumps(meta, default=_json_default)
    atomic_write_bytes(Path(run_dir) / RESUME_FILE, st_save(_tensors(tensors), metadata={"resume": text}))


def load_resume(run_dir: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights, optimizer and RNG states written by save_resume; return the saved `state`."""
    path = Path(run_dir) / RESUME_FILE
    meta = read_resume_meta(path)
    tensors, _ = _read_safetensors(path)
    fix = f"{path} is damaged; start the run again without --resume (or restore the file)"
    for name in ("rng.torch", "rng.numpy"):
        if name not in tensors:
            raise UserError(f"{path} lacks tensor {name!r}; {fix}")
    try:
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        opt_state: dict[int, dict[str, Any]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                idx, key = k[6:].split(".", 1)
                opt_state.setdefault(int(idx), {})[key] = v
        for k, v in meta["optimizer"]["scalars"].items():
            idx, key = k.split(".", 1)
            opt_state.setdefault(int(idx), {})[key] = v
        optimizer.load_state_dict({"state": opt_state, "param_groups": meta["optimizer"]["param_groups"]})
        set_rng_state(tensors, meta["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
        first = str(err).strip().splitlines()[-1].strip()[:160] if str(err).strip() else type(err).__name__
        raise UserError(f"{path} does not fit this run ({first}); {fix}") from None
    return meta["state"]


def read_resume_meta(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a resume file, checked against RESUME_SCHEMA (reads the header only)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--resume: {path} not found; start the run without --resume")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("resume")
        meta = json.loads(raw) if raw is not None else None
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable resume file ({err}); start the run again without --resume") from None
    if meta is None:
        raise UserError(f"{path} has no resume metadata; it was not written by ddi-hw train")
    return fields(meta, RESUME_SCHEMA, str(path), "start the run again without --resume (or restore the file)")

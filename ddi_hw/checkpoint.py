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
    try:
        side = json.loads(side_path.read_text()) if side_path.is_file() else json.loads(meta["sidecar"])
    except (json.JSONDecodeError, KeyError) as err:
        raise UserError(f"{side_path} is missing or not valid JSON ({err}); the run directory is damaged") from None
    if side.get("format") != FORMAT:
        raise UserError(f"{side_path} has format {side.get('format')!r}, expected {FORMAT!r}")
    return state, side


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
    if not path.is_file():
        raise UserError(f"--resume: {path} not found; start the run without --resume")
    tensors, meta_raw = _read_safetensors(path)
    try:
        meta = json.loads(meta_raw["resume"])
    except (KeyError, json.JSONDecodeError):
        raise UserError(f"{path} has no resume metadata; it was not written by ddi-hw train") from None
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
    return meta["state"]

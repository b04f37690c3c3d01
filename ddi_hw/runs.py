"""Runs: the one place that turns a run's config into a model, attaches its cost table, and loads
a run directory back. `ddi-hw train`, `eval` and `export` and the notebooks all go through here,
so a run is rebuilt the same way (and checked the same way) by every stage.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddi_hw.errors import UserError
from energy_models.presets import DEFAULT_PRESET


def model_kwargs(cfg: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """`create_model` arguments of a validated training config (stored in model.json as 'model')."""
    gated = cfg["stage"] != "static"
    return {"name": cfg["arch"], "num_classes": num_classes,
            "layer_gates": gated and cfg["layer_gates"], "channel_gates": gated and cfg["channel_gates"],
            "channel_gate_kind": cfg["channel_gate_kind"], "exits": cfg["stage"] == "ddi",
            "exit_positions": cfg["exit_positions"] if cfg["stage"] == "ddi" else None}


def build_model(kwargs: dict[str, Any]):
    from ddi_hw.models import create_model

    try:
        return create_model(**kwargs)
    except (KeyError, ValueError, TypeError, IndexError) as err:  # e.g. a kwarg model.json should not have
        raise UserError(f"cannot build model {kwargs.get('name')!r}: {err}") from None


def attach_costs(model, metrics: list[str], hardware: str, input_shape=None) -> dict[str, Any]:
    """Attach the cost table of `hardware` when energy/latency is needed (FLOPs come from the model
    itself); return the table's identity. `input_shape` defaults to the model's input size."""
    if all(m == "flops" for m in metrics):
        return {"source": "model", "hardware": None, "sha256": None}
    from ddi_hw.cost import CostTable
    from energy_models import profile_model

    shape = tuple(input_shape) if input_shape is not None else (1, 3, model.input_size, model.input_size)
    df = profile_model(model, shape, hardware=hardware)
    model.attach_cost_table(CostTable.from_frame(df))
    digest = hashlib.sha256(df.to_csv(index=False).encode()).hexdigest()
    return {"source": "energy_models.profile_model", "hardware": hardware, "sha256": digest, "rows": len(df)}


@dataclass
class Run:
    """A loaded run directory: the model in eval mode with its weights and cost table."""
    path: Path
    model: Any
    side: dict[str, Any]  # model.json: config, model kwargs, metrics, cost-table identity, ...
    hardware: str  # preset of the attached cost table (the run's unless overridden)
    cost_id: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        return self.side["config"]


def load_run(run_dir: str | Path, metrics=("flops",), hardware: str | None = None) -> Run:
    """Rebuild the model a run directory describes, attach the cost table for `metrics` (on
    `hardware`, default the run's preset) and load its weights strictly; nothing is unpickled."""
    from ddi_hw.checkpoint import check_sidecar, load_model_state

    state, side = load_model_state(run_dir)
    for key in ("model", "config"):
        if not isinstance(side.get(key), dict):
            raise UserError(f"{run_dir}/model.json has no {key!r} entry; it was not written by ddi-hw train")
    check_sidecar(side, run_dir)
    model = build_model(side["model"])
    hw = hardware or side["config"].get("hardware") or DEFAULT_PRESET
    cost_id = attach_costs(model, list(metrics), hw)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise UserError(f"{run_dir}: weights do not fit the model its model.json describes "
                        f"({str(err).strip().splitlines()[-1].strip()}); the run directory is damaged") from None
    return Run(Path(run_dir), model.eval(), side, hw, cost_id)

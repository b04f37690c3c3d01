"""Model registry: one `create_model(name, ...)` for every architecture (timm's pattern)."""
from __future__ import annotations

from typing import Callable

from ddi_hw.errors import UserError

_MODELS: dict[str, Callable] = {}


def register_model(fn: Callable) -> Callable:
    """Register a builder under its function name (e.g. `resnet74`)."""
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    _load_builders()
    return sorted(_MODELS)


def create_model(name: str, num_classes: int | None = None, layer_gates: bool = False,
                 channel_gates: bool = False, channel_gate_kind: str = "cnn", exits: bool = False,
                 exit_positions: list[int] | None = None, **kwargs):
    """Build a registered network; gates and exits are options on the same backbone.

    `num_classes` defaults to 10 for the CIFAR networks and 1000 for densenet201.
    `exit_positions` are 0-based indices of the blocks (ResNet residual blocks, DenseNet dense
    layers, counted across stages) after which an exit branch is attached; default: about 1/4 and
    3/4 of each stage (see `exits.default_exit_positions`).
    """
    _load_builders()
    if name not in _MODELS:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(sorted(_MODELS))}")
    if channel_gate_kind not in ("cnn", "rnn"):
        raise UserError(f"channel_gate_kind must be 'cnn' or 'rnn', not {channel_gate_kind!r}")
    if num_classes is None:
        num_classes = 1000 if name == "densenet201" else 10
    return _MODELS[name](num_classes=num_classes, layer_gates=layer_gates,
                         channel_gates=channel_gates, channel_gate_kind=channel_gate_kind,
                         exits=exits, exit_positions=exit_positions, **kwargs)


def _load_builders() -> None:
    from ddi_hw.models import densenet, resnet  # noqa: F401  (registers builders on import)

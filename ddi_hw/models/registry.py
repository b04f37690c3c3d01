"""Model registry: one `create_model(name, ...)` for every architecture (timm's pattern).

Each entry carries the model's defaults (timm's `default_cfg`): the number of classes and the
input size it is built for. Nothing else special-cases a model name: the input size of a built
model is `model.input_size`, its block names are `model.block_names` (its own module paths).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ddi_hw.errors import UserError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable
    num_classes: int = 10  # CIFAR-10
    input_size: int = 32  # square input side


_MODELS: dict[str, ModelEntry] = {}


def register_model(fn: Callable | None = None, *, num_classes: int = 10, input_size: int = 32):
    """Register a builder under its function name (e.g. `resnet74`) with its defaults; use as
    `@register_model` or `@register_model(num_classes=1000, input_size=224)`."""
    def add(f: Callable) -> Callable:
        _MODELS[f.__name__] = ModelEntry(f.__name__, f, num_classes, input_size)
        return f
    return add(fn) if fn is not None else add


def list_models() -> list[str]:
    _load_builders()
    return sorted(_MODELS)


def model_entry(name: str) -> ModelEntry:
    """The registered entry (builder and defaults) of model `name`."""
    _load_builders()
    if name not in _MODELS:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(sorted(_MODELS))}")
    return _MODELS[name]


def create_model(name: str, num_classes: int | None = None, layer_gates: bool = False,
                 channel_gates: bool = False, channel_gate_kind: str = "cnn", exits: bool = False,
                 exit_positions: list[int] | None = None, input_size: int | None = None, **kwargs):
    """Build a registered network; gates and exits are options on the same backbone.

    `num_classes` and `input_size` default to the entry's (10 and 32 for the CIFAR networks,
    1000 and 224 for densenet201). `exit_positions` are 0-based indices of the blocks (ResNet
    residual blocks, DenseNet dense layers, counted across stages) after which an exit branch is
    attached; default: about 1/4 and 3/4 of each stage (see `exits.default_exit_positions`).
    """
    from ddi_hw.models.gates import check_channel_gate_option

    entry = model_entry(name)
    check_channel_gate_option(channel_gate_kind)
    return entry.builder(num_classes=entry.num_classes if num_classes is None else num_classes,
                         input_size=entry.input_size if input_size is None else input_size,
                         layer_gates=layer_gates, channel_gates=channel_gates,
                         channel_gate_kind=channel_gate_kind, exits=exits, exit_positions=exit_positions, **kwargs)


def _load_builders() -> None:
    from ddi_hw.models import densenet, resnet  # noqa: F401  (registers builders on import)

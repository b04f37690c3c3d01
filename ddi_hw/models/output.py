"""What every forward of a dynamic network returns (docs/CONTRACTS.md, "Dynamic model")."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DynamicOutput:
    logits: torch.Tensor  # (N, C): final classifier, or the exit taken under a budget
    exit_logits: list[torch.Tensor] = field(default_factory=list)  # one (N, C) per exit
    layer_decisions: torch.Tensor | None = None  # (N, B) 0/1 over skippable blocks
    layer_probs: torch.Tensor | None = None  # (N, B) sigmoid of the layer gates (1 = no gate)
    channel_decisions: dict[str, torch.Tensor] = field(default_factory=dict)  # gate -> (N, K)
    cost: dict[str, torch.Tensor] = field(default_factory=dict)  # metric -> (N,) float64
    exit_taken: torch.Tensor | None = None  # (N,) long, -1 = final classifier
    channel_probs: dict[str, torch.Tensor] = field(default_factory=dict)  # gate -> (N, K) sigmoid
    block_run: torch.Tensor | None = None  # (N, J) 0/1 over ALL blocks (1 for unskippable ones)
    block_active: torch.Tensor | None = None  # (N, J) active channels of each block's gated conv

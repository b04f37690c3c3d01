"""What every forward of a dynamic network returns (docs/CONTRACTS.md, "Dynamic model")."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch


class SliceViews(Mapping):
    """gate -> its columns of one (N, total) tensor, sliced on first access. The batch-1 C runner
    writes every gate's decisions into one flat array; slicing 36+ gates eagerly (two tensors
    each) cost ~0.1 ms per forward, and inference rarely reads them."""

    def __init__(self, flat: torch.Tensor, spans: dict[str, tuple[int, int]]):
        self._flat, self._spans, self._views = flat, spans, {}

    def __getitem__(self, gate: str) -> torch.Tensor:
        v = self._views.get(gate)
        if v is None:
            off, k = self._spans[gate]
            v = self._views[gate] = self._flat[:, off:off + k]
        return v

    def __contains__(self, gate) -> bool:
        return gate in self._spans

    def __iter__(self):
        return iter(self._spans)

    def __len__(self) -> int:
        return len(self._spans)


class SigmoidViews(Mapping):
    """gate -> sigmoid(logits), computed on first access. The sparse path returns this for
    `channel_probs`: at batch 1, building 36+ small probability tensors eagerly cost ~0.3 ms per
    forward (a fifth of the gates' compute), and inference rarely reads them."""

    def __init__(self, logits: dict[str, torch.Tensor]):
        self._logits, self._probs = logits, {}

    def __getitem__(self, gate: str) -> torch.Tensor:
        p = self._probs.get(gate)
        if p is None:
            p = self._probs[gate] = torch.sigmoid(self._logits[gate])
        return p

    def __iter__(self):
        return iter(self._logits)

    def __len__(self) -> int:
        return len(self._logits)


@dataclass
class DynamicOutput:
    logits: torch.Tensor  # (N, C): final classifier, or the exit taken under a budget
    exit_logits: list[torch.Tensor] = field(default_factory=list)  # one (N, C) per exit
    layer_decisions: torch.Tensor | None = None  # (N, B) 0/1 over skippable blocks
    layer_probs: torch.Tensor | None = None  # (N, B) sigmoid of the layer gates (1 = no gate)
    channel_decisions: Mapping[str, torch.Tensor] = field(default_factory=dict)  # gate -> (N, K)
    cost: dict[str, torch.Tensor] = field(default_factory=dict)  # metric -> (N,) float64
    exit_taken: torch.Tensor | None = None  # (N,) long, -1 = final classifier
    channel_probs: Mapping[str, torch.Tensor] = field(default_factory=dict)  # gate -> (N, K) sigmoid
    block_run: torch.Tensor | None = None  # (N, J) 0/1 over ALL blocks (1 for unskippable ones)
    block_active: torch.Tensor | None = None  # (N, J) active channels of each block's gated conv
    stopped_block: torch.Tensor | None = None  # (N,) long under a budget: the block a sample stopped in
    #   (its gates ran, its convs did not; ddi_hw.deploy.budget), -1 = stopped at an exit or reached the head

"""Helpers of the sparse (inference) path: BN folding with a cache, channel-mask grouping."""
from __future__ import annotations

from typing import Callable

import torch


def fold_bn(weight: torch.Tensor, bn, bias: torch.Tensor | None = None):
    """conv followed by eval-mode BN == one conv with these weight and bias."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    b = bn.bias - bn.running_mean * scale
    if bias is not None:
        b = b + bias * scale
    return (weight * scale.view(-1, *([1] * (weight.dim() - 1)))).detach(), b.detach()


class FoldCache:
    """Folded / fused inference weights of one module, computed on first use.

    The owning `DynamicNet` clears every cache at the start of a sparse forward when any of its
    parameters or buffers changed (in-place update, load_state_dict, swap), checked once per
    forward rather than once per block."""

    def __init__(self):
        self.value = None

    def get(self, compute: Callable):
        if self.value is None:
            with torch.no_grad():
                self.value = compute()
        return self.value

    def clear(self) -> None:
        self.value = None


def run_channel_groups(x: torch.Tensor, mask: torch.Tensor, fn: Callable, max_groups: int = 8):
    """Run `fn(x_sub, active_channel_index, sub_mask_or_None)` per group of identical masks.

    Samples sharing a mask run as one batch over exactly their active channels. With more than
    `max_groups` distinct masks, one run over the union of active channels with the masks applied
    (`fn` then gets the mask restricted to those channels) -- still exact, no per-sample loop.
    """
    n = x.shape[0]
    if n == 1:
        return fn(x, mask[0].nonzero().squeeze(1), None)
    uniq, inv = torch.unique(mask, dim=0, return_inverse=True)
    if len(uniq) == 1:
        return fn(x, uniq[0].nonzero().squeeze(1), None)
    if len(uniq) <= max_groups:
        out = None
        for g in range(len(uniq)):
            idx = (inv == g).nonzero().squeeze(1)
            y = fn(x[idx], uniq[g].nonzero().squeeze(1), None)
            if out is None:
                out = y.new_empty(n, *y.shape[1:])
            out[idx] = y
        return out
    ch = mask.any(0).nonzero().squeeze(1)
    return fn(x, ch, mask[:, ch])

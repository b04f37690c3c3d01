"""Early-exit branch classifiers of RADI (paper Sec. III-B, IV-A, Fig. 5).

Branch design: max pooling comes first (coarse features are what a classifier needs and it makes
every later conv cheap), down to `target` resolution by `pools` >= 1 halvings, then two 3x3 conv + BN
+ ReLU layers of `width` channels, global average pool and a linear classifier. The `pools` successive
2x2 ceil-mode max pools are run as the one max pool they equal (window = stride = 2^pools, ceil mode),
so the cost table, the exporter and the board's runner all read the map once.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class ExitBranch(nn.Module):
    def __init__(self, c_in: int, size: int, num_classes: int, target: int = 8, width: int = 64):
        super().__init__()
        self.pools = max(1, math.ceil(math.log2(max(size, 1) / target))) if size > 1 else 0
        self.window = 2 ** self.pools  # one max pool: window = stride (1 = none)
        self.conv1 = nn.Conv2d(c_in, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.window > 1:
            x = F.max_pool2d(x, self.window, ceil_mode=True)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def default_exit_positions(stage_sizes: list[int]) -> list[int]:
    """Global block indices at ~1/4 and ~3/4 depth of every stage (Fig. 5: 8 blocks -> after the
    2nd and the 6th). An exit sits after block index p (0-based, counted across stages)."""
    out, start = [], 0
    for n in stage_sizes:
        for frac in (0.25, 0.75):
            pos = start + min(n, max(1, round(frac * n))) - 1
            if pos not in out:
                out.append(pos)
        start += n
    return out

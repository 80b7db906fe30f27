"""Small models several test files build: each stands for one kind of model a user may bring."""

from __future__ import annotations

import torch
import torch.nn as nn


class ValueBranch(nn.Module):
    """``forward`` branches on a tensor's value, which symbolic tracing cannot follow."""

    def __init__(self, features: int = 64) -> None:
        super().__init__()
        self.fc = nn.Linear(features, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return x


class Leafy(nn.Module):
    """A factorizable layer inside a child (``blk``) that a test may declare a leaf, then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.blk = nn.Sequential(nn.Linear(64, 256))
        self.fc = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blk(x))

"""The residual-connection seam: how a sub-layer's output is merged back into the residual stream(s).

`PlainResidual` is x + f(x). mHC-lite (`mhc.py`) keeps n streams and mixes them; both share this
interface so the transformer never needs to know which one it has.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Branch = Callable[[torch.Tensor], torch.Tensor]


class PlainResidual(nn.Module):
    """One residual stream: x + branch(x)."""

    def forward(self, x: torch.Tensor, branch: Branch) -> torch.Tensor:
        return x + branch(x)


class SingleStream(nn.Module):
    """Expand/reduce for a single stream: identity both ways."""

    def expand(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

"""Tensors that FSDP2 may shard (`trainer=fsdp`): each parameter is then a DTensor holding this rank's rows.

Element-wise work acts on the shards as they are; what needs a whole matrix (Muon's orthogonalization, the
ternary codes and scales of a row group) gathers it first. Gathering is a collective: every rank calls it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (an all-gather: every rank calls it), else the tensor itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def laid_out_like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value`, a whole tensor that every rank computed alike, in `param`'s layout: for a DTensor this rank's
    shard of it, taken locally (nothing is sent); else `value` itself."""
    if isinstance(param, DTensor):
        return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
    return value

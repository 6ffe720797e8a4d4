"""FSDP2 for TernaryLM (`trainer=fsdp`): sharding the model, and whole tensors back where whole ones are needed.

Under FSDP2 every parameter is a DTensor that holds this rank's rows. Most of training does not care (the
forward all-gathers a block's weights, the backward reduce-scatters its gradients, element-wise optimizer
updates act on the shards), but a few things need whole tensors: Muon's orthogonalization, the ternary
zero fraction, the export and the final held-out score. Gathering is a collective: every rank calls it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from nanoternary.model.transformer import TernaryLM


def shard_model(model: TernaryLM, mesh: DeviceMesh) -> None:
    """One FSDP2 unit per transformer block, plus the root (embedding = tied head, final norm). A 1-D mesh
    shards over all its ranks; a 2-D (nodes, devices) mesh shards within a node and replicates across nodes
    (HSDP)."""
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


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


def whole_model(model: TernaryLM) -> TernaryLM | None:
    """`model` itself, or when it is sharded a plain copy with every weight whole, on rank 0 (a collective:
    every rank calls it; the other ranks get None). The copy is what exports, scores and samples."""
    if not is_sharded(model):
        return model
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # only rank 0 receives the tensors
    state = get_model_state_dict(model, options=options)
    if not state:
        return None
    device = next(p.device for p in model.parameters())
    copy = TernaryLM(model.cfg)
    copy.load_state_dict(state)
    return copy.to(device).train(model.training)

"""FSDP2 for the trainer (`trainer=fsdp`): shard the model on Lightning's mesh, gather a whole copy back.

Under FSDP2 every parameter is a DTensor that holds this rank's rows. Training itself does not care (the
forward all-gathers a block's weights, the backward reduce-scatters its gradients); the export, the final
held-out score and the run's sample need the whole model. Gathering is a collective: every rank calls it.
"""

from __future__ import annotations

from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

from nanoternary.model.sharding import is_sharded
from nanoternary.model.transformer import TernaryLM


def shard_model(model: TernaryLM, mesh: DeviceMesh) -> None:
    """One FSDP2 unit per transformer block, plus the root (embedding = tied head, final norm). A 1-D mesh
    shards over all its ranks; a 2-D (nodes, devices) mesh shards within a node and replicates across nodes
    (HSDP)."""
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


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

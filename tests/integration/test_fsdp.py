"""Sharded training for real: `trainer=fsdp` (FSDP2 through Lightning's ModelParallelStrategy) with Muon + Lion
on 2 CPU processes (gloo), against one process with twice the batch; and Muon's sharded step, exactly."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from nanoternary.cli.distributed import distributed_job
from nanoternary.optim.muon import BatchedMuon
from tests.integration.test_ddp import files_of
from tests.train_cli import TINY, metric_rows, train_cli


def test_two_fsdp_processes_train_like_one_with_twice_the_batch(tmp_path, cache_dir):
    """As the DDP test, with the weights, gradients and optimizer state sharded. The gradients of the two
    runs agree to float rounding; Muon's bf16 Newton-Schulz and Lion's sign() turn rounding into small
    weight differences in a few entries, so the weights are compared loosely and the losses to 1e-3."""
    fsdp_dir, one_dir = tmp_path / "fsdp", tmp_path / "one"
    train_cli(
        cache_dir,
        *TINY,
        "trainer=fsdp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "data.batch_size=2",
        "data.val_batch_size=2",
        f"hydra.run.dir={fsdp_dir}",
    )
    train_cli(
        cache_dir,
        *TINY,
        "trainer=cpu",
        "data.batch_size=4",
        "data.shards_per_device=2",
        f"hydra.run.dir={one_dir}",
    )

    for key, rel in (("train/grad_norm", 5e-4), ("val/loss", 1e-3), ("val/bpb", 1e-3)):
        sharded, one = metric_rows(fsdp_dir, key), metric_rows(one_dir, key)
        assert [s for s, _ in sharded] == [s for s, _ in one] and sharded, key
        assert [v for _, v in sharded] == pytest.approx([v for _, v in one], rel=rel), key
    a, b = (
        torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        for d in (fsdp_dir, one_dir)
    )
    assert a["state_dict"].keys() == b["state_dict"].keys()  # whole tensors under the plain names
    assert [len(o["state"]) for o in a["optimizer_states"]] == [
        len(o["state"]) for o in b["optimizer_states"]
    ]
    diffs = torch.cat([(a["state_dict"][k] - b["state_dict"][k]).abs().flatten() for k in a["state_dict"]])
    assert (diffs > 1e-4).float().mean() < 0.01, f"{int((diffs > 1e-4).sum())} of {diffs.numel()} differ"
    lion_lr = OmegaConf.load(fsdp_dir / ".hydra" / "config.yaml").optim.lion.lr
    assert diffs.max() <= 2 * 2 * lion_lr + 1e-4  # two Lion steps in opposite directions at most
    # rank 0 wrote everything a single process writes: checkpoints, the gathered exports, the GGUF, the logs
    assert files_of(fsdp_dir) == files_of(one_dir)
    assert (fsdp_dir / "export" / "final" / "model.gguf").is_file()
    assert (fsdp_dir / "train.log").read_text().count(" parameters") == 1


def test_an_fsdp_run_resumed_from_its_step_2_checkpoint_ends_bitwise_like_the_uninterrupted_one(
    tmp_path, cache_dir
):
    """Checkpoints hold whole tensors; resuming loads them back into the shards (weights, Muon and Lion
    state, data position, schedule), so 2 steps + 2 resumed steps are exactly 4 steps."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    fsdp = [*TINY, "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=2"]
    fsdp.append("callbacks.wsd.total_steps=4")  # the 2-step leg must follow the 4-step run's schedule
    train_cli(cache_dir, *fsdp, "trainer.max_steps=4", f"run_dir={whole}")
    train_cli(cache_dir, *fsdp, "trainer.max_steps=2", f"run_dir={resumed}")
    train_cli(cache_dir, *fsdp, "trainer.max_steps=4", f"run_dir={resumed}", "ckpt_path=auto")

    assert (
        f"resuming from {resumed / 'checkpoints' / 'step-00000002.ckpt'}"
        in (resumed / "train.log").read_text()
    )
    a, b = (load_file(d / "export" / "final" / "model.safetensors") for d in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (
        torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        for d in (whole, resumed)
    )
    assert ca["global_step"] == cb["global_step"] == 4
    for sa, sb in zip(ca["optimizer_states"], cb["optimizer_states"], strict=True):
        assert sa["state"].keys() == sb["state"].keys()
        for key, state in sa["state"].items():
            assert all(
                torch.equal(v, sb["state"][key][name]) for name, v in state.items() if torch.is_tensor(v)
            )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sharded_muon_step(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    with distributed_job():  # as train.py's ranks end a job: barrier + destroy on success, destroy on failure
        mesh = init_device_mesh("cpu", (2,))
        weights, grads = torch.load(out + ".in")
        params = [torch.nn.Parameter(distribute_tensor(w, mesh, [Shard(0)])) for w in weights]
        opt = BatchedMuon(params, lr=0.02, weight_decay=0.01, momentum=0.95, nesterov=True, ns_steps=3)
        for step in range(2):
            for p, g in zip(params, grads[step], strict=True):
                p.grad = distribute_tensor(g, mesh, p.placements)
            opt.step()
        whole = [p.full_tensor() for p in params]
        if rank == 0:
            torch.save(whole, out)


def test_sharded_muon_step_equals_the_whole_one_bit_for_bit(tmp_path: Path):
    """Two ranks each hold half the rows of every matrix (odd, tall and wide shapes); given the same
    gradients, two BatchedMuon steps leave exactly the weights one process computes."""
    torch.manual_seed(0)
    shapes = [(6, 10), (6, 10), (12, 5), (7, 7)]
    weights = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(2)]
    out = str(tmp_path / "whole.pt")
    torch.save((weights, grads), out + ".in")
    mp.start_processes(sharded_muon_step, args=(free_port(), out), nprocs=2, start_method="spawn")
    sharded = torch.load(out)

    params = [torch.nn.Parameter(w.clone()) for w in weights]
    opt = BatchedMuon(params, lr=0.02, weight_decay=0.01, momentum=0.95, nesterov=True, ns_steps=3)
    for step in range(2):
        for p, g in zip(params, grads[step], strict=True):
            p.grad = g.clone()
        opt.step()
    for got, want in zip(sharded, params, strict=True):
        assert torch.equal(got, want.detach())
    assert not torch.equal(sharded[0], weights[0])  # the step did move the weights

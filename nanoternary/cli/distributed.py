"""Hydra jobs that Lightning runs on several processes.

Lightning's `ddp` strategy starts ranks > 0 by running this script again with the same arguments
plus `hydra.run.dir=<this run's folder>` (SLURM and torchrun start every rank themselves). These
helpers keep those extra processes from writing files of their own and make a multirun job's ranks
join that job instead of starting the whole sweep again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import read_write

# what Lightning's subprocess launcher sets in the launching process (lightning.fabric ... subprocess_script)
LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def file_logs_on_rank_zero_only() -> None:
    """Ranks > 0 share the run folder with rank 0: they log to the console only, so train.log is
    rank 0's alone (the handler is configured with delay=True, so until now it has opened nothing)."""
    if rank_zero_only.rank == 0:
        return
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
        handler.close()


def ddp_children_rerun_this_job() -> None:
    """In a multirun, the re-run arguments would be the sweep's (`-m`, comma lists, an Optuna search):
    give the other ranks this job's own overrides, single-run mode and this job's folder instead."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task, "hydra.mode=RUN"]
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir


@contextlib.contextmanager
def distributed_job() -> Iterator[None]:
    """One job's distributed state, undone when it ends so that the next job of a multirun in this
    process starts its own: the process group (Lightning would reuse it, though its other ranks have
    exited) and the variables Lightning's launcher put in os.environ (with LOCAL_RANK set, the next job
    would wait for ranks that nobody starts). Variables set from outside (SLURM, torchrun) are kept."""
    saved = {name: os.environ.get(name) for name in LAUNCHER_VARIABLES}
    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

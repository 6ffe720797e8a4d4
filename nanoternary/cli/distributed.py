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
import time
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
    except BaseException:  # no last barrier: the other ranks may be gone
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        raise
    else:
        if dist.is_available() and dist.is_initialized():
            end_process_group()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def end_process_group() -> None:
    """Every rank's last step once its work is done: a barrier, a pause, then destroy_process_group.

    When a collective completes, gloo's worker thread releases its reference to it, and with the last one
    the tensors it used, whose Python wrappers need the GIL. If Python is already shutting down by then, the
    thread dies inside a C++ destructor and the process aborts ("terminate called without an active
    exception"; core dump: ~AsyncBarrierWork -> ~AsyncAllgatherCoalescedWork -> decref_pyobject -> take_gil
    during Py_FinalizeEx), about one finished 2-process CPU run in 50 with a plain barrier. So this process
    keeps the barrier's handle (and through it the collectives before it) until the group is destroyed, and
    first gives the worker threads a moment without the GIL to finish."""
    barrier = dist.barrier(async_op=True)
    barrier.wait()
    time.sleep(0.05)
    dist.destroy_process_group()
    del barrier  # released here, holding the GIL, not on a gloo thread

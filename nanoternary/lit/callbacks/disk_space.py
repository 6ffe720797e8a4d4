"""Free space on the checkpoint filesystem, checked before every save and every N steps.

Thresholds: `min_free_gb` (GB = 10^9 bytes that must stay free after the next checkpoint) and
`max_used_pct` (how full the filesystem may get). When space is short, retention first prunes to
make room for one more checkpoint (`prune_first`); if that is not enough, the action decides:
`warn` saves anyway, `skip_save` skips this checkpoint, `stop` ends training cleanly with a message
that says how much space to free and where.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import lightning as L

from nanoternary.lit.callbacks.retention import Retention
from nanoternary.lit.rank_zero import rank_zero_result
from nanoternary.lit.run_files import CheckpointLayout

log = logging.getLogger(__name__)

ACTIONS = ("warn", "skip_save", "stop")
GB = 1e9


def existing_parent(path: Path) -> Path:
    """The path itself or its nearest existing ancestor: the filesystem it is (or will be) on."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def mount_point(path: Path) -> Path:
    path = existing_parent(path)
    while not os.path.ismount(path):
        path = path.parent
    return path


def size_text(n: float) -> str:
    """Bytes for people: '1.50 GB', '20.6 MB', '512 B' (decimal units, like df -H)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.{2 if unit == 'GB' else 1}f} {unit}"
    return f"{n:.0f} B"


def space_report(path: Path, need_bytes: int) -> str:
    """Free space where `path` lives, for messages."""
    usage = shutil.disk_usage(existing_parent(path))
    return (
        f"{size_text(usage.free)} free of {size_text(usage.total)} on the filesystem mounted at "
        f"{mount_point(path)}; a checkpoint takes about {size_text(need_bytes)}"
    )


class DiskSpace(L.Callback):
    def __init__(
        self,
        dirpath: str,
        min_free_gb: float = 1.0,
        max_used_pct: float | None = None,
        action: str = "stop",
        prune_first: bool = True,
        check_every_n_steps: int = 100,
    ) -> None:
        if min_free_gb < 0:
            raise ValueError(f"disk_space.min_free_gb must be >= 0, got {min_free_gb}")
        if max_used_pct is not None and not 0 < max_used_pct <= 100:
            raise ValueError(f"disk_space.max_used_pct must be in (0, 100] or null, got {max_used_pct}")
        if action not in ACTIONS:
            raise ValueError(f"disk_space.action must be one of {ACTIONS}, got {action!r}")
        if check_every_n_steps < 0:
            raise ValueError(
                f"disk_space.check_every_n_steps must be >= 0 (0 = only before saves), got {check_every_n_steps}"
            )
        self.dirpath = Path(dirpath)
        self.min_free_gb, self.max_used_pct, self.action = min_free_gb, max_used_pct, action
        self.prune_first, self.every = prune_first, check_every_n_steps
        self.layout: CheckpointLayout | None = None
        self.retention: Retention | None = None
        self._checked_step = -1

    def attach(self, layout: CheckpointLayout, retention: Retention | None) -> None:
        """StepCheckpoint hands over what to prune when space runs low."""
        self.layout, self.retention = layout, retention

    def shortfall(self, need_bytes: int) -> int:
        """Bytes to free before writing `need_bytes` keeps both thresholds; <= 0 means enough room."""
        usage = shutil.disk_usage(existing_parent(self.dirpath))
        short = self.min_free_gb * GB + need_bytes - usage.free
        if self.max_used_pct is not None:
            short = max(short, usage.total - usage.free + need_bytes - usage.total * self.max_used_pct / 100)
        return int(short)

    def message(self, need_bytes: int, short: int) -> str:
        limits = f"min_free_gb={self.min_free_gb}" + (
            f", max_used_pct={self.max_used_pct}" if self.max_used_pct is not None else ""
        )
        run_dir = self.layout.ckpt_dir.parent if self.layout is not None else self.dirpath.parent
        return (
            f"not enough disk space for checkpoints in {self.dirpath}: {space_report(self.dirpath, need_bytes)}, "
            f"and callbacks.disk_space asks for {limits}. Free at least {size_text(short)} on that filesystem "
            f"(or relax those limits), then continue with ckpt_path=auto run_dir={run_dir}"
        )

    def find_room(self, need_bytes: int) -> str | None:
        """None if `need_bytes` fit (after pruning if allowed), else the message saying what is missing."""
        short = self.shortfall(need_bytes)
        can_prune = self.prune_first and self.retention is not None and self.layout is not None
        if short > 0 and can_prune and self.retention.prune(self.layout, room_for=1):
            short = self.shortfall(need_bytes)
        return self.message(need_bytes, short) if short > 0 else None

    def allow_save(self, trainer: L.Trainer, pl_module: L.LightningModule, need_bytes: int) -> bool:
        """Check before a checkpoint of about `need_bytes`; acts per `action`. Same answer on every rank."""
        problem = rank_zero_result(trainer, lambda: self.find_room(need_bytes))
        if problem is None:
            return True
        if self.action == "warn":
            log.warning("%s (disk_space.action=warn: saving anyway)", problem)
            return True
        if self.action == "skip_save":
            log.warning(
                "%s (disk_space.action=skip_save: checkpoint of step %d skipped)",
                problem,
                trainer.global_step,
            )
            return False
        pl_module.request_stop(problem)
        return False

    def next_checkpoint_bytes(self) -> int:
        steps = self.layout.steps() if self.layout is not None else []
        return self.layout.size_of(steps[-1]) if steps else 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not self.every or not step or step % self.every or step == self._checked_step:
            return
        self._checked_step = step
        free = shutil.disk_usage(existing_parent(self.dirpath)).free
        pl_module.log("sys/disk_free_gb", free / GB, on_step=True, on_epoch=False)
        if self.action != "skip_save":  # skip_save acts when a save comes
            self.allow_save(trainer, pl_module, self.next_checkpoint_bytes())

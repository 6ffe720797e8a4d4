"""Resume checkpoints: checkpoints/step-XXXXXXXX.ckpt every N optimizer steps, plus last.ckpt.

Lightning's ModelCheckpoint assumes automatic optimization for step-based saving; this callback
counts optimizer steps itself (robust to gradient accumulation) and writes every file atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Checkpoint

from nanoternary.io.atomic import fsync_dir


def ckpt_name(step: int) -> str:
    return f"step-{step:08d}.ckpt"


class StepCheckpoint(Checkpoint):
    def __init__(self, dirpath: str, every_n_steps: int = 500, save_last: bool = True) -> None:
        if every_n_steps < 0:
            raise ValueError(f"checkpoint.every_n_steps must be >= 0 (0 = only last.ckpt), got {every_n_steps}")
        self.dirpath = Path(dirpath)
        self.every_n_steps, self.save_last = every_n_steps, save_last
        self._last_saved_step = -1

    def save(self, trainer: L.Trainer, name: str) -> Path:
        """trainer.save_checkpoint to a temp name, then rename: a reader never sees a partial .ckpt."""
        final = self.dirpath / name
        tmp = self.dirpath / f".{name}.tmp-{os.getpid()}"
        try:
            trainer.save_checkpoint(tmp)
            if trainer.is_global_zero:
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, final)
                fsync_dir(self.dirpath)
        finally:
            if trainer.is_global_zero:
                tmp.unlink(missing_ok=True)
        return final

    def save_step(self, trainer: L.Trainer) -> None:
        step = trainer.global_step
        if step == self._last_saved_step:
            return
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
        if self.every_n_steps and step % self.every_n_steps == 0:
            self.save(trainer, ckpt_name(step))
        if self.save_last:
            self.save(trainer, "last.ckpt")
        self._last_saved_step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step and step % self.every_n_steps == 0:
            self.save_step(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step:
            self.save_step(trainer)

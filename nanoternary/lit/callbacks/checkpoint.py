"""Resume checkpoints: checkpoints/step-XXXXXXXX.ckpt every N optimizer steps and the model folder
export/step-XXXXXXXX/ beside it, and last.ckpt (a hard link to the newest).

A save has two phases, so that a checkpoint never claims more than the files around it hold:
- at the end of step N (on_train_batch_end, where Lightning expects the loop state to be taken) the
  .ckpt, with a sha256 of its content inside, and the model folder are written under temp names;
- when step N + 1 starts (or training ends), after step N's metrics rows and validation are logged,
  the logger is flushed and the folder, then the .ckpt, are renamed into place: the commit.
A crash before the commit leaves the previous checkpoint as the newest; temps are removed on the next
start. A full disk in either phase removes the partial files and stops training cleanly.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint
from safetensors import SafetensorError

from nanoternary.io.atomic import fsync_dir
from nanoternary.lit.callbacks.disk_space import DiskSpace, space_report
from nanoternary.lit.callbacks.export import ModelExport
from nanoternary.lit.callbacks.retention import Retention
from nanoternary.lit.fsdp import whole_model
from nanoternary.lit.rank_zero import rank_zero_result
from nanoternary.lit.run_files import (
    DIGEST_KEY,
    LAST,
    CheckpointLayout,
    checkpoint_digest,
    ckpt_name,
    discard_dir,
)
from nanoternary.model.sharding import whole

log = logging.getLogger(__name__)

# How torch, safetensors and the OS report that the disk refused the bytes (full, quota, I/O error).
STORAGE_MARKERS = (
    "No space left",
    "os error",
    "I/O error",
    "inline_container",
    "PytorchStreamWriter",
    "file write failed",
)


def is_storage_error(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return True
    return isinstance(exc, (RuntimeError, SafetensorError)) and any(m in str(exc) for m in STORAGE_MARKERS)


class DirectCheckpointIO(TorchCheckpointIO):
    """torch.save straight into the target file, then fsync; the content's sha256 goes inside (see
    run_files.checkpoint_digest). Lightning's default serializes to memory and stages the bytes in the
    system temp dir before copying them over: two extra copies, and a full /tmp breaks saving even when
    the run's disk has room. While `capture` is on, a storage error is kept in `error` instead of
    raised, so every rank still reaches the barrier after the save."""

    def __init__(self) -> None:
        super().__init__()
        self.capture = False
        self.error: BaseException | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        try:
            torch.save({**checkpoint, DIGEST_KEY: checkpoint_digest(checkpoint)}, str(path))
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        except Exception as exc:
            if not (self.capture and is_storage_error(exc)):
                raise
            self.error = exc


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
        "torch": torch.get_rng_state(),
    }
    state["numpy"]["state"]["key"] = state["numpy"]["state"][
        "key"
    ].tolist()  # plain types: weights_only loads
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    numpy_state = dict(state["numpy"], state=dict(state["numpy"]["state"]))
    numpy_state["state"]["key"] = np.asarray(numpy_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def non_finite_parameters(module: torch.nn.Module) -> list[str]:
    params = {name: whole(p) for name, p in module.named_parameters()}  # under FSDP: every rank calls this
    if bool(torch.stack([torch.isfinite(p).all() for p in params.values()]).all()):  # one sync per save
        return []
    return [name for name, p in params.items() if not bool(torch.isfinite(p).all())]


@dataclass
class Pending:
    """A .ckpt (and its model folder) written under temp names, waiting for the commit."""

    step: int
    name: str
    tmp: Path
    folder: Path | None  # temp model folder, None for last.ckpt or without export


class StepCheckpoint(Checkpoint):
    def __init__(
        self, dirpath: str, every_n_steps: int = 500, save_last: bool = True, export: bool = True
    ) -> None:
        if every_n_steps < 0:
            raise ValueError(
                f"checkpoint.every_n_steps must be >= 0 (0 = only last.ckpt), got {every_n_steps}"
            )
        self.layout = CheckpointLayout(Path(dirpath))
        self.every_n_steps, self.save_last, self.export = every_n_steps, save_last, export
        self.exporter: ModelExport | None = None
        self.retention: Retention | None = None
        self.disk: DiskSpace | None = None
        self._io: DirectCheckpointIO | None = None
        self._pending: Pending | None = None
        self._last_saved_step = -1
        self._saving_step = -1
        self._rng_to_restore: dict | None = None

    @property
    def dirpath(self) -> Path:
        return self.layout.ckpt_dir

    # ---- wiring and state ---------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        def find(kind: type) -> Any:
            return next((cb for cb in trainer.callbacks if isinstance(cb, kind)), None)

        self.exporter = find(ModelExport) if self.export else None
        self.retention, self.disk = find(Retention), find(DiskSpace)
        self.layout = CheckpointLayout(self.layout.ckpt_dir, self.exporter.dirpath if self.exporter else None)
        if self.disk is not None:
            self.disk.attach(self.layout, self.retention)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            self._io = DirectCheckpointIO()
            trainer.strategy.checkpoint_io = self._io
        if trainer.is_global_zero:
            self.layout.ckpt_dir.mkdir(parents=True, exist_ok=True)
            self.layout.clean_temps()

    def state_dict(self) -> dict[str, Any]:
        self._rng_to_restore = rng_state()
        return {"step": self._saving_step, "rng": self._rng_to_restore}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_saved_step = int(state_dict.get("step", -1))
        self._rng_to_restore = state_dict.get("rng")

    # ---- hooks --------------------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int
    ) -> None:
        # The next step starts from the RNG state saved in the checkpoint, in the uninterrupted run as in a
        # resumed one: whatever drew from the global RNG in between (creating the validation or training
        # dataloader iterator does) is not part of the training stream.
        if self._rng_to_restore is not None:
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        self.commit(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_steps and step and step % self.every_n_steps == 0 and step != self._last_saved_step:
            self.begin(trainer, pl_module, step, ckpt_name(step))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.commit(trainer, pl_module)
        step = trainer.global_step
        if self.save_last and step and step != self._last_saved_step and not pl_module.stop_reason:
            self.begin(trainer, pl_module, step, LAST)
            self.commit(trainer, pl_module)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if self._pending is not None and trainer.is_global_zero:
            self._pending.tmp.unlink(missing_ok=True)
            if self._pending.folder is not None:
                shutil.rmtree(self._pending.folder, ignore_errors=True)
        self._pending = None

    # ---- the two phases -----------------------------------------------------------------------
    def expected_bytes(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int:
        """Size of the newest saved step, or before the first save an estimate from the tensors."""
        steps = self.layout.steps()
        if steps:
            return self.layout.size_of(steps[-1])
        tensors = list(pl_module.state_dict().values()) + [
            t
            for opt in trainer.optimizers
            for s in opt.state.values()
            for t in s.values()
            if torch.is_tensor(t)
        ]
        weights = sum(4 * t.numel() for t in pl_module.state_dict().values()) if self.exporter else 0
        return sum(t.numel() * t.element_size() for t in tensors) + weights

    def begin(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int, name: str) -> None:
        """Phase 1: write the .ckpt and the model folder under temp names (never a non-finite model)."""
        if pl_module.stop_reason:
            return
        bad = non_finite_parameters(pl_module)
        if bad:
            newest = self.layout.steps()[-1:] or ["none"]
            pl_module.request_stop(
                f"refusing to save a non-finite model at step {step} ({len(bad)} parameters hold NaN/inf, "
                f"e.g. {bad[:3]}); the newest good checkpoint (step {newest[0]}) is kept"
            )
            return
        need = self.expected_bytes(trainer, pl_module)
        if self.disk is not None and not self.disk.allow_save(trainer, pl_module, need):
            return
        for logger in trainer.loggers:  # rows of earlier steps reach the disk before this step commits
            logger.save()
        pending = Pending(
            step,
            name,
            self.layout.temp(name),
            self.layout.temp_export(step) if name != LAST and self.exporter is not None else None,
        )
        self._saving_step = step
        error = self.write_ckpt(trainer, pending.tmp)
        if pending.folder is not None:
            # under FSDP a collective: every rank gathers, whatever its .ckpt write did
            model = whole_model(pl_module.model)
            if error is None and trainer.is_global_zero:
                try:
                    self.exporter.write(trainer, pl_module, model, pending.folder.name)
                except Exception as exc:
                    if not is_storage_error(exc):
                        raise
                    error = exc
        failure = rank_zero_result(trainer, lambda: self.failure(error, pending, need))
        if failure is not None:
            pl_module.request_stop(failure)
            return
        self._pending = pending

    def write_ckpt(self, trainer: L.Trainer, tmp: Path) -> BaseException | None:
        if self._io is not None:
            self._io.capture, self._io.error = True, None
        try:
            trainer.save_checkpoint(tmp, weights_only=False)
        except Exception as exc:
            if not is_storage_error(exc):
                raise
            return exc
        finally:
            if self._io is not None:
                self._io.capture = False
        return self._io.error if self._io is not None else None

    def failure(self, error: BaseException | None, p: Pending, need: int) -> str | None:
        """Rank 0: after a failed write, remove the partial files and describe what happened."""
        if error is None:
            return None
        p.tmp.unlink(missing_ok=True)
        self.layout.temp(LAST).unlink(missing_ok=True)
        if p.folder is not None:
            shutil.rmtree(p.folder, ignore_errors=True)
        newest = self.layout.steps()
        kept = (
            f"the newest complete checkpoint is {self.layout.ckpt(newest[-1])}"
            if newest
            else "no checkpoint was saved yet"
        )
        target = self.layout.ckpt_dir / p.name
        return (
            f"writing checkpoint {target} failed: {error}. The partial files were removed and {kept}. "
            f"{space_report(target.parent, need)}. Free space there, then continue with "
            f"ckpt_path=auto run_dir={self.layout.ckpt_dir.parent}"
        )

    def commit(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Phase 2: flush the logger, rename the model folder and then the .ckpt into place, link
        last.ckpt, prune."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        for logger in trainer.loggers:
            logger.save()
        failure = rank_zero_result(trainer, lambda: self.commit_files(pending))
        if failure is not None:
            pl_module.request_stop(failure)
            return
        self._last_saved_step = pending.step
        if self.retention is not None and trainer.is_global_zero:
            self.retention.prune(self.layout)

    def commit_files(self, p: Pending) -> str | None:
        final = self.layout.ckpt_dir / p.name
        try:
            if p.folder is not None:
                discard_dir(self.layout.export(p.step))  # left by an attempt that died before its commit
                os.replace(p.folder, self.layout.export(p.step))
            os.replace(p.tmp, final)
            fsync_dir(final.parent)
            if self.save_last and p.name != LAST:
                self.link_last(final)
        except Exception as exc:
            if not is_storage_error(exc):
                raise
            if not final.exists() and p.folder is not None:
                discard_dir(self.layout.export(p.step))  # a model folder without its committed .ckpt
            return self.failure(exc, p, final.stat().st_size if final.exists() else 0)
        return None

    def link_last(self, final: Path) -> None:
        """last.ckpt as a hard link to the newest step: no second copy on disk (a copy where links fail)."""
        tmp = self.layout.temp(LAST)
        tmp.unlink(missing_ok=True)
        try:
            os.link(final, tmp)
        except OSError:
            shutil.copyfile(final, tmp)
        os.replace(tmp, self.layout.ckpt_dir / LAST)
        fsync_dir(self.layout.ckpt_dir)

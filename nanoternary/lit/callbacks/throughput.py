"""Tokens per second over each logging interval, measured on the host clock without device syncs."""

from __future__ import annotations

import time

import lightning as L


class Throughput(L.Callback):
    def __init__(self, log_every_n_steps: int = 10) -> None:
        if log_every_n_steps < 1:
            raise ValueError(f"throughput.log_every_n_steps must be >= 1, got {log_every_n_steps}")
        self.every = log_every_n_steps
        self._t0: float | None = None
        self._tokens = 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        self._tokens += batch.shape[0] * (batch.shape[1] - 1) * trainer.world_size
        if self._t0 is None:  # the first batch includes compilation: start the clock after it
            self._t0, self._tokens = time.perf_counter(), 0
            return
        if trainer.global_step % self.every == 0 and self._tokens:
            elapsed = time.perf_counter() - self._t0
            pl_module.log(
                "perf/tokens_per_sec", self._tokens / elapsed, on_step=True, on_epoch=False, prog_bar=True
            )
            self._t0, self._tokens = time.perf_counter(), 0

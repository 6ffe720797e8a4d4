"""The training step logs only on the batches whose values reach the loggers (nanoternary/lit/log_due.py):
the metrics file is the one that logging every batch would give, without the per-batch cost."""

from __future__ import annotations

import csv

import lightning as L

from tests.tiny_run import tiny_datamodule, tiny_module, tiny_trainer


class BatchIndex(L.Callback):
    def __init__(self) -> None:
        self.batch_idx = -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch_idx = batch_idx


def test_training_step_logs_on_logging_batches_only(tmp_path, cache_dir):
    dm = tiny_datamodule(cache_dir)
    module = tiny_module(dm)
    where, calls = BatchIndex(), []
    log = module.log

    def counting_log(name, *args, **kwargs):
        calls.append((where.batch_idx, name))
        return log(name, *args, **kwargs)

    module.log = counting_log
    trainer = tiny_trainer(
        tmp_path, 7, [where], log_every_n_steps=3, val_check_interval=100, limit_val_batches=0
    )
    trainer.fit(module, datamodule=dm)
    assert sorted(calls) == [
        (b, name) for b in (2, 5) for name in ("train/grad_norm", "train/loss", "train/skipped_steps")
    ]
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == [2, 5]
    assert all(float(r["train/grad_norm"]) > 0 and float(r["train/skipped_steps"]) == 0 for r in rows)

"""The NaN/inf guard, in real (tiny) training runs: a poisoned loss skips exactly its step, a streak of
them stops training with a clear message, and a non-finite model never replaces a good checkpoint."""

from __future__ import annotations

import csv
import math

import lightning as L
import pytest
import torch

from nanoternary.lit.module import lm_loss
from nanoternary.lit.nan_guard import NonFiniteGuard
from nanoternary.lit.resume import read_checkpoint
from tests.tiny_run import run_callbacks, tiny_datamodule, tiny_module, tiny_trainer

POISONS = {"nan": lambda loss: loss * float("nan"), "inf": lambda loss: loss + float("inf")}


def poisoned(calls: set[int], poison):
    """The training loss, poisoned on the given calls (1-based: call n is micro-batch n)."""
    count = 0

    def loss_fn(model, batch):
        nonlocal count
        count += 1
        loss = lm_loss(model, batch)
        return poison(loss) if count in calls else loss

    return loss_fn


class Snapshots(L.Callback):
    """Parameters and optimizer states around one training batch."""

    def __init__(self, batch_idx: int) -> None:
        self.batch_idx, self.before, self.after = batch_idx, None, None

    @staticmethod
    def grab(trainer, pl_module):
        params = {k: v.detach().clone() for k, v in pl_module.named_parameters()}
        states = [
            {i: {k: t.clone() for k, t in s.items()} for i, s in enumerate(o.state.values())}
            for o in trainer.optimizers
        ]
        return params, states

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.batch_idx:
            self.before = self.grab(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.batch_idx:
            self.after = self.grab(trainer, pl_module)


def rows(path):
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r["train/loss"]]


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_one_poisoned_batch_is_skipped_and_logged(tmp_path, code_corpus, cache_dir, kind):
    dm = tiny_datamodule(cache_dir)
    module = tiny_module(dm)
    module.train_loss_fn = poisoned({3}, POISONS[kind])
    skip, after_skip = Snapshots(2), Snapshots(3)
    trainer = tiny_trainer(tmp_path, 5, [skip, after_skip])
    trainer.fit(module, datamodule=dm)

    assert trainer.global_step == 5 and module.stop_reason is None
    params_before, states_before = skip.before
    params_after, states_after = skip.after
    assert all(torch.equal(params_before[k], params_after[k]) for k in params_before)
    assert all(
        torch.equal(a[i][k], b[i][k])
        for a, b in zip(states_before, states_after, strict=True)
        for i in a
        for k in a[i]
    )
    assert not torch.equal(
        after_skip.before[0]["model.embed.weight"], after_skip.after[0]["model.embed.weight"]
    )
    logged = rows(tmp_path / "metrics.csv")
    assert [float(r["train/skipped_steps"]) for r in logged] == [0, 0, 1, 1, 1]
    assert not math.isfinite(float(logged[2]["train/loss"])) and math.isfinite(float(logged[3]["train/loss"]))
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_a_streak_of_bad_steps_stops_cleanly_with_a_message(tmp_path, code_corpus, cache_dir):
    dm = tiny_datamodule(cache_dir)
    module = tiny_module(dm, max_nonfinite_steps=3)
    module.train_loss_fn = poisoned(set(range(3, 100)), POISONS["nan"])
    trainer = tiny_trainer(tmp_path, 20, run_callbacks(tmp_path))
    trainer.fit(module, datamodule=dm)

    assert trainer.global_step == 5  # steps 3, 4, 5 were bad
    assert module.stop_reason.startswith(
        "3 optimizer steps in a row (up to step 5) had a non-finite loss or gradient norm; each was skipped"
    )
    assert not (tmp_path / "export" / "final").exists()
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step-00000002.ckpt", "step-00000004.ckpt"]
    assert read_checkpoint(tmp_path / "checkpoints" / "step-00000004.ckpt")["nonfinite_guard"] == {
        "skipped": 2,
        "consecutive": 2,
    }


class PoisonWeight(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 2:
            with torch.no_grad():
                pl_module.model.embed.weight[0, 0] = float("nan")


def test_a_non_finite_model_never_replaces_a_good_checkpoint(tmp_path, code_corpus, cache_dir):
    dm = tiny_datamodule(cache_dir)
    module = tiny_module(dm, max_nonfinite_steps=100)
    trainer = tiny_trainer(tmp_path, 8, [PoisonWeight(), *run_callbacks(tmp_path)])
    trainer.fit(module, datamodule=dm)

    assert trainer.global_step == 4
    assert module.stop_reason.startswith(
        "refusing to save a non-finite model at step 4 (1 parameters hold NaN/inf, "
        "e.g. ['model.embed.weight']); the newest good checkpoint (step 2) is kept"
    )
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt", "step-00000002.ckpt"]
    good = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert good["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in good["state_dict"].values())
    assert not (tmp_path / "export" / "step-00000004").exists()


def test_guard_counts_and_validates():
    guard = NonFiniteGuard(2)
    for finite in (True, False, True, False, False):
        guard.record(finite)
    assert (guard.skipped, guard.consecutive, guard.exhausted) == (3, 2, True)
    with pytest.raises(ValueError, match="max_nonfinite_steps must be an integer >= 1, got 0"):
        NonFiniteGuard(0)

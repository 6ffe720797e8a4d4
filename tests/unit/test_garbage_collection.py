import gc

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from nanoternary.lit.callbacks.garbage_collection import GarbageCollection


class LinearModule(L.LightningModule):
    """A one-layer regression: enough for real optimizer steps; `fail_at` raises in that batch."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.fail_at = fail_at

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if batch_idx == self.fail_at:
            raise RuntimeError("failing on purpose")
        return self.layer(batch).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.randn(64, 4), batch_size=2)


class CollectorLog(L.Callback):
    """Records (optimizer step, generation) of every collection that starts inside a training batch
    (GarbageCollection's batch-end hook runs before this one's), and whether automatic collection was on
    at each batch start."""

    def __init__(self) -> None:
        self.collections: list[tuple[int, int]] = []
        self.auto_enabled: list[bool] = []
        self.trainer: L.Trainer | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.trainer = trainer
        self.auto_enabled.append(gc.isenabled())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.trainer = None

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start" and self.trainer is not None:
            self.collections.append((self.trainer.global_step, info["generation"]))


def fit(module: L.LightningModule, callback: GarbageCollection, **trainer_kwargs) -> CollectorLog:
    log = CollectorLog()
    gc.callbacks.append(log)
    try:
        trainer = L.Trainer(
            callbacks=[callback, log],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            **trainer_kwargs,
        )
        trainer.fit(module)
    finally:
        gc.callbacks.remove(log)
    return log


@pytest.fixture
def automatic_gc():
    """Each test starts with automatic collection on and leaves it as the suite had it."""
    was = gc.isenabled()
    gc.enable()
    yield
    (gc.enable if was else gc.disable)()


def test_collects_the_young_generations_every_n_optimizer_steps_with_automatic_collection_off(automatic_gc):
    log = fit(LinearModule(), GarbageCollection(every_n_steps=3), max_steps=7, accumulate_grad_batches=2)
    assert log.auto_enabled == [False] * 14  # 7 steps of 2 micro-batches, automatic collection off in all
    assert log.collections == [(3, 1), (6, 1)]  # once per multiple of 3, not once per micro-batch
    assert gc.isenabled()


def test_leaves_automatic_collection_off_after_the_fit_if_it_was_off_before(automatic_gc):
    gc.disable()
    fit(LinearModule(), GarbageCollection(every_n_steps=2), max_steps=2)
    assert not gc.isenabled()


def test_turns_automatic_collection_back_on_when_the_fit_fails(automatic_gc):
    with pytest.raises(RuntimeError, match="failing on purpose"):
        fit(LinearModule(fail_at=3), GarbageCollection(every_n_steps=2), max_steps=10)
    assert gc.isenabled()


def test_rejects_a_schedule_below_one_step():
    with pytest.raises(ValueError, match="garbage_collection.every_n_steps must be >= 1, got 0"):
        GarbageCollection(every_n_steps=0)

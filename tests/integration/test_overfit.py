"""The whole optimizer path (Muon + Lion, clipping, manual optimization) can memorise one batch."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from nanoternary.lit.module import LitTernaryLM
from nanoternary.model.config import ModelConfig

OPTIM = {
    "name": "muon_lion",
    "muon": {
        "lr": 0.02,
        "momentum": 0.95,
        "nesterov": True,
        "ns_steps": 3,
        "weight_decay": 0.0,
        "adjust_lr_fn": "original",
    },
    "lion": {"lr": 3e-3, "betas": [0.9, 0.99], "weight_decay": 0.0},
    "grad_clip": 1.0,
    "accumulate": 1,
}


class OneBatch(Dataset):
    def __init__(self, batch: torch.Tensor, steps: int):
        self.batch, self.steps = batch, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.batch


def fit_one_batch(optim: dict, steps: int = 60) -> tuple[float, float]:
    L.seed_everything(0)
    cfg = ModelConfig(n_layers=2, context_length=32).to_dict()
    module = LitTernaryLM(model=cfg, optim=optim)
    batch = torch.randint(0, 4096, (4, 33))
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, b, i):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Record()],
    )
    trainer.fit(module, DataLoader(OneBatch(batch, steps), batch_size=None))
    assert trainer.global_step == steps
    return losses[0], min(losses[-5:])


def test_overfit_one_batch_muon_lion():
    first, last = fit_one_batch(OPTIM)
    assert first > 8.0
    assert last < 0.25 * first


def test_overfit_one_batch_adamw_and_accumulation():
    adamw = {
        "name": "adamw",
        "adamw": {"lr": 3e-3, "betas": [0.9, 0.95], "weight_decay": 0.0},
        "grad_clip": 1.0,
        "accumulate": 2,
    }
    first, last = fit_one_batch(adamw, steps=60)
    assert last < 0.5 * first

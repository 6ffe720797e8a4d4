"""A tiny but real training setup for in-process Lightning tests: 1 layer, dim 256, 64-token context,
the stdlib corpus from the session cache, Muon + Lion as configured in conf/optim/muon_lion.yaml."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf

from nanoternary.data.datamodule import PreparedCorpus, TokenDataModule
from nanoternary.lit.callbacks.checkpoint import StepCheckpoint
from nanoternary.lit.callbacks.export import ModelExport
from nanoternary.lit.module import LitTernaryLM
from nanoternary.model.config import ModelConfig
from tests.conftest import REPO_ROOT

TINY_MODEL = ModelConfig(dim=256, n_layers=1, n_heads=4, ffn_dim=512, context_length=64).to_dict()


@functools.cache
def prepared(cache_dir: str) -> PreparedCorpus:
    """Tokenizer and token caches, hashed and loaded once per session."""
    return tiny_datamodule(Path(cache_dir), shared=False).prepare()


def tiny_datamodule(cache_dir: Path, shared: bool = True) -> TokenDataModule:
    dm = TokenDataModule(
        source="code", batch_size=2, seq_len=64, vocab_size=4096, cache_dir=str(cache_dir), val_batch_size=2
    )
    if shared:
        dm.corpus = prepared(str(cache_dir))
    return dm


def tiny_module(dm: TokenDataModule, **kwargs: Any) -> LitTernaryLM:
    optim = OmegaConf.to_container(OmegaConf.load(REPO_ROOT / "conf" / "optim" / "muon_lion.yaml"))
    corpus = dm.prepare()
    return LitTernaryLM(
        model=dict(TINY_MODEL), optim=optim, token_bytes=corpus.token_bytes(), eot_id=corpus.eot_id, **kwargs
    )


def run_callbacks(run_dir: Path, every_n_steps: int = 2) -> list[L.Callback]:
    """Checkpoints every `every_n_steps` with their model folders, and export/final/."""
    return [
        ModelExport(str(run_dir / "export"), final_eval=False),
        StepCheckpoint(str(run_dir / "checkpoints"), every_n_steps=every_n_steps),
    ]


def tiny_trainer(run_dir: Path, max_steps: int, callbacks: list[L.Callback], **kwargs: Any) -> L.Trainer:
    settings: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=max_steps,
        max_epochs=-1,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        logger=CSVLogger(str(run_dir), name="", version=""),
    )
    return L.Trainer(callbacks=callbacks, **{**settings, **kwargs})

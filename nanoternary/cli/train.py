"""`python train.py model=tiny optim=muon_lion trainer=cpu`: train, evaluate, export, sample."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from nanoternary.cli.resolvers import register_resolvers
from nanoternary.cli.report import print_run_summary
from nanoternary.data.datamodule import TokenDataModule
from nanoternary.lit.callbacks.export import ModelExport
from nanoternary.lit.module import LitTernaryLM

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
log = logging.getLogger(__name__)
register_resolvers()


def instantiate_all(node: DictConfig | None) -> list[Any]:
    """Instantiate every `_target_` entry of a dict-shaped config group (callbacks, logger)."""
    if not node:
        return []
    return [instantiate(v) for v in node.values() if isinstance(v, DictConfig) and "_target_" in v]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job and return its final metrics (what a Hydra sweeper optimizes)."""
    started = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True)
    datamodule: TokenDataModule = instantiate(cfg.data)
    corpus = datamodule.prepare()
    if corpus.tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"tokenizer has {corpus.tokenizer.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}"
        )
    module = LitTernaryLM(
        model=cfg.model,
        optim=cfg.optim,
        token_bytes=corpus.tokenizer.token_bytes().tolist(),
        eot_id=corpus.tokenizer.eot_id,
        compile=cfg.compile,
    )
    callbacks = instantiate_all(cfg.get("callbacks"))
    for cb in callbacks:
        if isinstance(cb, ModelExport):
            cb.run_summary = {"max_steps": cfg.trainer.max_steps, "batch_size": cfg.data.batch_size,
                              "seq_len": cfg.data.seq_len, "seed": cfg.seed, "precision": cfg.trainer.precision}
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=instantiate_all(cfg.get("logger")) or False)
    log.info("model: %s parameters", f"{module.model.num_parameters():,}")
    trainer.fit(module, datamodule=datamodule)
    export = next((cb for cb in callbacks if isinstance(cb, ModelExport)), None)
    result = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if export is not None and export.final_meta:
        result.update({"val/loss": export.final_meta["val_loss"], "val/bpb": export.final_meta["val_bpb"]})
    if trainer.is_global_zero:
        print_run_summary(
            run_dir=Path(cfg.paths.output_dir),
            module=module,
            datamodule=datamodule,
            metrics=result,
            wall_seconds=time.perf_counter() - started,
            sample_prompt=cfg.sample_prompt,
            sample_tokens=cfg.sample_tokens,
        )
    return result


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    log.debug("config:\n%s", OmegaConf.to_yaml(cfg))
    return train(cfg).get("val/bpb")


if __name__ == "__main__":
    main()

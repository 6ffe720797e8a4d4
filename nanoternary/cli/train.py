"""`python train.py model=tiny optim=muon_lion trainer=cpu`: train, evaluate, export, sample."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from nanoternary.cli.compare import load_run, plot_runs
from nanoternary.cli.distributed import (
    ddp_children_rerun_this_job,
    distributed_job,
    file_logs_on_rank_zero_only,
)
from nanoternary.cli.report import print_run_summary
from nanoternary.cli.resolvers import register_resolvers
from nanoternary.cli.tracking import WANDB_ID_KEY, finish_wandb_run, wandb_run_id
from nanoternary.data.datamodule import PreparedCorpus, TokenDataModule
from nanoternary.io.export_dir import load_export
from nanoternary.lit.callbacks.checkpoint import StepCheckpoint
from nanoternary.lit.callbacks.export import ModelExport
from nanoternary.lit.callbacks.gguf_export import GGUFExport
from nanoternary.lit.fsdp import whole_model
from nanoternary.lit.module import LitTernaryLM
from nanoternary.lit.resume import continue_csv_log, resolve_resume

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
log = logging.getLogger(__name__)
register_resolvers()


def instantiate_all(node: DictConfig | None) -> list[Any]:
    """Instantiate every `_target_` entry of a dict-shaped config group (callbacks, logger)."""
    if not node:
        return []
    return [instantiate(v) for v in node.values() if isinstance(v, DictConfig) and "_target_" in v]


def make_module(cfg: DictConfig, corpus: PreparedCorpus) -> LitTernaryLM:
    """The LightningModule a train config describes (also what `nanoternary-bench train` measures)."""
    return LitTernaryLM(
        model=cfg.model,
        optim=cfg.optim,
        token_bytes=corpus.token_bytes(),
        eot_id=corpus.eot_id,
        compile=cfg.compile,
        max_nonfinite_steps=cfg.max_nonfinite_steps,
    )


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job and return its final metrics (what a Hydra sweeper optimizes)."""
    started = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True)
    datamodule: TokenDataModule = instantiate(cfg.data)
    corpus = datamodule.prepare()
    if corpus.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"the data has {corpus.vocab_size} token ids but model.vocab_size={cfg.model.vocab_size}"
        )
    module = make_module(cfg, corpus)
    callbacks = instantiate_all(cfg.get("callbacks"))
    if not datamodule.has_text:  # an export folder needs a tokenizer; token-id data has none
        log.warning(
            "data.source=%s is token-id data: no export folder (checkpoints only), no bpb", cfg.data.source
        )
        callbacks = [cb for cb in callbacks if not isinstance(cb, (ModelExport, GGUFExport))]
    for cb in callbacks:
        if isinstance(cb, ModelExport):
            cb.run_summary = {
                "max_steps": cfg.trainer.max_steps,
                "batch_size": cfg.data.batch_size,
                "seq_len": cfg.data.seq_len,
                "seed": cfg.seed,
                "precision": cfg.trainer.precision,
            }
    ckpt_dir = next((cb.dirpath for cb in callbacks if isinstance(cb, StepCheckpoint)), None)
    resume = resolve_resume(
        cfg.ckpt_path,
        cfg.run_dir,
        ckpt_dir or Path(cfg.paths.output_dir) / "checkpoints",
        OmegaConf.to_container(cfg.model, resolve=True),
    )
    if resume is not None and resume.weights is not None:
        module.model.load_state_dict(load_export(resume.weights)[0].state_dict())
    run_id = wandb_run_id(
        cfg, continuing=cfg.run_dir is not None and resume is not None and resume.ckpt is not None
    )
    if run_id is not None:  # chosen here, so that meta.json can record it and a resume can reuse it
        with open_dict(cfg):
            cfg.logger.wandb.id = run_id
        for cb in callbacks:
            if isinstance(cb, ModelExport):
                cb.run_summary[WANDB_ID_KEY] = run_id
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=instantiate_all(cfg.get("logger")) or False
    )
    if trainer.is_global_zero:
        for logger in trainer.loggers:  # continue the run's metrics.csv instead of letting Lightning wipe it
            continue_csv_log(logger, resume.micro_step if resume is not None and resume.ckpt else 0)
    log.info("model: %s parameters", f"{module.model.num_parameters():,}")
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume.ckpt if resume is not None else None)
    if module.stop_reason:
        return {"stop_reason": module.stop_reason}
    export = next((cb for cb in callbacks if isinstance(cb, ModelExport)), None)
    result = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if export is not None and export.final_meta:
        result.update({"val/loss": export.final_meta["val_loss"], "val/bpb": export.final_meta["val_bpb"]})
    model = whole_model(module.model)  # under FSDP a collective: every rank, before the rank-0 summary
    if trainer.is_global_zero:
        run_dir = Path(cfg.paths.output_dir)
        print_run_summary(
            run_dir=run_dir,
            model=model,
            datamodule=datamodule,
            metrics=result,
            wall_seconds=time.perf_counter() - started,
            sample_prompt=cfg.sample_prompt,
            sample_tokens=cfg.sample_tokens,
        )
        for png in plot_runs([load_run(run_dir, run_dir.parent, config=cfg)], run_dir):
            log.info("plotted %s", png)
    return result


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Returns `optimized_metric` of the run, the value a sweeper (Optuna) minimizes."""
    file_logs_on_rank_zero_only()
    ddp_children_rerun_this_job()
    log.debug("config:\n%s", OmegaConf.to_yaml(cfg))
    with distributed_job():
        try:
            result = train(cfg)
        finally:
            finish_wandb_run()  # the next job of a multirun must not log into this W&B run
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    if "stop_reason" in result:  # a guard ended the run: fail this job, not a whole sweep
        if multirun:
            return float("nan")
        raise SystemExit(f"training stopped early: {result['stop_reason']}")
    metric = cfg.get("optimized_metric")
    if metric is None:
        return None
    if metric not in result:
        log.error("optimized_metric=%s was not measured by this run (it has %s)", metric, sorted(result))
        return float("nan")
    return result[metric]


if __name__ == "__main__":
    main()

"""The model folder at the end of training, export/final/ (the checkpoint callback writes the
export/step-XXXXXXXX/ folders through `write`).

The final folder carries the full held-out score (every held-out token, not the sampled subset that
periodic validation uses), so meta.json states exactly what the run achieved.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch

from nanoternary.evals.bpb import evaluate_heldout
from nanoternary.io.export_dir import save_export
from nanoternary.lit.fsdp import whole_model

log = logging.getLogger(__name__)


class ModelExport(L.Callback):
    def __init__(self, dirpath: str, final_eval: bool = True, run_summary: dict | None = None):
        self.dirpath = Path(dirpath)
        self.final_eval = final_eval
        self.run_summary = run_summary or {}
        self.final_path: Path | None = None
        self.final_meta: dict[str, Any] | None = None

    def training_meta(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))
        }
        corpus = trainer.datamodule.prepare()
        batch = trainer.datamodule.batch_size * trainer.datamodule.seq_len * trainer.world_size
        return {
            "step": trainer.global_step,
            "tokens_seen": trainer.global_step * batch * getattr(pl_module, "accumulate", 1),
            "train_loss": metrics.get("train/loss"),
            "val_loss": metrics.get("val/loss"),
            "val_bpb": metrics.get("val/bpb"),
            "corpus_hash": corpus.corpus_hash,
            "data": trainer.datamodule.source_name,
            "optim": pl_module.optim_cfg,
            "training": self.run_summary,
        }

    def write(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        model: torch.nn.Module,
        name: str,
        extra: dict | None = None,
    ) -> Path:
        """export/<name>/ of `model`: whole_model(pl_module.model), the model itself unless FSDP shards it."""
        meta = {**self.training_meta(trainer, pl_module), **(extra or {})}
        return save_export(self.dirpath / name, model, trainer.datamodule.prepare().tokenizer, meta)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(pl_module, "stop_reason", None):
            return  # a run stopped by a guard (disk full, non-finite loss) gets no final/ folder
        model = whole_model(pl_module.model)  # under FSDP a collective, so before the rank check
        if not trainer.is_global_zero:
            return
        extra: dict[str, Any] = {}
        if self.final_eval:
            was_training = model.training
            model.eval()
            with torch.autocast(pl_module.device.type, enabled=False):
                score = evaluate_heldout(
                    model,
                    trainer.datamodule.heldout_dataloader(),
                    pl_module.token_bytes,
                    pl_module.eot_id,
                )
            model.train(was_training)
            extra = {
                "val_loss": score.loss,
                "val_bpb": score.bpb,
                "val_tokens": score.tokens,
                "val_bytes": score.bytes,
            }
            log.info("final held-out: loss %.4f nats/token, %.4f bits/byte", score.loss, score.bpb)
        self.final_path = self.write(trainer, pl_module, model, "final", extra)
        self.final_meta = extra

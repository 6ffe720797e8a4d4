"""LitTernaryLM: the LightningModule that trains a TernaryLM with Muon + Lion (or AdamW).

Two optimizers means manual optimization (REFERENCE.md section 4): this module does the backward,
gradient accumulation, one global grad-norm clip and both optimizer steps itself.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.nn.utils import clip_grad_norm_

from nanoternary.evals.bpb import nll_bytes_sums, score_from_sums
from nanoternary.lit.compile import StaticCompiled
from nanoternary.lit.fsdp import shard_model
from nanoternary.lit.log_due import logs_due
from nanoternary.lit.nan_guard import NonFiniteGuard
from nanoternary.model.bitlinear import BitLinear
from nanoternary.model.config import ModelConfig
from nanoternary.model.mhc import MHCProbe
from nanoternary.model.sharding import is_sharded, whole
from nanoternary.model.transformer import TernaryLM
from nanoternary.optim.factory import make_optimizers

log = logging.getLogger(__name__)


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a (batch, seq + 1) token block (end-of-text is a target too)."""
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())


def to_container(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


class LitTernaryLM(L.LightningModule):
    def __init__(
        self,
        model: dict,
        optim: dict,
        token_bytes: list[int] | None = None,
        eot_id: int | None = None,
        compile: bool = False,
        max_nonfinite_steps: int = 10,
    ) -> None:
        super().__init__()
        model, optim = to_container(model), to_container(optim)
        self.save_hyperparameters(
            dict(
                model=model,
                optim=optim,
                token_bytes=token_bytes,
                eot_id=eot_id,
                compile=compile,
                max_nonfinite_steps=max_nonfinite_steps,
            )
        )
        self.nonfinite = NonFiniteGuard(max_nonfinite_steps)
        self.stop_reason: str | None = None
        self._loss_sum: torch.Tensor | None = None
        self.automatic_optimization = False
        self.model_config = ModelConfig.from_dict(model)
        self.model = TernaryLM(self.model_config)
        self.optim_cfg = optim
        self.accumulate = int(optim.get("accumulate", 1))
        if self.accumulate < 1:
            raise ValueError(f"optim.accumulate must be >= 1, got {self.accumulate}")
        self.eot_id = eot_id
        bytes_table = torch.tensor(
            token_bytes if token_bytes is not None else [0] * self.model_config.vocab_size
        )
        self.register_buffer("token_bytes", bytes_table, persistent=False)
        self.train_loss_fn = StaticCompiled(lm_loss) if compile else lm_loss
        self._val_sums: torch.Tensor | None = None

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def configure_model(self) -> None:
        """trainer=fsdp (Lightning's ModelParallelStrategy) builds a (nodes, devices) mesh: shard over a
        node's devices with FSDP2, replicating across nodes when there are several. Other strategies: no-op."""
        mesh = self.device_mesh
        if mesh is None or is_sharded(self.model):
            return
        shard_model(self.model, mesh["tensor_parallel"] if mesh["data_parallel"].size() == 1 else mesh)

    # ---- optimizers -------------------------------------------------------------------------
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return make_optimizers(self.model, self.optim_cfg)

    def optimizer_names(self) -> list[str]:
        return ["adamw"] if self.optim_cfg["name"] == "adamw" else ["muon", "lion"]

    # ---- training ---------------------------------------------------------------------------
    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        due = logs_due(self.trainer)  # log only what reaches the loggers: see nanoternary/lit/log_due.py
        loss = self.train_loss_fn(self.model, batch)
        self.manual_backward(loss / self.accumulate)
        first = batch_idx % self.accumulate == 0
        self._loss_sum = loss.detach() if first or self._loss_sum is None else self._loss_sum + loss.detach()
        if (batch_idx + 1) % self.accumulate == 0:
            grad_norm = whole(clip_grad_norm_(self.model.parameters(), self.optim_cfg["grad_clip"]))
            finite = self.step_is_finite(grad_norm)
            if not finite:  # drop the gradients: the wrapped step below then counts the step, changes nothing
                for opt in opts:
                    opt.zero_grad(set_to_none=True)
            # Only the first optimizer steps through Lightning's wrapper: each wrapped step() advances
            # trainer.global_step, and one training step must count once for max_steps to be exact.
            opts[0].step()
            if finite:
                for opt in opts[1:]:
                    opt.optimizer.step()
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            if due:
                self.log("train/grad_norm", grad_norm, on_step=True, on_epoch=False)
                self.log("train/skipped_steps", float(self.nonfinite.skipped), on_step=True, on_epoch=False)
        if due:
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def step_is_finite(self, grad_norm: torch.Tensor) -> bool:
        """The NaN/inf guard: one host sync per optimizer step (none per micro-batch). The same answer on
        every rank: the gradient norm is global and the loss sums are reduced."""
        check = grad_norm.detach() + self._loss_sum  # a NaN or inf in either makes the sum non-finite
        if self.trainer.world_size > 1:
            check = self.trainer.strategy.reduce(check, reduce_op="sum")
        finite = bool(torch.isfinite(check))
        self.nonfinite.record(finite)
        if not finite:
            step = self.trainer.global_step + 1
            log.warning(
                "step %d: non-finite loss or gradient norm, optimizer step skipped (%d in a row, %d in all)",
                step,
                self.nonfinite.consecutive,
                self.nonfinite.skipped,
            )
            if self.nonfinite.exhausted:
                self.request_stop(
                    f"{self.nonfinite.consecutive} optimizer steps in a row (up to step {step}) had a non-finite "
                    f"loss or gradient norm; each was skipped, so the weights are the last finite ones. Lower the "
                    f"learning rate or resume from an earlier checkpoint (max_nonfinite_steps="
                    f"{self.nonfinite.max_consecutive})"
                )
        return finite

    def request_stop(self, reason: str) -> None:
        """End training cleanly after this batch: no final export, and the CLI exits non-zero with
        `reason`. The first reason given is the one reported."""
        if self.stop_reason is None:
            self.stop_reason = reason
            log.error("training stops: %s", reason)
        self.trainer.should_stop = True

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["nonfinite_guard"] = self.nonfinite.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite.load_state_dict(checkpoint.get("nonfinite_guard", {}))

    # ---- validation -------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        self._mhc_probe = MHCProbe(self.model)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        with self._mhc_probe:
            self._val_sums += nll_bytes_sums(self.model, batch, self.token_bytes, self.eot_id)

    def on_validation_epoch_end(self) -> None:
        sums = (
            self.all_gather(self._val_sums).reshape(-1, 3).sum(0)
            if self.trainer.world_size > 1
            else self._val_sums
        )
        score = score_from_sums(sums)
        self.log("val/loss", score.loss)
        self.log("val/ppl", math.exp(min(score.loss, 50.0)))
        if score.bpb is not None:  # undefined for token-id data (no bytes)
            self.log("val/bpb", score.bpb)
        self.log("quant/zero_frac", zero_fraction(self.model))
        for name, value in self._mhc_probe.summary().items():  # this rank's held-out windows
            self.log(name, value)


@torch.no_grad()
def zero_fraction(model: torch.nn.Module) -> float:
    """Fraction of ternary weight codes equal to zero, over every quantized BitLinear (gathers sharded
    weights: every rank calls it, see BitLinear.ternary)."""
    zeros = total = 0
    for m in model.modules():
        if isinstance(m, BitLinear) and m.quantize:
            codes, _ = m.ternary()
            zeros += int((codes == 0).sum())
            total += codes.numel()
    return zeros / total if total else 0.0

"""LitTernaryLM: the LightningModule that trains a TernaryLM with Muon + Lion (or AdamW).

Two optimizers means manual optimization (REFERENCE.md section 4): this module does the backward,
gradient accumulation, one global grad-norm clip and both optimizer steps itself.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from nanoternary.evals.bpb import nll_bytes_sums, score_from_sums
from nanoternary.model.bitlinear import BitLinear
from nanoternary.model.config import ModelConfig
from nanoternary.model.transformer import TernaryLM
from nanoternary.optim.grouping import split_params
from nanoternary.optim.lion import Lion

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
    ) -> None:
        super().__init__()
        model, optim = to_container(model), to_container(optim)
        self.save_hyperparameters(dict(model=model, optim=optim, token_bytes=token_bytes, eot_id=eot_id, compile=compile))
        self.automatic_optimization = False
        self.model_config = ModelConfig.from_dict(model)
        self.model = TernaryLM(self.model_config)
        self.optim_cfg = optim
        self.accumulate = int(optim.get("accumulate", 1))
        if self.accumulate < 1:
            raise ValueError(f"optim.accumulate must be >= 1, got {self.accumulate}")
        self.eot_id = eot_id
        bytes_table = torch.tensor(token_bytes if token_bytes is not None else [0] * self.model_config.vocab_size)
        self.register_buffer("token_bytes", bytes_table, persistent=False)
        self.train_loss_fn = torch.compile(lm_loss, dynamic=False) if compile else lm_loss
        self._val_sums: torch.Tensor | None = None

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    # ---- optimizers -------------------------------------------------------------------------
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        name = self.optim_cfg["name"]
        if name == "adamw":
            cfg = self.optim_cfg["adamw"]
            return [torch.optim.AdamW(self.model.parameters(), lr=cfg["lr"], betas=tuple(cfg["betas"]),
                                      weight_decay=cfg["weight_decay"])]
        if name != "muon_lion":
            raise ValueError(f"unknown optim.name {name!r}; expected 'muon_lion' or 'adamw'")
        muon_params, lion_params = split_params(self.model)
        m, li = self.optim_cfg["muon"], self.optim_cfg["lion"]
        muon = torch.optim.Muon(
            muon_params, lr=m["lr"], weight_decay=m["weight_decay"], momentum=m["momentum"],
            nesterov=m["nesterov"], ns_steps=m["ns_steps"], adjust_lr_fn=m["adjust_lr_fn"],
        )
        lion = Lion(lion_params, lr=li["lr"], betas=tuple(li["betas"]), weight_decay=li["weight_decay"])
        return [muon, lion]

    def optimizer_names(self) -> list[str]:
        return ["adamw"] if self.optim_cfg["name"] == "adamw" else ["muon", "lion"]

    # ---- training ---------------------------------------------------------------------------
    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        loss = self.train_loss_fn(self.model, batch)
        self.manual_backward(loss / self.accumulate)
        if (batch_idx + 1) % self.accumulate == 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optim_cfg["grad_clip"])
            # Only the first optimizer steps through Lightning's wrapper: each wrapped step() advances
            # trainer.global_step, and one training step must count once for max_steps to be exact.
            opts[0].step()
            for opt in opts[1:]:
                opt.optimizer.step()
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            self.log("train/grad_norm", grad_norm, on_step=True, on_epoch=False)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    # ---- validation -------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(3, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._val_sums += nll_bytes_sums(self.model, batch, self.token_bytes, self.eot_id)

    def on_validation_epoch_end(self) -> None:
        sums = self.all_gather(self._val_sums).reshape(-1, 3).sum(0) if self.trainer.world_size > 1 else self._val_sums
        score = score_from_sums(sums)
        self.log("val/loss", score.loss)
        self.log("val/ppl", math.exp(min(score.loss, 50.0)))
        self.log("val/bpb", score.bpb)
        self.log("quant/zero_frac", zero_fraction(self.model))


@torch.no_grad()
def zero_fraction(model: torch.nn.Module) -> float:
    """Fraction of ternary weight codes equal to zero, over every quantized BitLinear."""
    zeros = total = 0
    for m in model.modules():
        if isinstance(m, BitLinear) and m.quantize:
            codes, _ = m.ternary()
            zeros += int((codes == 0).sum())
            total += codes.numel()
    return zeros / total if total else 0.0

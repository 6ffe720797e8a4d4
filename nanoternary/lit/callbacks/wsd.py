"""Warmup-Stable-Decay learning-rate schedule as a Lightning callback (REFERENCE.md section 4)."""

from __future__ import annotations

import math

import lightning as L

from nanoternary.lit.log_due import logs_due

DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


def wsd_multiplier(
    step: int, total_steps: int, warmup_steps: int, decay_fraction: float, final_mult: float, shape: str
) -> float:
    """LR multiplier for optimizer step `step` (1-based: the first step is step 1).

    Warmup gives step s the multiplier s / warmup, so step 1 already trains; the decay runs over the
    last `decay_fraction` of `total_steps` down to `final_mult` and stays there after the end.
    """
    if step <= warmup_steps:
        return step / warmup_steps
    decay_start = total_steps - math.floor(decay_fraction * total_steps)
    if step <= decay_start:
        return 1.0
    x = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    if shape == "linear":
        frac = 1.0 - x
    elif shape == "cosine":
        frac = 0.5 * (1.0 + math.cos(math.pi * x))
    else:
        frac = 1.0 - math.sqrt(x)
    return final_mult + (1.0 - final_mult) * frac


class WSDSchedule(L.Callback):
    """Scales every optimizer's param groups from their own base LR before each optimizer step."""

    def __init__(
        self,
        warmup_steps: int = 100,
        decay_fraction: float = 0.2,
        final_mult: float = 0.1,
        shape: str = "1-sqrt",
        total_steps: int | None = None,
    ) -> None:
        if warmup_steps < 0:
            raise ValueError(f"wsd.warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= decay_fraction <= 1.0:
            raise ValueError(f"wsd.decay_fraction must be in [0, 1], got {decay_fraction}")
        if not 0.0 <= final_mult <= 1.0:
            raise ValueError(f"wsd.final_mult must be in [0, 1], got {final_mult}")
        if shape not in DECAY_SHAPES:
            raise ValueError(f"wsd.shape must be one of {DECAY_SHAPES}, got {shape!r}")
        self.warmup_steps, self.decay_fraction, self.final_mult = warmup_steps, decay_fraction, final_mult
        self.shape, self.total_steps = shape, total_steps

    def resolved_total(self, trainer: L.Trainer) -> int:
        total = self.total_steps or trainer.max_steps
        if total is None or total <= 0:
            raise ValueError("the WSD schedule needs trainer.max_steps > 0 or callbacks.wsd.total_steps")
        return total

    def multiplier(self, step: int, total_steps: int) -> float:
        return wsd_multiplier(
            step, total_steps, self.warmup_steps, self.decay_fraction, self.final_mult, self.shape
        )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.resolved_total(trainer)
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                group.setdefault("base_lr", group["lr"])

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int
    ) -> None:
        if batch_idx % getattr(pl_module, "accumulate", 1):
            return
        step = trainer.global_step + 1
        mult = self.multiplier(step, self.resolved_total(trainer))
        for opt, name in zip(trainer.optimizers, pl_module.optimizer_names(), strict=True):
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * mult
            if logs_due(trainer):
                pl_module.log(f"train/lr_{name}", opt.param_groups[0]["lr"], on_step=True, on_epoch=False)

"""Training loops without Lightning, for `nanoternary-bench train`.

`PlainLoop` is one optimizer step as a hand-written PyTorch loop would do it: forward, backward, one
global grad-norm clip, the WSD multiplier, both optimizer steps. The benchmark builds two of them:
the reference (eager fp32, torch.optim.Muon: loop B) and the bare twin of our trainer's step (the same
compiled loss, autocast and optimizers as LitTernaryLM, no Lightning around it).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nanoternary.lit.callbacks.wsd import wsd_multiplier

LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16}
FULL_PRECISION = ("32-true", "32", 32)


def autocast_for(precision: Any, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """The autocast context Lightning's precision plugin enters around training_step."""
    if precision in FULL_PRECISION:
        return contextlib.nullcontext
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(
            f"trainer.precision={precision!r} is not supported by the benchmark's bare loop; "
            f"use one of {[*AUTOCAST_DTYPES, '32-true']}"
        )
    return functools.partial(torch.autocast, device.type, dtype=AUTOCAST_DTYPES[precision])


def wsd_schedule(wsd: dict[str, Any] | None, total_steps: int) -> Callable[[int], float]:
    """LR multiplier of 1-based step s under the `callbacks.wsd` config (constant 1 without one)."""
    if not wsd:
        return lambda step: 1.0
    return functools.partial(
        wsd_multiplier,
        total_steps=wsd.get("total_steps") or total_steps,
        warmup_steps=wsd["warmup_steps"],
        decay_fraction=wsd["decay_fraction"],
        final_mult=wsd["final_mult"],
        shape=wsd["shape"],
    )


class PlainLoop:
    """A model, its loss, its optimizers and a batch iterator, stepped by hand."""

    def __init__(
        self,
        name: str,
        model: nn.Module,
        loss_fn: LossFn,
        optimizers: list[torch.optim.Optimizer],
        batches: Iterator[torch.Tensor],
        grad_clip: float,
        schedule: Callable[[int], float],
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        device: torch.device | str = "cpu",
    ) -> None:
        self.name, self.model, self.loss_fn, self.optimizers = name, model, loss_fn, optimizers
        self.batches, self.grad_clip, self.schedule, self.autocast = batches, grad_clip, schedule, autocast
        self.device = torch.device(device)
        self.steps = 0
        self.base_lrs = [[group["lr"] for group in opt.param_groups] for opt in optimizers]

    def next_batch(self) -> torch.Tensor:
        return next(self.batches).to(self.device, non_blocking=True)

    def step(self) -> torch.Tensor:
        """One optimizer step; returns the (detached) loss. Skips the update on a non-finite loss or
        gradient norm like the trainer does, with the same single host sync per step."""
        self.steps += 1
        mult = self.schedule(self.steps)
        for opt, base in zip(self.optimizers, self.base_lrs, strict=True):
            for group, lr in zip(opt.param_groups, base, strict=True):
                group["lr"] = lr * mult
        batch = self.next_batch()
        with self.autocast():
            loss = self.loss_fn(self.model, batch)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        if bool(torch.isfinite(grad_norm + loss.detach())):
            for opt in self.optimizers:
                opt.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        return loss.detach()


def step_flops(model: nn.Module, loss_fn: LossFn, batch: torch.Tensor) -> int:
    """FLOPs of one forward + backward (matmuls and attention, as PyTorch's FlopCounterMode counts them);
    the gradients it leaves are cleared."""
    with FlopCounterMode(display=False) as counter:
        loss_fn(model, batch).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()

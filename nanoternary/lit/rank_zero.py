"""Decisions that only global rank 0 can make (it owns the files) but every rank must follow."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import lightning as L

T = TypeVar("T")


def rank_zero_result(trainer: L.Trainer, fn: Callable[[], T]) -> T:
    """Run `fn` on global rank 0 and give its (picklable) result to every rank, so that all ranks stop
    or skip together; one process runs it directly."""
    result = fn() if trainer.is_global_zero else None
    return trainer.strategy.broadcast(result, src=0) if trainer.world_size > 1 else result

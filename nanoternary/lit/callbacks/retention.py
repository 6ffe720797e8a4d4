"""Which step checkpoints a run keeps: the last K, optionally every M-th step and the best by val/loss.

The newest complete checkpoint, last.ckpt and export/final/ are never deleted. StepCheckpoint calls
`prune` after each commit; DiskSpace calls it with `room_for=1` when space runs low.
"""

from __future__ import annotations

import logging
import math

import lightning as L

from nanoternary.lit.run_files import CheckpointLayout

log = logging.getLogger(__name__)


def select_keep(
    steps: list[int], keep_last: int, keep_every: int = 0, best: int | None = None, room_for: int = 0
) -> set[int]:
    """The steps to keep. keep_last=0 keeps all; `room_for` new saves shrink the rolling window,
    but never below the newest step."""
    if not steps or keep_last == 0:
        return set(steps)
    ordered = sorted(steps)
    keep = set(ordered[-max(1, keep_last - room_for) :])
    if keep_every:
        keep.update(s for s in ordered if s % keep_every == 0)
    if best is not None and best in ordered:
        keep.add(best)
    return keep


def check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"retention.{name} must be an integer >= 0, got {value!r}")
    return value


class Retention(L.Callback):
    def __init__(
        self,
        keep_last: int = 3,
        keep_every_n_steps: int = 0,
        keep_best: bool = False,
        monitor: str = "val/loss",
    ) -> None:
        self.keep_last = check_count("keep_last", keep_last)
        self.keep_every = check_count("keep_every_n_steps", keep_every_n_steps)
        if not isinstance(keep_best, bool):
            raise ValueError(f"retention.keep_best must be true or false, got {keep_best!r}")
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"retention.monitor must be a metric name, got {monitor!r}")
        self.keep_best, self.monitor = keep_best, monitor
        self.scores: dict[int, float] = {}  # step -> monitored value (lower is better)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None and not trainer.sanity_checking and math.isfinite(float(value)):
            self.scores[trainer.global_step] = float(value)

    def state_dict(self) -> dict:
        return {"scores": dict(self.scores)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.scores = {int(k): float(v) for k, v in state_dict.get("scores", {}).items()}

    def best_step(self, steps: list[int]) -> int | None:
        scored = [(self.scores[s], -s) for s in steps if s in self.scores]
        return -min(scored)[1] if self.keep_best and scored else None

    def prune(self, layout: CheckpointLayout, room_for: int = 0) -> list[int]:
        """Delete the step checkpoints the policy does not keep; returns their steps."""
        steps = layout.steps()
        keep = select_keep(steps, self.keep_last, self.keep_every, self.best_step(steps), room_for)
        removed = [s for s in steps if s not in keep]
        for step in removed:
            layout.remove(step)
        if removed:
            log.info("retention: removed checkpoints of steps %s", removed)
        return removed

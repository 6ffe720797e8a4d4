"""Counting optimizer steps skipped for a non-finite loss or gradient, and when to give up.

It lives beside the LightningModule rather than in a callback because the decision has to be taken
between the gradient clip and the optimizer steps, inside training_step. A skipped step still counts
as a step (the WSD schedule and the data position stay functions of trainer.global_step); only the
parameters and optimizer states are left untouched.
"""

from __future__ import annotations


class NonFiniteGuard:
    def __init__(self, max_consecutive: int = 10) -> None:
        if isinstance(max_consecutive, bool) or not isinstance(max_consecutive, int) or max_consecutive < 1:
            raise ValueError(f"max_nonfinite_steps must be an integer >= 1, got {max_consecutive!r}")
        self.max_consecutive = max_consecutive
        self.skipped = 0  # over the whole run (restored on resume)
        self.consecutive = 0

    def record(self, finite: bool) -> None:
        if finite:
            self.consecutive = 0
        else:
            self.skipped += 1
            self.consecutive += 1

    @property
    def exhausted(self) -> bool:
        return self.consecutive >= self.max_consecutive

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped, self.consecutive = int(state.get("skipped", 0)), int(state.get("consecutive", 0))

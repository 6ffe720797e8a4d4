"""When a logged value is worth its cost.

Lightning only hands logged values to the loggers every `trainer.log_every_n_steps` batches, but every
`self.log` call costs on every batch it is made: about a millisecond of host Python on a 2-core CPU,
a blocking copy to the device for a Python number, and for a `prog_bar` tensor a conversion to a Python
number, i.e. a host-device sync on CUDA. Logging the loss and gradient norm every batch made Lightning's
overhead 23% of a minimal model's step; logging them on logging batches only, 7%. The metrics files come
out the same.
"""

from __future__ import annotations

import lightning as L


def logs_due(trainer: L.Trainer) -> bool:
    """True on the batches whose logged values reach the loggers (Lightning's own test, which is
    valid in on_train_batch_start as well as in training_step)."""
    return trainer._logger_connector.should_update_logs

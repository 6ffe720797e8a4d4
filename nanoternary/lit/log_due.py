"""When a logged Python number is worth its cost.

`self.log(name, float)` turns the number into a tensor on the module's device: on CUDA a blocking copy,
i.e. a host-device sync, every step it is called. Lightning only hands logged values to the loggers
every `trainer.log_every_n_steps` batches, so numbers that are not tensors already are logged on those
batches only; the metrics files come out the same. (Tensors, e.g. the loss, can be logged every step:
they stay on the device until Lightning converts them on a logging step.)
"""

from __future__ import annotations

import lightning as L


def logs_due(trainer: L.Trainer) -> bool:
    """True on the batches whose logged values reach the loggers (Lightning's own test, which is
    valid in on_train_batch_start as well as in training_step)."""
    return trainer._logger_connector.should_update_logs

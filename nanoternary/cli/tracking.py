"""The W&B run id of a training run: chosen before the logger starts, written into every meta.json
of the run (training.wandb_run_id), and read back from there when the run is resumed in its folder,
so a resumed run keeps logging into the same W&B run instead of starting a new one."""

from __future__ import annotations

import logging
import secrets
import string
import sys
from pathlib import Path

from omegaconf import DictConfig

from nanoternary.io.export_dir import META, read_meta

log = logging.getLogger(__name__)
WANDB_ID_KEY = "wandb_run_id"
ID_ALPHABET = string.ascii_lowercase + string.digits


def recorded_wandb_id(run_dir: Path) -> str | None:
    """The W&B run id in the newest readable export/*/meta.json of a run folder (None if none has one)."""
    metas = sorted(
        (Path(run_dir) / "export").glob(f"*/{META}"), key=lambda p: p.stat().st_mtime, reverse=True
    )
    for path in metas:
        try:
            run_id = read_meta(path.parent).get("training", {}).get(WANDB_ID_KEY)
        except (ValueError, FileNotFoundError) as exc:
            log.warning("looking for the W&B run id: skipping %s", exc)
            continue
        if run_id:
            return str(run_id)
    return None


def wandb_run_id(cfg: DictConfig, continuing: bool) -> str | None:
    """The id for `logger.wandb` (None when that logger is not configured): `logger.wandb.id` if set;
    else, when `continuing` the run in its own folder, the id its meta.json recorded; else a new one."""
    node = (cfg.get("logger") or {}).get("wandb")
    if node is None:
        return None
    if node.get("id"):
        return str(node.id)
    if continuing:
        previous = recorded_wandb_id(Path(cfg.paths.output_dir))
        if previous:
            log.info("continuing W&B run %s", previous)
            return previous
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(8))  # the form of W&B's own ids


def finish_wandb_run() -> None:
    """Close the W&B run of this job (flushes its files); the next job of a multirun in this process
    would otherwise be logged into it."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()

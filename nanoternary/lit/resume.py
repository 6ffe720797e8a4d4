"""What a run resumes from: the newest complete checkpoint of a run directory, or a named .ckpt or
model folder; plus the logger state that has to continue with it.

Everything here runs before Lightning opens the file, so a bad checkpoint fails fast with one error
that names the file and the problem, instead of a traceback from deep inside torch.load.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import CSVLogger, Logger

from nanoternary.io.atomic import atomic_write_text
from nanoternary.io.export_dir import META, read_meta
from nanoternary.lit.run_files import (
    DIGEST_KEY,
    LAST,
    CheckpointLayout,
    checkpoint_digest,
    ckpt_name,
    step_of,
)
from nanoternary.model.config import ModelConfig

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("state_dict", "global_step", "loops", "optimizer_states", "hyper_parameters")


@dataclass(frozen=True)
class ResumeFrom:
    """`ckpt`: a Lightning checkpoint, the whole training state. `weights`: a model folder whose .ckpt
    is gone, so only its weights (fresh optimizer state, step 0)."""

    step: int
    micro_step: int  # micro-batches consumed: the data position and the logger's first new step
    ckpt: Path | None = None
    weights: Path | None = None


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a .ckpt (memory-mapped) and check its content digest; errors name the file and the fault.
    Checkpoints written without a digest (not by StepCheckpoint) are accepted unchecked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError... for a bad file
        raise ValueError(f"cannot read checkpoint {path}: it is truncated or corrupted ({exc})") from exc
    missing = [k for k in REQUIRED_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a nanoternary training checkpoint: it has no {missing}")
    recorded = ckpt.pop(DIGEST_KEY, None)
    if recorded is not None and checkpoint_digest(ckpt) != recorded:
        raise ValueError(
            f"corrupted checkpoint {path}: its content no longer matches the sha256 recorded when "
            "it was written (damaged on disk or in transfer)"
        )
    return ckpt


def model_differences(saved: dict, wanted: dict) -> list[str]:
    a, b = ModelConfig.from_dict(saved).to_dict(), ModelConfig.from_dict(wanted).to_dict()
    return [f"{k}={a[k]!r} there, {b[k]!r} here" for k in sorted(a) if a[k] != b[k]]


def check_compatible(source: Path, saved_model: dict, wanted_model: dict) -> None:
    """A checkpoint of another model shape cannot be resumed: say which fields differ."""
    try:
        diffs = model_differences(saved_model, wanted_model)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source} has an invalid model config: {exc}") from exc
    if diffs:
        raise ValueError(f"{source} holds a different model than this config asks for: {'; '.join(diffs)}")


def micro_step_of(ckpt: dict) -> int:
    return int(ckpt["global_step"]) * int(ckpt["hyper_parameters"].get("optim", {}).get("accumulate", 1))


def newest_checkpoint(ckpt_dir: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads and passes its checksum; broken ones are skipped with a warning."""
    layout = CheckpointLayout(ckpt_dir)
    candidates = [(s, True, layout.ckpt(s)) for s in layout.steps()]
    loaded: dict[Path, dict] = {}
    last = ckpt_dir / LAST
    if last.is_file() and not any(os.path.samefile(last, p) for _, _, p in candidates):
        try:  # last.ckpt is written on its own only at the end of training: its step is inside it
            loaded[last] = read_checkpoint(last)
            candidates.append((int(loaded[last]["global_step"]), False, last))
        except ValueError as exc:
            log.warning("skipping %s", exc)
    for _, _, path in sorted(candidates, reverse=True):
        try:
            return path, loaded.get(path) or read_checkpoint(path)
        except (ValueError, FileNotFoundError) as exc:
            log.warning("skipping %s", exc)
    return None


def from_model_folder(folder: Path, wanted_model: dict) -> ResumeFrom:
    """A run's export/step-N/ resumes from its twin checkpoints/step-N.ckpt when that still exists;
    any other model folder gives its weights only."""
    meta = read_meta(folder)
    check_compatible(folder / META, meta["model"], wanted_model)
    step = step_of(folder.name + ".ckpt")
    twin = folder.parent.parent / "checkpoints" / ckpt_name(step) if step is not None else None
    if twin is not None and twin.is_file():
        return from_ckpt(twin, wanted_model)
    log.warning(
        "%s has no training checkpoint beside it: starting from its weights with fresh optimizer "
        "state at step 0",
        folder,
    )
    return ResumeFrom(step=0, micro_step=0, weights=folder)


def from_ckpt(path: Path, wanted_model: dict, ckpt: dict | None = None) -> ResumeFrom:
    ckpt = ckpt if ckpt is not None else read_checkpoint(path)
    check_compatible(path, ckpt["hyper_parameters"]["model"], wanted_model)
    return ResumeFrom(step=int(ckpt["global_step"]), micro_step=micro_step_of(ckpt), ckpt=path)


def resolve_resume(
    ckpt_path: str | None, run_dir: str | None, ckpt_dir: Path, wanted_model: dict
) -> ResumeFrom | None:
    """Turn the `ckpt_path` / `run_dir` settings into what to resume from (None: start fresh)."""
    ckpt_dir = Path(ckpt_dir)
    has_checkpoints = bool(CheckpointLayout(ckpt_dir).steps()) or (ckpt_dir / LAST).is_file()
    if ckpt_path is None:
        if run_dir is not None and has_checkpoints:
            raise ValueError(
                f"run_dir={run_dir} already holds checkpoints in {ckpt_dir}: pass ckpt_path=auto to continue "
                "that run, or choose a new run_dir"
            )
        return None
    if ckpt_path == "auto":
        if run_dir is None:
            raise ValueError(
                "ckpt_path=auto continues the run in run_dir=...: set run_dir to that run's directory"
            )
        found = newest_checkpoint(ckpt_dir)
        if found is None:
            log.warning("ckpt_path=auto: no usable checkpoint in %s, starting from scratch", ckpt_dir)
            return None
        log.info("resuming from %s", found[0])
        return from_ckpt(found[0], wanted_model, found[1])
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        if not (path / META).is_file():
            raise ValueError(
                f"ckpt_path={path} is a folder but not a model folder (no {META}); "
                "name a .ckpt file, an export folder or use ckpt_path=auto run_dir=..."
            )
        resume = from_model_folder(path, wanted_model)
    else:
        resume = from_ckpt(path, wanted_model)
    newer = [s for s in CheckpointLayout(ckpt_dir).steps() if s > resume.step] if run_dir is not None else []
    if newer:
        raise ValueError(
            f"run_dir={run_dir} holds checkpoints newer than step {resume.step} (steps {newer}): continuing there "
            f"from {path} would mix two histories; pass a new run_dir, or move those checkpoints away first"
        )
    return resume


def continue_csv_log(logger: Logger, first_new_step: int) -> int:
    """Lightning's CSV writer deletes an existing metrics.csv when it starts. Keep the rows that the
    resumed run will not log again (step < first_new_step) and hand the writer their header, so the
    file reads as one run. A hard link keeps the old rows safe until the trimmed file is in place.
    Returns the number of rows kept."""
    if not isinstance(logger, CSVLogger):
        return 0
    path = Path(logger.log_dir) / "metrics.csv"
    aside = path.with_name(".metrics.csv.resume")
    if aside.exists():  # an earlier start died between the two steps below
        if path.exists():
            aside.unlink()
        else:
            os.replace(aside, path)
    rows: list[dict[str, str]] = []
    fields: list[str] = []
    if path.exists():
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or [])
            rows = [r for r in reader if int(float(r["step"])) < first_new_step]
        os.link(path, aside)
    with warnings.catch_warnings():  # its "previous log files will be deleted" no longer holds
        warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
        writer = logger.experiment  # Lightning's writer deletes metrics.csv here
    path.unlink(missing_ok=True)
    if rows:
        text = io.StringIO()
        out = csv.DictWriter(text, fieldnames=fields)
        out.writeheader()
        out.writerows(rows)
        atomic_write_text(path, text.getvalue())
        writer.metrics_keys = fields
    aside.unlink(missing_ok=True)
    return len(rows)

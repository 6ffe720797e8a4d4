"""The checkpoint files of a run directory: names, content digest, listing, safe removal.

A step's checkpoint is `checkpoints/step-XXXXXXXX.ckpt` (the commit point: it is renamed into place
last) and, beside it, `export/step-XXXXXXXX/`. Temp names start with a dot and carry `.tmp-`, `.old-`
or `.del-`. Each .ckpt carries a sha256 of its own content, so a flipped bit in tensor data (which
torch.load does not notice) is caught when the checkpoint is read back.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanoternary.io.atomic import fsync_dir

log = logging.getLogger(__name__)

LAST = "last.ckpt"
DIGEST_KEY = "nanoternary_sha256"
STEP_CKPT = re.compile(r"^step-(\d{8,})\.ckpt$")
TEMP_MARKS = (".tmp-", ".old-", ".del-")


def ckpt_name(step: int) -> str:
    return f"step-{step:08d}.ckpt"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(name: str) -> int | None:
    """The step of a `step-XXXXXXXX.ckpt` name, None for any other name."""
    match = STEP_CKPT.match(name)
    return int(match.group(1)) if match else None


def checkpoint_digest(obj: Any) -> str:
    """sha256 over a checkpoint's content: every tensor's dtype, shape and bytes and every plain value,
    in a fixed order (dict keys sorted), so the same content always gives the same digest."""
    digest = hashlib.sha256()

    def visit(x: Any) -> None:
        if torch.is_tensor(x):
            flat = x.detach().reshape(-1).contiguous().cpu()
            digest.update(f"T{x.dtype}{tuple(x.shape)}".encode())
            digest.update(flat.view(torch.uint8).numpy() if flat.numel() else b"")
        elif isinstance(x, dict):
            digest.update(f"D{len(x)}".encode())
            for key, value in sorted(x.items(), key=lambda kv: repr(kv[0])):
                digest.update(repr(key).encode())
                visit(value)
        elif isinstance(x, (list, tuple)):
            digest.update(f"L{len(x)}".encode())
            for value in x:
                visit(value)
        else:
            digest.update(f"V{x!r}".encode())

    visit(obj)
    return digest.hexdigest()


def is_temp(name: str) -> bool:
    return name.startswith(".") and any(mark in name for mark in TEMP_MARKS)


@dataclass(frozen=True)
class CheckpointLayout:
    """Where a run keeps its checkpoints (`ckpt_dir`) and the model folders beside them (`export_dir`)."""

    ckpt_dir: Path
    export_dir: Path | None = None

    def ckpt(self, step: int) -> Path:
        return self.ckpt_dir / ckpt_name(step)

    def export(self, step: int) -> Path | None:
        return self.export_dir / step_dir_name(step) if self.export_dir is not None else None

    def temp(self, name: str) -> Path:
        return self.ckpt_dir / f".{name}.tmp-{os.getpid()}"

    def steps(self) -> list[int]:
        """Steps that have a complete (renamed into place) .ckpt, oldest first."""
        if not self.ckpt_dir.is_dir():
            return []
        return sorted(s for s in (step_of(p.name) for p in self.ckpt_dir.iterdir()) if s is not None)

    def size_of(self, step: int) -> int:
        """Bytes a step takes on disk: its .ckpt plus its model folder."""
        total = self.ckpt(step).stat().st_size
        folder = self.export(step)
        if folder is not None and folder.is_dir():
            total += sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        return total

    def temp_export(self, step: int) -> Path | None:
        return (
            self.export_dir / f".{step_dir_name(step)}.tmp-{os.getpid()}"
            if self.export_dir is not None
            else None
        )

    def remove(self, step: int) -> None:
        """Delete a step: the .ckpt first (so it stops being complete), then its model folder."""
        self.ckpt(step).unlink(missing_ok=True)
        fsync_dir(self.ckpt_dir)
        folder = self.export(step)
        if folder is not None:
            discard_dir(folder)

    def clean_temps(self) -> list[Path]:
        """Remove what an interrupted writer left behind; a folder caught mid-replacement (`.old-`
        with no final folder) is put back instead. Run only when no other process writes here."""
        removed = []
        for folder in (self.ckpt_dir, self.export_dir):
            if folder is None or not folder.is_dir():
                continue
            for p in sorted(folder.iterdir()):
                if not is_temp(p.name):
                    continue
                final = folder / p.name[1:].split(".old-")[0]
                if ".old-" in p.name and not final.exists():
                    os.replace(p, final)
                    log.warning("restored %s from an interrupted replacement", final)
                    continue
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                removed.append(p)
        if removed:
            log.warning(
                "removed %d leftover temp file(s) of an interrupted write: %s",
                len(removed),
                ", ".join(p.name for p in removed),
            )
        return removed


def discard_dir(folder: Path) -> None:
    """Rename a folder away, then delete it: no reader ever sees it half gone."""
    if folder.is_dir():
        doomed = folder.with_name(f".{folder.name}.del-{os.getpid()}")
        os.replace(folder, doomed)
        shutil.rmtree(doomed)

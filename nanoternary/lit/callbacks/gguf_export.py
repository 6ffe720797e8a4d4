"""model.gguf inside the run's model folders: export/final/ at the end of training, and optionally the
export/step-XXXXXXXX/ folders of every N-th step.

It converts the folder ModelExport (or the checkpoint callback) already wrote, so the GGUF holds exactly
the weights on disk beside it. Lightning runs ModelExport's on_train_end before this one when this
callback comes after it in the config (conf/callbacks/default.yaml). Each file is written under a temp
name, read back and checked (tensor names, shapes, every ternary code and scale) and only then renamed
into place, so a crash or a bad write never leaves a model.gguf that lies.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import lightning as L

from nanoternary.io.export_dir import META
from nanoternary.io.gguf import GGUF_NAME, folder_to_gguf

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"step-(\d{8})")


class GGUFExport(L.Callback):
    def __init__(
        self,
        dirpath: str,
        arch: str = "auto",
        qtype: str = "tq2_0",
        embed_type: str = "f16",
        every_n_steps: int = 0,
        progress: bool = True,
    ) -> None:
        if every_n_steps < 0:
            raise ValueError(f"gguf_export.every_n_steps must be >= 0 (0 = only final), got {every_n_steps}")
        self.dirpath = Path(dirpath)
        self.arch, self.qtype, self.embed_type = arch, qtype, embed_type
        self.every_n_steps, self.progress = every_n_steps, progress
        self.final_path: Path | None = None

    def convert(self, folder: Path) -> Path:
        return folder_to_gguf(folder, self.arch, self.qtype, self.embed_type, progress=self.progress)

    def step_folders(self) -> list[Path]:
        """Committed export/step-* folders of every N-th step that have no model.gguf yet."""
        if not self.every_n_steps or not self.dirpath.is_dir():
            return []

        def wanted(folder: Path) -> bool:
            m = STEP_DIR.fullmatch(folder.name)
            return bool(m) and int(m.group(1)) % self.every_n_steps == 0 and (folder / META).is_file()

        return [f for f in sorted(self.dirpath.iterdir()) if wanted(f) and not (f / GGUF_NAME).exists()]

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int
    ) -> None:
        if trainer.is_global_zero:
            for folder in self.step_folders():
                self.convert(folder)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for folder in self.step_folders():
            self.convert(folder)
        final = self.dirpath / "final"
        if not (final / META).is_file():
            log.warning("no %s: %s was not written (stopped run?)", final / GGUF_NAME, final)
            return
        self.final_path = self.convert(final)

"""`python train.py ...` in a subprocess, the way a user runs it, with a seconds-long tiny setup."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from matplotlib.image import imread

from tests.conftest import REPO_ROOT

# 1 layer, 64-token context, fp32 (bf16 autocast would blur the comparisons), 2 steps with one validation
# on one batch, no full held-out pass, no progress bar
TINY = [
    "debug=fast",
    "model.n_layers=1",
    "model.context_length=64",
    "data.batch_size=4",
    "data.val_batch_size=4",
    "trainer.precision=32-true",
    "trainer.max_steps=2",
    "trainer.limit_val_batches=1",
    "callbacks.export.final_eval=false",
    "sample_tokens=1",
    "~callbacks.progress_bar",
    "+trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


def train_cli(
    cache_dir: Path, *args: str, env: dict[str, str] | None = None, timeout: int = 600, check: bool = True
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "NANOTERNARY_CACHE": str(cache_dir), **(env or {})},
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def metric_rows(run_dir: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of every metrics.csv row that logged `key`."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return [(int(r["step"]), float(r[key])) for r in csv.DictReader(f) if r.get(key)]


def nonblank(png: Path) -> bool:
    """A PNG that decodes, with more than 2% of its pixels away from white."""
    pixels = imread(png)[..., :3]
    return (np.abs(pixels - 1.0).sum(-1) > 0.1).mean() > 0.02

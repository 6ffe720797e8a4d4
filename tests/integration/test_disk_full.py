"""Training into a real, small tmpfs until the disk is full: the run stops cleanly with a message that
says how much space to free and where, the partial files are gone and the previous checkpoint is intact.
Mounting needs root; elsewhere these tests skip with the reason."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanoternary.lit.callbacks.disk_space import size_text
from nanoternary.lit.resume import newest_checkpoint, read_checkpoint
from nanoternary.lit.run_files import CheckpointLayout
from tests.conftest import REPO_ROOT
from tests.tiny_run import run_callbacks, tiny_datamodule, tiny_module, tiny_trainer

# One tiny step checkpoint takes about 21 MB: a 14 MB .ckpt and a 7 MB model folder.


@pytest.fixture
def small_disk(tmp_path):
    """Mount a tmpfs of the given size under tmp_path; unmounted at teardown."""
    mounted: list[Path] = []

    def mount(size_mb: int) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a size-limited tmpfs needs root")
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(where)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=True)


def leftovers(*folders: Path) -> list[str]:
    return [p.name for f in folders for p in f.iterdir() if p.name.startswith(".")]


def test_disk_filling_during_a_write_stops_cleanly_and_keeps_the_previous_checkpoint(
    small_disk, code_corpus, cache_dir
):
    run = small_disk(32)  # room for one step (about 21 MB), not for the next .ckpt (about 14 MB)
    dm = tiny_datamodule(cache_dir)
    module = tiny_module(dm)
    trainer = tiny_trainer(run, 8, run_callbacks(run))  # no DiskSpace callback: the write itself hits ENOSPC
    trainer.fit(module, datamodule=dm)

    ckpts, export = run / "checkpoints", run / "export"
    assert trainer.global_step == 4
    assert module.stop_reason.startswith(f"writing checkpoint {ckpts / 'step-00000004.ckpt'} failed: ")
    assert (
        "The partial files were removed and the newest complete checkpoint is "
        f"{ckpts / 'step-00000002.ckpt'}." in module.stop_reason
    )
    assert f"on the filesystem mounted at {run}; a checkpoint takes about " in module.stop_reason
    assert module.stop_reason.endswith(f"then continue with ckpt_path=auto run_dir={run}")
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step-00000002.ckpt"]
    assert sorted(p.name for p in export.iterdir()) == ["step-00000002"]  # no final/ after a failed run
    assert leftovers(ckpts, export) == []
    assert os.path.samefile(ckpts / "last.ckpt", ckpts / "step-00000002.ckpt")
    assert read_checkpoint(ckpts / "step-00000002.ckpt")["global_step"] == 2
    assert newest_checkpoint(ckpts)[0] == ckpts / "step-00000002.ckpt"


@pytest.mark.slow  # a whole CLI run; the in-process test above covers the write path by default
def test_cli_stops_before_the_disk_fills_and_says_how_much_to_free(small_disk, code_corpus, cache_dir):
    disk = small_disk(48)
    run = disk / "run"
    env = {**os.environ, "NANOTERNARY_CACHE": str(cache_dir)}
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "debug=fast",
            "model.n_layers=1",
            "model.context_length=64",
            "data.batch_size=2",
            "trainer.max_steps=8",
            "callbacks.export.final_eval=false",
            "sample_tokens=1",
            "callbacks.disk_space.min_free_gb=0.012",
            f"run_dir={run}",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    message = proc.stderr.strip().splitlines()[-1]
    step_size = size_text(CheckpointLayout(run / "checkpoints", run / "export").size_of(2))
    assert message.startswith(
        f"training stopped early: not enough disk space for checkpoints in {run / 'checkpoints'}: "
    )
    assert (
        f"on the filesystem mounted at {disk}; a checkpoint takes about {step_size}, and callbacks.disk_space "
        "asks for min_free_gb=0.012. Free at least " in message
    )
    assert message.endswith(
        f"MB on that filesystem (or relax those limits), then continue with ckpt_path=auto run_dir={run}"
    )
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step-00000002.ckpt"]
    assert read_checkpoint(ckpts / "step-00000002.ckpt")["global_step"] == 2
    assert not (run / "export" / "final").exists() and not (run / "summary.json").exists()
    assert leftovers(ckpts, run / "export") == []

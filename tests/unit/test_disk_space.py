"""Disk-space thresholds and actions against a patched shutil.disk_usage: a pretend filesystem whose
used bytes are the real files under the test's directory, so pruning really frees space."""

from __future__ import annotations

import csv
import re
import shutil
from collections import namedtuple

import lightning as L
import pytest

from nanoternary.lit.callbacks.disk_space import DiskSpace, mount_point, size_text
from nanoternary.lit.callbacks.retention import Retention
from nanoternary.lit.run_files import CheckpointLayout
from tests.tiny_run import run_callbacks, tiny_datamodule, tiny_module, tiny_trainer

Usage = namedtuple("Usage", "total used free")


@pytest.fixture
def disk(monkeypatch, tmp_path):
    """Total size and extra used bytes of the pretend filesystem; files under tmp_path count as used."""
    state = {"total": 100_000, "extra": 0}

    def usage(path):
        used = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()) + state["extra"]
        return Usage(state["total"], used, state["total"] - used)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    return state


def make_steps(layout: CheckpointLayout, steps: list[int]) -> None:
    layout.ckpt_dir.mkdir(parents=True, exist_ok=True)
    for step in steps:  # 20 kB a step: 15 kB .ckpt + 5 kB model folder
        layout.ckpt(step).write_bytes(b"c" * 15_000)
        layout.export(step).mkdir(parents=True)
        (layout.export(step) / "model.safetensors").write_bytes(b"w" * 5_000)


def test_thresholds_give_the_exact_shortfall(tmp_path, disk):
    guard = DiskSpace(str(tmp_path / "checkpoints"), min_free_gb=30e-6)
    assert guard.shortfall(50_000) == 30_000 + 50_000 - 100_000
    assert guard.shortfall(80_000) == 10_000
    disk["extra"] = 50_000
    pct = DiskSpace(str(tmp_path / "checkpoints"), min_free_gb=0, max_used_pct=90)
    assert pct.shortfall(45_000) == 50_000 + 45_000 - 90_000
    assert pct.shortfall(35_000) == -5_000


def test_retention_prunes_first_and_that_makes_room(tmp_path, disk):
    layout = CheckpointLayout(tmp_path / "checkpoints", tmp_path / "export")
    make_steps(layout, [2, 4, 6])
    guard = DiskSpace(str(layout.ckpt_dir), min_free_gb=30e-6)
    guard.attach(layout, Retention(keep_last=3))
    assert guard.shortfall(20_000) == 10_000
    assert guard.find_room(20_000) is None
    assert layout.steps() == [4, 6] and not layout.export(2).exists()


def test_when_pruning_is_not_enough_the_message_says_how_much_and_where(tmp_path, disk):
    layout = CheckpointLayout(tmp_path / "checkpoints", tmp_path / "export")
    make_steps(layout, [2, 4])
    guard = DiskSpace(str(layout.ckpt_dir), min_free_gb=80e-6)
    guard.attach(layout, Retention(keep_last=1))
    message = guard.find_room(20_000)
    assert layout.steps() == [4]  # pruned what it could, never the newest
    assert message == (
        f"not enough disk space for checkpoints in {layout.ckpt_dir}: 80.0 kB free of 100.0 kB on the "
        f"filesystem mounted at {mount_point(tmp_path)}; a checkpoint takes about 20.0 kB, and "
        "callbacks.disk_space asks for min_free_gb=8e-05. Free at least 20.0 kB "
        f"on that filesystem (or relax those limits), then continue with ckpt_path=auto run_dir={tmp_path}"
    )


def test_size_text():
    assert [size_text(n) for n in (512, 20_600_000, 1_500_000_000)] == ["512 B", "20.6 MB", "1.50 GB"]


@pytest.fixture
def attached(code_corpus, cache_dir):
    """A real module attached to a real (unfitted) trainer: what allow_save acts on."""
    module = tiny_module(tiny_datamodule(cache_dir))
    module.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    return module


@pytest.mark.parametrize(
    ("action", "allowed", "stops"),
    [("warn", True, False), ("skip_save", False, False), ("stop", False, True)],
)
def test_actions(tmp_path, disk, attached, caplog, action, allowed, stops):
    guard = DiskSpace(str(tmp_path / "checkpoints"), min_free_gb=1.0, action=action)
    assert guard.allow_save(attached.trainer, attached, 1_000) is allowed
    assert attached.trainer.should_stop is stops
    assert (attached.stop_reason or "").startswith("not enough disk space") is stops
    if not stops:
        assert re.search(f"not enough disk space .*disk_space.action={action}", caplog.text)


def test_periodic_check_logs_free_space_and_stops_before_any_save(tmp_path, disk, code_corpus, cache_dir):
    disk["total"] = 10**12
    guard = DiskSpace(str(tmp_path / "checkpoints"), min_free_gb=2000.0, check_every_n_steps=1)
    dm = tiny_datamodule(cache_dir)
    module = tiny_module(dm)
    trainer = tiny_trainer(tmp_path, 6, [guard, Retention(), *run_callbacks(tmp_path)])
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 1
    assert module.stop_reason.startswith(
        f"not enough disk space for checkpoints in {tmp_path / 'checkpoints'}"
    )
    assert not list((tmp_path / "checkpoints").iterdir()) and not (tmp_path / "export" / "final").exists()
    with open(tmp_path / "metrics.csv", newline="") as f:
        free = [float(r["sys/disk_free_gb"]) for r in csv.DictReader(f) if r["sys/disk_free_gb"]]
    assert len(free) == 1 and 999.9 < free[0] <= 1000.0


def test_skip_save_trains_on_without_checkpoints(tmp_path, disk, code_corpus, cache_dir):
    disk["total"] = 10**9
    guard = DiskSpace(
        str(tmp_path / "checkpoints"), min_free_gb=2.0, action="skip_save", check_every_n_steps=0
    )
    dm = tiny_datamodule(cache_dir)
    module = tiny_module(dm)
    trainer = tiny_trainer(tmp_path, 2, [guard, *run_callbacks(tmp_path)])
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2 and module.stop_reason is None
    assert not list((tmp_path / "checkpoints").iterdir())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_free_gb": -1}, "disk_space.min_free_gb must be >= 0, got -1"),
        ({"max_used_pct": 0}, "disk_space.max_used_pct must be in (0, 100] or null, got 0"),
        ({"max_used_pct": 101}, "disk_space.max_used_pct must be in (0, 100] or null, got 101"),
        (
            {"action": "delete"},
            "disk_space.action must be one of ('warn', 'skip_save', 'stop'), got 'delete'",
        ),
        (
            {"check_every_n_steps": -1},
            "disk_space.check_every_n_steps must be >= 0 (0 = only before saves), got -1",
        ),
    ],
)
def test_invalid_settings_fail_at_construction(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        DiskSpace(str(tmp_path), **kwargs)

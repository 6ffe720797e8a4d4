"""A run that crashes (or is SIGKILLed) and resumes is bitwise the run that was never interrupted: same
weights, same optimizer states (Muon and Lion), same LR schedule position, same metrics rows."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from nanoternary.lit.callbacks.retention import Retention
from nanoternary.lit.callbacks.wsd import WSDSchedule
from nanoternary.lit.resume import ResumeFrom, continue_csv_log, resolve_resume
from tests.conftest import REPO_ROOT
from tests.tiny_run import TINY_MODEL, run_callbacks, tiny_datamodule, tiny_module, tiny_trainer

STEPS = 12
TINY = [
    "compile=false",
    "model.n_layers=1",
    "model.dim=256",
    "model.context_length=64",
    "data.batch_size=2",
    f"trainer.max_steps={STEPS}",
    "trainer.val_check_interval=4",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "data.val_batch_size=2",
    "callbacks.wsd.warmup_steps=3",
    "callbacks.checkpoint.every_n_steps=2",
    "callbacks.export.final_eval=false",
    "sample_tokens=1",
]
TIMING_COLUMNS = {"perf/tokens_per_sec"}  # wall-clock rates differ between any two runs


@pytest.fixture
def launch(cache_dir):
    """Start `train.py` runs; any still running when the test ends are killed."""
    procs: list[subprocess.Popen] = []

    def start(run_dir: Path, *overrides: str) -> subprocess.Popen:
        env = {**os.environ, "NANOTERNARY_CACHE": str(cache_dir)}
        procs.append(
            subprocess.Popen(
                [sys.executable, "train.py", *TINY, f"run_dir={run_dir}", *overrides],
                cwd=REPO_ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
        return procs[-1]

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return out


def metric_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(f)]


def assert_same_optimizer_states(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) == 2  # Muon and Lion
    for sa, sb in zip(a, b, strict=True):
        assert sa["param_groups"] == sb["param_groups"]  # lr and base_lr: the WSD position
        assert sa["state"].keys() == sb["state"].keys() and len(sa["state"]) > 0
        for i in sa["state"]:
            for name, value in sa["state"][i].items():
                assert torch.equal(value, sb["state"][i][name]), (i, name)


class RandomDraw(L.Callback):
    """Logs one number from the global torch RNG per batch: the resumed run must draw the same ones."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pl_module.log("test/rand", torch.rand(()).item(), on_step=True, on_epoch=False)


class Crash(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 5:
            raise RuntimeError("simulated crash at step 5")


def test_crash_then_resume_in_process_is_bitwise_the_uninterrupted_run(tmp_path, code_corpus, cache_dir):
    def fit(run_dir: Path, *extra: L.Callback, resume: ResumeFrom | None = None):
        L.seed_everything(7)
        dm = tiny_datamodule(cache_dir)
        module = tiny_module(dm)
        callbacks = [
            WSDSchedule(warmup_steps=3),
            RandomDraw(),
            *extra,
            Retention(keep_last=2),
            *run_callbacks(run_dir),
        ]
        trainer = tiny_trainer(run_dir, 6, callbacks)
        continue_csv_log(trainer.logger, resume.micro_step if resume else 0)
        trainer.fit(module, datamodule=dm, ckpt_path=resume.ckpt if resume else None)
        return trainer

    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    reference = fit(whole)
    with pytest.raises(RuntimeError, match="simulated crash at step 5"):
        fit(crashed, Crash())
    resume = resolve_resume("auto", str(crashed), crashed / "checkpoints", TINY_MODEL)
    assert resume == ResumeFrom(step=4, micro_step=4, ckpt=crashed / "checkpoints" / "step-00000004.ckpt")
    resumed = fit(crashed, resume=resume)

    pa, pb = reference.lightning_module.state_dict(), resumed.lightning_module.state_dict()
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert_same_optimizer_states(
        [o.state_dict() for o in reference.optimizers], [o.state_dict() for o in resumed.optimizers]
    )
    assert resumed.datamodule.start_step == 4
    assert metric_rows(crashed) == metric_rows(whole)
    assert sorted(p.name for p in (crashed / "checkpoints").iterdir()) == [
        "last.ckpt",
        "step-00000004.ckpt",
        "step-00000006.ckpt",
    ]


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_the_uninterrupted_run(tmp_path, code_corpus, launch):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = launch(whole)
    victim = launch(killed)
    marker = killed / "checkpoints" / "step-00000004.ckpt"
    deadline = time.monotonic() + 600
    while not marker.exists():
        assert victim.poll() is None, victim.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "the run never wrote its step-4 checkpoint"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert not (killed / "export" / "final").exists(), "the run finished before the kill: nothing was tested"
    steps_at_kill = sorted(p.name for p in (killed / "checkpoints").glob("step-*.ckpt"))

    resumed_log = finish(launch(killed, "ckpt_path=auto"))
    finish(reference)

    newest = steps_at_kill[-1]
    assert f"resuming from {killed / 'checkpoints' / newest}" in (killed / "train.log").read_text()
    assert "Restored all states" in resumed_log

    a = load_file(whole / "export" / "final" / "model.safetensors")
    b = load_file(killed / "export" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    ca = torch.load(whole / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    cb = torch.load(killed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ca["global_step"] == cb["global_step"] == STEPS
    assert_same_optimizer_states(ca["optimizer_states"], cb["optimizer_states"])

    rows_a, rows_b = metric_rows(whole), metric_rows(killed)
    assert [r["step"] for r in rows_a if r["train/loss"]] == [str(s) for s in range(STEPS)]
    assert rows_b == rows_a

"""Training through Hydra for real: the CLI a user types, in a subprocess, checking what it writes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanoternary.io.export_dir import load_export
from tests.conftest import REPO_ROOT
from tests.train_cli import nonblank

FAST = ["debug=fast", "model.n_layers=2", "data.batch_size=4"]


def run_train(tmp_path: Path, cache_dir: Path, *overrides: str) -> Path:
    out = tmp_path / "run"
    env = {**os.environ, "NANOTERNARY_CACHE": str(cache_dir)}
    proc = subprocess.run(
        [sys.executable, "train.py", *overrides, f"hydra.run.dir={out}"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_fast_run_writes_every_file_and_honours_max_steps(tmp_path, cache_dir):
    out = run_train(tmp_path, cache_dir, *FAST, "trainer.max_steps=5")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "last.ckpt",
        "step-00000002.ckpt",
        "step-00000004.ckpt",
    ]
    final = out / "export" / "final"
    assert sorted(p.name for p in final.iterdir()) == [
        "meta.json",
        "model.gguf",
        "model.safetensors",
        "tokenizer.json",
    ]
    meta = json.loads((final / "meta.json").read_text())
    assert meta["step"] == 5
    assert meta["tokens_seen"] == 5 * 4 * 256
    assert meta["model"]["n_layers"] == 2
    assert meta["val_tokens"] > 150_000 and 0 < meta["val_bpb"] < 4.0
    assert len(meta["corpus_hash"]) == 64 and len(meta["tokenizer_hash"]) == 64
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    steps = {int(r["step"]) for r in rows if r.get("train/loss")}
    assert max(steps) == 4  # Lightning logs step indices 0..max_steps-1
    lrs = [float(r["train/lr_muon"]) for r in rows if r.get("train/lr_muon")]
    assert lrs[0] == pytest.approx(0.02 * 1 / 2, rel=1e-6)  # warmup_steps=2 (debug=fast): step 1 gets half
    summary = json.loads((out / "summary.json").read_text())
    assert summary["baselines_bpb"]["xz"] < summary["baselines_bpb"]["gzip"]
    assert summary["val/bpb"] == meta["val_bpb"]
    assert (out / ".hydra" / "config.yaml").is_file()
    assert nonblank(out / "loss.png") and nonblank(out / "lr.png")  # the run's own curves


def test_export_round_trip_gives_identical_logits(tmp_path, cache_dir):
    """Also a run whose files go to `paths.output_dir`, away from Hydra's run folder (and its .hydra/)."""
    out = tmp_path / "elsewhere"
    run_train(tmp_path, cache_dir, *FAST, "trainer.max_steps=2", f"paths.output_dir={out}")
    assert nonblank(out / "loss.png") and not (out / ".hydra").exists()
    model, meta, tokenizer = load_export(out / "export" / "final")
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    from nanoternary.lit.module import LitTernaryLM

    lit = LitTernaryLM(**ckpt["hyper_parameters"])
    lit.load_state_dict(ckpt["state_dict"])
    ids = torch.tensor([tokenizer.encode("def add(a, b):\n    return a + b\n")])
    with torch.no_grad():
        assert torch.equal(model(ids), lit.model.eval()(ids))
    assert meta["step"] == 2


def test_bad_override_fails_with_a_clear_message(tmp_path, cache_dir):
    env = {**os.environ, "NANOTERNARY_CACHE": str(cache_dir)}
    proc = subprocess.run(
        [sys.executable, "train.py", *FAST, "model.group_size=100", f"hydra.run.dir={tmp_path}/x"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "model.dim=256 is not a multiple of model.group_size=100" in proc.stderr

"""nanoternary-report on run folders laid out exactly as train.py writes them (.hydra/ from the real
config tree, metrics.csv, summary.json, export/final/meta.json), with known numbers in them."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from matplotlib.image import imread
from omegaconf import OmegaConf, open_dict

from nanoternary.cli.compare import find_runs, load_run, markdown_table, storage_bits, table_row, write_report
from nanoternary.cli.train import CONF_DIR
from nanoternary.model.bitlinear import BitLinear
from nanoternary.model.config import ModelConfig
from nanoternary.model.transformer import TernaryLM
from tests.conftest import REPO_ROOT

FIELDS = [
    "epoch",
    "perf/tokens_per_sec",
    "step",
    "train/loss",
    "train/lr_muon",
    "train/lr_lion",
    "val/bpb",
    "val/loss",
]


def make_run(
    folder: Path, overrides: list[str], rows: list[dict], meta: dict | None, summary: dict | None
) -> Path:
    """A run folder: the composed config as Hydra saves it, and the given metrics, meta and summary."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save({"hydra": cfg.hydra}, folder / ".hydra" / "hydra.yaml")
    with open_dict(cfg):
        del cfg["hydra"]
    OmegaConf.save(cfg, folder / ".hydra" / "config.yaml")
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    if meta is not None:
        (folder / "export" / "final").mkdir(parents=True)
        (folder / "export" / "final" / "meta.json").write_text(json.dumps(meta))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def train_rows(steps: int, lr: float, loss0: float) -> list[dict]:
    rows = []
    for s in range(steps):
        rows.append(
            {
                "epoch": 0,
                "step": s,
                "train/loss": loss0 - 0.1 * s,
                "train/lr_muon": lr,
                "train/lr_lion": lr / 100,
                "perf/tokens_per_sec": 1000.0 * (s + 1) if s % 2 else "",
            }
        )
        if s % 2:
            rows.append(
                {"epoch": 0, "step": s, "val/loss": loss0 - 0.1 * s - 0.05, "val/bpb": 2.0 - 0.01 * s}
            )
    return rows


@pytest.fixture()
def two_runs(tmp_path: Path) -> Path:
    root = tmp_path / "outputs"
    finished = {
        "format_version": 1,
        "model": ModelConfig(n_layers=2).to_dict(),
        "step": 6,
        "tokens_seen": 6 * 16 * 256,
        "val_bpb": 1.87654,
        "val_tokens": 12345,
        "git_commit": "0123456789abcdef",
    }
    make_run(
        root / "train" / "multirun" / "2026-01-01_10-00-00.000001" / "0",
        ["model.n_layers=2", "optim.muon.lr=0.01"],
        train_rows(6, 0.01, 8.0),
        finished,
        {"wall_seconds": 125.4, "val/bpb": 1.87654},
    )
    # still running: no export/final, no summary; the float baseline model
    make_run(
        root / "train" / "2026-01-02_09-00-00.000002",
        ["model=tiny_fp", "data.batch_size=4"],
        train_rows(4, 0.02, 8.3),
        None,
        None,
    )
    return root


def test_table_reads_every_column_from_the_run_files(two_runs: Path):
    runs = [load_run(p, two_runs) for p in find_runs(two_runs, [])]
    assert [r.name for r in runs] == [
        "train/2026-01-02_09-00-00.000002",
        "train/multirun/2026-01-01_10-00-00.000001/0",
    ]
    fp_row, sweep_row = (table_row(r) for r in runs)
    params = TernaryLM(ModelConfig(n_layers=2)).num_parameters()
    assert sweep_row == {
        "run": "train/multirun/2026-01-01_10-00-00.000001/0",
        "model": "tiny (256d×2L)",
        "params": f"{params / 1e6:.3g}M",
        "bits/weight": f"{storage_bits(TernaryLM(ModelConfig(n_layers=2))):.2f}",
        "tokens": "24.6k",  # 6 steps x 16 x 256 from meta.json
        "val/bpb": "1.8765",
        "tokens/s": "4k",  # mean of 2000, 4000, 6000
        "wall time": "2m05s",
        "commit": "01234567",
    }
    # no meta.json: tokens from the last logged step x batch 4 x context 256; bpb from the last validation, marked
    assert fp_row["tokens"] == "4.1k" and fp_row["val/bpb"] == "1.9700†"
    assert fp_row["model"] == "tiny_fp (256d×4L)" and fp_row["bits/weight"] == "16.00"
    assert fp_row["wall time"] == "–" and fp_row["commit"] == "–"
    table = markdown_table([fp_row, sweep_row])
    assert (
        table.splitlines()[0]
        == "| run | model | params | bits/weight | tokens | val/bpb | tokens/s | wall time | commit |"
    )
    assert len(table.splitlines()) == 4


def test_curves_are_against_tokens_seen(two_runs: Path):
    run = load_run(two_runs / "train" / "multirun" / "2026-01-01_10-00-00.000001" / "0", two_runs)
    tokens, losses = run.curve("val/loss")
    assert tokens == [2 * 4096, 4 * 4096, 6 * 4096]  # step s logged after s + 1 micro-batches of 16 x 256
    assert losses == pytest.approx([7.85, 7.65, 7.45])


def test_storage_bits_of_ternary_and_float_models():
    model = TernaryLM(ModelConfig(n_layers=1))
    ternary = sum(m.weight.numel() for m in model.modules() if isinstance(m, BitLinear))
    total = model.num_parameters()
    expected = (ternary * math.log2(3) + 16 * ternary / 256 + 16 * (total - ternary)) / total
    assert storage_bits(model) == pytest.approx(expected)
    assert storage_bits(TernaryLM(ModelConfig(n_layers=1, quantize=False))) == 16.0


def nonblank(png: Path) -> bool:
    pixels = imread(png)[..., :3]
    return pixels.shape[0] > 200 and (np.abs(pixels - 1.0).sum(-1) > 0.1).mean() > 0.02


def test_report_writes_markdown_and_plots(two_runs: Path, tmp_path: Path):
    report, figures = write_report(two_runs, tmp_path / "report")
    text = report.read_text()
    assert "| train/multirun/2026-01-01_10-00-00.000001/0 | tiny (256d×2L) |" in text
    assert [p.name for p in figures] == ["loss.png", "lr.png"]
    assert all(nonblank(p) for p in figures)


def test_select_patterns_and_clear_errors(two_runs: Path, tmp_path: Path):
    assert [p.name for p in find_runs(two_runs, ["train/multirun/*/*"])] == ["0"]
    with pytest.raises(FileNotFoundError, match=r"no run folders .* matching \['nope/\*'\]"):
        write_report(two_runs, tmp_path / "r", ["nope/*"])
    with pytest.raises(FileNotFoundError, match="runs_dir=.*missing does not exist"):
        write_report(tmp_path / "missing", tmp_path / "r")


def test_cli_prints_the_table(two_runs: Path, tmp_path: Path):
    out = tmp_path / "cli-report"
    proc = subprocess.run(
        [sys.executable, "-m", "nanoternary.cli.compare", f"runs_dir={two_runs}", f"out_dir={out}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| train/2026-01-02_09-00-00.000002 | tiny_fp (256d×4L) |" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["loss.png", "lr.png", "report.md"]

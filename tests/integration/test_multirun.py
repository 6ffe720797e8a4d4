"""Hydra sweeps through the real CLI: a grid with the basic sweeper (one complete folder per setting,
then compared with nanoternary-report) and an Optuna search that minimizes what train.py returns."""

from __future__ import annotations

import json
import re

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from nanoternary.cli.compare import human, write_report
from nanoternary.cli.train import CONF_DIR
from tests.train_cli import TINY, metric_rows, nonblank, train_cli

RUN_FILES = [
    ".hydra/config.yaml",
    "metrics.csv",
    "summary.json",
    "train.log",
    "checkpoints/last.ckpt",
    "export/final/meta.json",
    "export/final/model.safetensors",
    "export/final/tokenizer.json",
]


def compose_sweep(option: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=[f"hparams_search={option}"], return_hydra_config=True)


def test_lr_grid_is_a_multirun_over_three_muon_rates():
    cfg = compose_sweep("lr_grid")
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.optimized_metric == "val/bpb"
    assert cfg.hydra.sweeper.params == {"optim.muon.lr": "0.01,0.02,0.04"}


def test_optuna_search_minimizes_val_bpb():
    pytest.importorskip(
        "hydra_plugins.hydra_optuna_sweeper", reason="optional extra: pip install -e '.[optuna]'"
    )
    cfg = compose_sweep("optuna")
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert (cfg.hydra.sweeper.direction, cfg.optimized_metric) == ("minimize", "val/bpb")
    assert set(cfg.hydra.sweeper.params) == {"optim.muon.lr", "optim.lion.lr"}


def test_run_and_sweep_folders_are_unique_to_the_microsecond():
    """Jobs of one sweep get numbered subfolders; runs or sweeps started in the same second differ by
    the microseconds in their folder names."""
    first, second = compose_sweep("lr_grid").hydra, compose_sweep("lr_grid").hydra
    for a, b in ((first.run.dir, second.run.dir), (first.sweep.dir, second.sweep.dir)):
        assert re.search(r"_\d{2}-\d{2}-\d{2}\.\d{6}$", a) and a != b
    assert OmegaConf.to_container(first.sweep)["subdir"] == "${hydra.job.num}"


@pytest.mark.slow  # ~1 min on 2 shared cores: two training jobs in one process
def test_multirun_writes_one_complete_folder_per_setting_and_the_report_compares_them(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    train_cli(cache_dir, "-m", *TINY, "optim.muon.lr=0.01,0.03", f"hydra.sweep.dir={sweep}")
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "multirun.yaml"]
    for job, lr in (("0", 0.01), ("1", 0.03)):
        missing = [f for f in RUN_FILES if not (sweep / job / f).is_file()]
        assert not missing, f"job {job} lacks {missing}"
        assert OmegaConf.load(sweep / job / ".hydra" / "config.yaml").optim.muon.lr == lr
        assert max(v for _, v in metric_rows(sweep / job, "train/lr_muon")) == pytest.approx(lr)

    report, figures = write_report(sweep, tmp_path / "report")
    rows = [line for line in report.read_text().splitlines() if line.startswith(("| 0 ", "| 1 "))]
    params = human(json.loads((sweep / "0" / "export" / "final" / "meta.json").read_text())["num_parameters"])
    tokens = 2 * 4 * 64  # steps x batch x context
    assert len(rows) == 2 and all(
        f"| tiny (256d×1L) | {params} |" in r and f"| {tokens} |" in r for r in rows
    )
    assert all(nonblank(p) for p in figures)


@pytest.mark.slow  # ~1-2 min: two trials
def test_optuna_sweep_of_two_trials_reports_the_best_returned_bpb(tmp_path, cache_dir):
    pytest.importorskip(
        "hydra_plugins.hydra_optuna_sweeper", reason="optional extra: pip install -e '.[optuna]'"
    )
    sweep = tmp_path / "optuna"
    train_cli(
        cache_dir, "hparams_search=optuna", "hydra.sweeper.n_trials=2", *TINY, f"hydra.sweep.dir={sweep}"
    )
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "optimization_results.yaml"]
    result = OmegaConf.load(sweep / "optimization_results.yaml")
    # what each trial returned: its val/bpb (the last validation, as final_eval is off in TINY)
    returned = {job: metric_rows(sweep / job, "val/bpb")[-1][1] for job in ("0", "1")}
    best = min(returned, key=returned.get)
    assert result.best_value == pytest.approx(returned[best], rel=1e-6)
    best_cfg = OmegaConf.load(sweep / best / ".hydra" / "config.yaml").optim
    assert result.best_params == {"optim.muon.lr": best_cfg.muon.lr, "optim.lion.lr": best_cfg.lion.lr}
    lrs = [OmegaConf.load(sweep / j / ".hydra" / "config.yaml").optim.muon.lr for j in ("0", "1")]
    assert lrs[0] != lrs[1] and all(0.004 <= lr <= 0.08 for lr in lrs)

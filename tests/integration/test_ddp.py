"""Data-parallel training for real: `trainer=ddp` on 2 CPU processes (gloo), as a user starts it, against
one process with twice the batch; plus the GPU/cluster configs, which must compose and build here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from nanoternary.cli.resolvers import register_resolvers
from nanoternary.cli.train import CONF_DIR
from tests.train_cli import TINY, metric_rows, train_cli

register_resolvers()

# Loaded by every process of the DDP run through PYTHONPATH; in ranks > 0 (LOCAL_RANK set by Lightning's
# launcher) it records every write Python makes under the run folder: opens for writing, renames, links,
# deletions and new folders. (C++ writers such as torch.save of a path bypass it; they only ever run in
# the checkpoint and export callbacks, whose files the folder listing below compares.)
WATCH_HOOK = """
import os, sys
if os.environ.get("LOCAL_RANK", "0") != "0":
    _root = os.environ["NT_WATCH_DIR"]
    _log = open(os.path.join(os.environ["NT_WATCH_LOG"], "rank%s.txt" % os.environ["LOCAL_RANK"]), "a", buffering=1)
    _log.write("watching\\n")
    _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _under(path):
        try:
            return os.path.abspath(os.fsdecode(path)).startswith(_root)
        except TypeError:  # a file descriptor
            return False

    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if mode else bool((flags or 0) & _WRITE_FLAGS)
            if writes and _under(path):
                _log.write("%s %s %s\\n" % (event, path, mode or flags))
        elif event in ("os.rename", "os.link", "os.symlink") and _under(args[1]):
            _log.write("%s %s\\n" % (event, args[1]))
        elif event in ("os.remove", "os.rmdir", "os.truncate", "shutil.rmtree", "os.mkdir") and _under(args[0]):
            if not (event == "os.mkdir" and os.path.exists(args[0])):
                _log.write("%s %s\\n" % (event, args[0]))

    sys.addaudithook(_hook)
"""


def files_of(run_dir: Path) -> list[str]:
    return sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file())


@pytest.mark.slow  # ~1-2 min on 2 shared cores: 3 processes start torch + Lightning
def test_two_ddp_processes_train_like_one_with_twice_the_batch(tmp_path, cache_dir):
    """The 2 ranks draw batch 2 each; the single process draws batch 4 as 2 shards, i.e. exactly the
    rows of rank 0 then rank 1. DDP averages the ranks' gradients, which is the gradient of the mean loss
    over all 4 rows, so both runs take the same steps: the global gradient norm of every step and the
    validation loss (rank-sharded windows vs. the same windows in one batch) agree to float rounding.
    Weights agree elementwise except where a gradient is zero up to rounding: Lion's sign() turns that
    noise into a full +-lr step, so a handful of such entries may differ by 2 x lr."""
    ddp_dir, one_dir, watch = tmp_path / "ddp", tmp_path / "one", tmp_path / "watch"
    watch.mkdir()
    (watch / "sitecustomize.py").write_text(WATCH_HOOK)
    env = {"PYTHONPATH": str(watch), "NT_WATCH_DIR": str(ddp_dir), "NT_WATCH_LOG": str(watch)}
    train_cli(
        cache_dir,
        *TINY,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "data.batch_size=2",
        "data.val_batch_size=2",
        f"hydra.run.dir={ddp_dir}",
        env=env,
    )
    train_cli(
        cache_dir,
        *TINY,
        "trainer=cpu",
        "data.batch_size=4",
        "data.shards_per_device=2",
        "data.val_batch_size=4",
        f"hydra.run.dir={one_dir}",
    )

    # rel 1e-4: after the first step the weights differ by rounding (on an AMX CPU the second step's
    # gradient norm differed by 2.2e-5), and fp32 sums over 10^6 squares are good to ~1e-5 at best
    for key in ("train/grad_norm", "val/loss", "val/bpb"):
        ddp, one = metric_rows(ddp_dir, key), metric_rows(one_dir, key)
        assert [s for s, _ in ddp] == [s for s, _ in one] and ddp, key
        assert [v for _, v in ddp] == pytest.approx([v for _, v in one], rel=1e-4), key
    metas = [json.loads((d / "export" / "final" / "meta.json").read_text()) for d in (ddp_dir, one_dir)]
    assert metas[0]["tokens_seen"] == metas[1]["tokens_seen"] == 2 * 4 * 64
    a, b = (
        torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
        for d in (ddp_dir, one_dir)
    )
    assert a.keys() == b.keys()
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    # Lion's sign() and Muon's bf16 Newton-Schulz turn rounding into whole-step differences in a few entries:
    # 3e-4 of them on an AMX CPU, under 1e-4 on an AVX-512 one
    assert (diffs > 1e-4).float().mean() < 1e-3, (
        f"{int((diffs > 1e-4).sum())} of {diffs.numel()} weights differ"
    )
    lion_lr = OmegaConf.load(ddp_dir / ".hydra" / "config.yaml").optim.lion.lr
    assert diffs.max() <= 2 * 2 * lion_lr + 1e-4  # two Lion steps in opposite directions at most

    # only rank 0 wrote: the same files as the single process, one copy of each log line, no write from rank 1
    assert files_of(ddp_dir) == files_of(one_dir)
    assert (ddp_dir / "train.log").read_text().count(" parameters") == 1
    assert (watch / "rank1.txt").read_text() == "watching\n"


@pytest.mark.slow  # two DDP jobs in a row
def test_a_multirun_of_ddp_jobs_keeps_each_job_in_its_folder(tmp_path, cache_dir):
    """Lightning restarts ranks > 0 with the command line it was given; in a sweep that would start the
    sweep again. They must join their own job: one folder per setting, nothing else."""
    sweep = tmp_path / "sweep"
    train_cli(
        cache_dir,
        "-m",
        *TINY,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "data.batch_size=2",
        "optim.muon.lr=0.01,0.02",
        f"hydra.sweep.dir={sweep}",
    )
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "multirun.yaml"]
    for job, lr in (("0", 0.01), ("1", 0.02)):
        assert OmegaConf.load(sweep / job / ".hydra" / "config.yaml").optim.muon.lr == lr
        assert max(lr_ for _, lr_ in metric_rows(sweep / job, "train/lr_muon")) == pytest.approx(lr)
        assert (sweep / job / "export" / "final" / "meta.json").is_file()
        assert (sweep / job / "train.log").read_text().count(" parameters") == 1


def compose_train(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def test_gpu_and_ddp_trainers_build_their_strategies():
    gpu = compose_train(["trainer=gpu"]).trainer
    assert (gpu.accelerator, gpu.devices, gpu.precision) == ("gpu", 1, "bf16-mixed")
    ddp = compose_train(["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"]).trainer
    assert (ddp.strategy, ddp.devices, ddp.num_nodes, ddp.use_distributed_sampler) == ("ddp", 4, 2, False)


def test_fsdp_builds_lightnings_fsdp2_strategy_with_whole_checkpoints():
    strategy = instantiate(compose_train(["trainer=fsdp"]).trainer.strategy)
    assert type(strategy).__name__ == "ModelParallelStrategy"
    assert strategy._save_distributed_checkpoint is False


def test_slurm_launcher_matches_tasks_to_the_trainer():
    pytest.importorskip(
        "hydra_plugins.hydra_submitit_launcher", reason="optional extra: pip install -e '.[slurm]'"
    )
    cfg = compose_train(["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=3"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["tasks_per_node"], launcher["gpus_per_node"], launcher["nodes"]) == (4, 4, 3)

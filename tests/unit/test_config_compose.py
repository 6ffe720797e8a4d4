"""Every option of every config group composes, resolves and builds its objects."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from nanoternary.cli.resolvers import register_resolvers
from nanoternary.cli.train import CONF_DIR
from nanoternary.model.config import ModelConfig

register_resolvers()


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def compose_train(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = "/tmp/nt-compose"
    return cfg


GROUPS = ["model", "optim", "data", "trainer", "callbacks", "logger", "experiment", "debug"]
CASES = [(g, o) for g in GROUPS for o in options(g)]


def test_groups_have_the_documented_options():
    assert {"tiny", "tiny_fp", "small", "base"} <= set(options("model"))
    assert {"muon_lion", "adamw"} <= set(options("optim"))
    assert {"code", "synthetic_code"} <= set(options("data"))
    assert {"cpu", "gpu", "ddp", "fsdp"} <= set(options("trainer"))


@pytest.mark.parametrize(("group", "option"), CASES)
def test_every_option_composes_and_instantiates(group, option, tmp_path):
    cfg = compose_train([f"{group}={option}"])
    OmegaConf.resolve(cfg.model)
    ModelConfig.from_dict(OmegaConf.to_container(cfg.model))
    for node in (cfg.get("callbacks") or {}).values():
        instantiate(node)
    for node in (cfg.get("logger") or {}).values():
        instantiate(node)
    assert cfg.optim.name in ("muon_lion", "adamw")
    assert OmegaConf.to_container(cfg.trainer, resolve=True)["_target_"].endswith("Trainer")
    if option in ("cpu", "gpu", "ddp", "fsdp"):
        assert cfg.trainer.max_steps > 0

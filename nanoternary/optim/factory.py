"""The optimizers an `optim` config asks for, built for a model: one place for the trainer and the benchmarks."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nanoternary.optim.grouping import split_params
from nanoternary.optim.lion import Lion
from nanoternary.optim.muon import BatchedMuon


def make_optimizers(
    model: nn.Module, optim: dict[str, Any], muon_cls: type[torch.optim.Muon] = BatchedMuon
) -> list[torch.optim.Optimizer]:
    """[AdamW] for `name: adamw`; [Muon, Lion] for `name: muon_lion` (conf/optim/*.yaml).

    `muon_cls` lets the speed benchmark's reference loop use torch.optim.Muon itself; the batched
    subclass is the default because it computes the same update in far fewer calls.
    """
    name = optim["name"]
    if name == "adamw":
        cfg = optim["adamw"]
        return [
            torch.optim.AdamW(
                model.parameters(), lr=cfg["lr"], betas=tuple(cfg["betas"]), weight_decay=cfg["weight_decay"]
            )
        ]
    if name != "muon_lion":
        raise ValueError(f"unknown optim.name {name!r}; expected 'muon_lion' or 'adamw'")
    muon_params, lion_params = split_params(model)
    m, li = optim["muon"], optim["lion"]
    muon = muon_cls(
        muon_params,
        lr=m["lr"],
        weight_decay=m["weight_decay"],
        momentum=m["momentum"],
        nesterov=m["nesterov"],
        ns_steps=m["ns_steps"],
        adjust_lr_fn=m["adjust_lr_fn"],
    )
    lion = Lion(lion_params, lr=li["lr"], betas=tuple(li["betas"]), weight_decay=li["weight_decay"])
    return [muon, lion]

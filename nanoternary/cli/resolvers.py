"""OmegaConf resolvers the config tree uses (`${nt.cpu_precision:}` ...)."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf


def cpu_precision() -> str:
    """bf16 autocast only where the CPU runs bf16 natively (AVX512-BF16 / AMX); fp32 elsewhere."""
    return "bf16-mixed" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "32-true"


def auto_precision() -> str:
    return "bf16-mixed" if torch.cuda.is_available() else cpu_precision()


def or_default(value: object, default: object) -> object:
    """`${nt.or_default:${run_dir},outputs/...}`: the value unless it is null."""
    return default if value is None else value


def register_resolvers() -> None:
    for name, fn in (
        ("nt.cpu_precision", cpu_precision),
        ("nt.auto_precision", auto_precision),
        ("nt.or_default", or_default),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)

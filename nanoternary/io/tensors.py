"""The format-neutral view of a trained model that every exporter writes and every reader returns.

A TernaryLM splits into full-precision tensors (embedding, norms, mHC parameters, unquantized linears)
and ternary ones (each quantized BitLinear as int8 codes in {-1, 0, +1} plus float32 scales). Keeping the
codes and scales apart, named as in `TernaryLM.state_dict()`, is what lets GGUF store them exactly and
lets the inference engine rebuild any model generically, whatever residual or scale layout it has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanoternary.data.tokenizer import TextTokenizer
from nanoternary.io.export_dir import load_export
from nanoternary.model.bitlinear import BitLinear
from nanoternary.model.config import ModelConfig
from nanoternary.model.transformer import TernaryLM


@dataclass
class TernaryTensor:
    """W = codes * scales: codes int8 (out, in); scales float32 (out, groups), or (1, 1) for one per tensor."""

    codes: torch.Tensor
    scales: torch.Tensor

    def __post_init__(self) -> None:
        out, inp = self.codes.shape
        rows, groups = self.scales.shape
        if (rows, groups) != (1, 1) and (rows != out or inp % groups):
            raise ValueError(
                f"scales of shape {tuple(self.scales.shape)} do not fit codes of shape {(out, inp)}"
            )

    def dense(self) -> torch.Tensor:
        """The float32 weight the training forward pass multiplies with."""
        out, inp = self.codes.shape
        scales = self.scales.expand(out, self.scales.shape[1]) if self.scales.shape[0] == 1 else self.scales
        return self.codes.float() * scales.repeat_interleave(inp // scales.shape[1], dim=1)


@dataclass
class ModelTensors:
    """Everything needed to rebuild a model without its training code: config, weights, tokenizer, facts."""

    cfg: ModelConfig
    dense: dict[str, torch.Tensor]
    ternary: dict[str, TernaryTensor]
    tokenizer: TextTokenizer
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_model(
        cls, model: TernaryLM, tokenizer: TextTokenizer, meta: dict[str, Any] | None = None
    ) -> ModelTensors:
        """Split a TernaryLM: quantized BitLinears become codes + scales exactly as its forward pass uses them."""
        ternary = {
            f"{name}.weight": TernaryTensor(*module.ternary())
            for name, module in model.named_modules()
            if isinstance(module, BitLinear) and module.quantize
        }
        dense = {
            k: v.detach().to("cpu", torch.float32).contiguous()
            for k, v in model.state_dict().items()
            if k not in ternary
        }
        ternary = {k: TernaryTensor(t.codes.cpu(), t.scales.cpu()) for k, t in ternary.items()}
        return cls(model.cfg, dense, ternary, tokenizer, dict(meta or {}))

    @classmethod
    def from_folder(cls, path: str | Path) -> ModelTensors:
        """From a model folder (model.safetensors + meta.json + tokenizer.json)."""
        model, meta, tokenizer = load_export(path)
        return cls.from_model(model, tokenizer, meta)


def display_name(path: Path) -> str:
    """A readable model name: '<run>-final' for <run>/export/final (or its model.gguf), else the folder
    name or the file's stem."""
    path = Path(path)
    if path.suffix and path.stem == "model":
        path = path.parent
    elif path.suffix:
        return path.stem
    return f"{path.parents[1].name}-{path.name}" if path.parent.name == "export" else path.name

"""Model configuration: one dataclass that fully describes a TernaryLM, stored in every export."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

MHC_MODES = ("dynamic", "static", "seed")
MAX_MHC_STREAMS = 5  # n! permutations: 120 at n=5 is the largest table we accept


@dataclass
class MHCConfig:
    """Residual-stream settings. n_streams=1 is a plain residual connection."""

    n_streams: int = 1
    mode: str = "dynamic"
    gate_init: float = 0.01

    def __post_init__(self) -> None:
        if not 1 <= self.n_streams <= MAX_MHC_STREAMS:
            raise ValueError(
                f"model.mhc.n_streams must be in 1..{MAX_MHC_STREAMS} (n! permutation matrices), got {self.n_streams}"
            )
        if self.mode not in MHC_MODES:
            raise ValueError(f"model.mhc.mode must be one of {MHC_MODES}, got {self.mode!r}")
        if self.mode == "seed" and self.n_streams != 2:
            raise ValueError(
                "model.mhc.mode='seed' is the original system's 2-stream variant: set n_streams=2"
            )
        if self.mode == "dynamic" and self.n_streams > 1 and not self.gate_init:
            raise ValueError(
                "model.mhc.gate_init must be non-zero in dynamic mode: a zero gate times a zero-initialised "
                "projection never receives a gradient"
            )


@dataclass
class ModelConfig:
    """Shape and quantization of a ternary transformer (DESIGN.md section 3)."""

    vocab_size: int = 4096
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    ffn_dim: int = 512
    context_length: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    quantize: bool = True
    group_size: int = 256
    fp16_scales: bool = True
    sub_norms: bool = False
    embed_std: float = 0.02
    mhc: MHCConfig = field(default_factory=MHCConfig)

    def __post_init__(self) -> None:
        if isinstance(self.mhc, dict):
            self.mhc = MHCConfig(**self.mhc)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.group_size < 0:
            raise ValueError(
                f"model.group_size must be >= 0 (0 = one scale per tensor), got {self.group_size}"
            )
        if self.quantize and self.group_size:
            for name, width in (("dim", self.dim), ("ffn_dim", self.ffn_dim)):
                if width % self.group_size:
                    raise ValueError(
                        f"model.{name}={width} is not a multiple of model.group_size={self.group_size}"
                    )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a dict (e.g. meta.json or a Hydra node), rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {unknown}")
        data = dict(data)
        if isinstance(data.get("mhc"), dict):
            data["mhc"] = MHCConfig(**data["mhc"])
        return cls(**data)

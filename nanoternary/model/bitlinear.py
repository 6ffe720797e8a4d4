"""BitLinear: a bias-free linear layer whose forward pass sees ternary weights and 8-bit activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoternary.model.quant import quantize_activation, quantize_weight, ternarize
from nanoternary.model.sharding import whole


class BitLinear(nn.Linear):
    """Full-precision latent weights, quantized on the fly (STE); `quantize=False` gives a plain Linear."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        quantize: bool = True,
        group_size: int = 256,
        fp16_scales: bool = True,
    ) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.quantize = quantize
        self.group_size = group_size
        self.fp16_scales = fp16_scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantize:
            return F.linear(x, self.weight)
        return F.linear(
            quantize_activation(x), quantize_weight(self.weight, self.group_size, self.fp16_scales)
        )

    @torch.no_grad()
    def ternary(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, scales) exactly as the forward pass uses them; what the exporters write. A weight that
        FSDP shards is gathered first: the scales are per row group, the same on every rank."""
        return ternarize(whole(self.weight), self.group_size, self.fp16_scales)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quantize={self.quantize}, group_size={self.group_size}"

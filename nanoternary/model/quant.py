"""BitNet b1.58 quantizers (REFERENCE.md section 2) with straight-through gradients.

Weights: absmean ternary per group of `group_size` consecutive inputs of a row (0 = per tensor), scales
optionally rounded to fp16 so that a GGUF TQ1_0/TQ2_0 export with 256-wide blocks is bit-exact.
Activations: per-token absmax 8-bit.
"""

from __future__ import annotations

import torch

SCALE_EPS = 1e-8
ACT_EPS = 1e-5


def weight_scales(w: torch.Tensor, group_size: int, fp16_scales: bool = True) -> torch.Tensor:
    """Absmean scale per (row, group): shape (out, in // group_size), or (1, 1) when group_size == 0."""
    w = w.detach().float()
    if group_size == 0:
        s = w.abs().mean().clamp_min(SCALE_EPS).reshape(1, 1)
    else:
        s = w.reshape(w.shape[0], -1, group_size).abs().mean(dim=-1).clamp_min(SCALE_EPS)
    if fp16_scales:
        s = s.half().float().clamp_min(torch.finfo(torch.float16).tiny)
    return s


def expand_scales(scales: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Broadcast (out, groups) scales to the full (out, in) weight shape."""
    out, inp = shape
    if scales.numel() == 1:
        return scales.reshape(1, 1).expand(out, inp)
    return scales.repeat_interleave(inp // scales.shape[1], dim=1)


def ternarize(
    w: torch.Tensor, group_size: int, fp16_scales: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (codes in {-1,0,1} as int8, scales) of a 2-D weight."""
    scales = weight_scales(w, group_size, fp16_scales)
    codes = (w.detach().float() / expand_scales(scales, w.shape)).round().clamp(-1, 1)
    return codes.to(torch.int8), scales


def quantize_weight(w: torch.Tensor, group_size: int, fp16_scales: bool = True) -> torch.Tensor:
    """Fake-quantized weight codes·scale with a straight-through gradient to the latent weight."""
    scales = expand_scales(weight_scales(w, group_size, fp16_scales), w.shape).to(w.dtype)
    q = (w / scales).round().clamp(-1, 1) * scales
    return w + (q - w).detach()


def quantize_activation(x: torch.Tensor) -> torch.Tensor:
    """Per-token 8-bit absmax fake quantization with a straight-through gradient."""
    gamma = x.detach().abs().amax(dim=-1, keepdim=True).clamp_min(ACT_EPS)
    scale = 127.0 / gamma
    q = (x * scale).round().clamp(-128, 127) / scale
    return x + (q - x).detach()

"""Muon with the Newton–Schulz iterations of same-shape matrices batched into one matmul each.

torch.optim.Muon orthogonalizes one matrix at a time: for the tiny model that is 28 matrices x 3
iterations x 3 small matmuls per step, each paying the call and threading overhead of a tiny GEMM, so
the optimizer costs more than the forward pass on a 2-core CPU. Stacking the matrices of each shape and
running the same iteration with batched matmuls (bmm/baddbmm) does the same arithmetic per matrix in a
handful of calls. Everything else is torch.optim.Muon's: bf16 iterations, Frobenius normalization, tall
matrices transposed, `adjust_lr_fn`, decoupled weight decay, the `momentum_buffer` state (so checkpoints
are interchangeable), and the per-matrix results agree with it to bf16 rounding.

Under FSDP2 (`trainer=fsdp`) each matrix is a DTensor holding this rank's rows. Newton–Schulz needs the
whole matrix, so the update is gathered (one all-gather per matrix), orthogonalized identically on every
rank, and each rank keeps its own rows: the same arithmetic as one process, at the cost of every rank
orthogonalizing every matrix.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from nanoternary.model.sharding import laid_out_like, whole


def newton_schulz(
    stack: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float
) -> torch.Tensor:
    """Approximate orthogonalization of each (rows <= cols) matrix of a (k, rows, cols) stack, in bf16."""
    a, b, c = coefficients
    x = stack.bfloat16()
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, update, x, beta=a)
    return x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's learning-rate adjustment for a (rows, cols) matrix."""
    rows, cols = shape
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


class BatchedMuon(torch.optim.Muon):
    """Drop-in torch.optim.Muon (same arguments, validation and state) with a batched step."""

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch.optim signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                bufs.append(state["momentum_buffer"])
            momentum = group["momentum"]
            torch._foreach_lerp_(bufs, grads, 1 - momentum)
            updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
            lr = float(group["lr"])
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
            by_shape: dict[torch.Size, list[int]] = defaultdict(list)
            for i, p in enumerate(params):
                by_shape[p.shape].append(i)
            for shape, index in by_shape.items():
                tall = shape[0] > shape[1]
                stack = torch.stack([whole(updates[i]) for i in index])
                ortho = newton_schulz(
                    stack.mT if tall else stack, group["ns_coefficients"], group["ns_steps"], group["eps"]
                )
                # bf16 added to fp32 in place computes in fp32, as torch.optim.Muon's p.add_ does, without an
                # fp32 copy of the whole stack first
                ortho = ortho.mT.contiguous() if tall else ortho  # a strided add is ~3x slower
                torch._foreach_add_(
                    [params[i] for i in index],
                    [laid_out_like(params[i], o) for i, o in zip(index, ortho.unbind(0), strict=True)],
                    alpha=-adjusted_lr(lr, group["adjust_lr_fn"], shape),
                )
        return loss

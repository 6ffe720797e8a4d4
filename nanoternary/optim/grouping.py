"""Which optimizer owns which parameter: Muon for the 2-D projection weights, Lion for the rest."""

from __future__ import annotations

from torch import nn

from nanoternary.model.bitlinear import BitLinear


def split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(muon, lion): every trainable parameter exactly once.

    Muon orthogonalizes 2-D matrix updates, which suits the projection weights (BitLinear) only;
    embeddings (a lookup table), norms and mHC parameters (zero-init, gated) go to Lion.
    """
    muon_ids = {id(m.weight) for m in model.modules() if isinstance(m, BitLinear)}
    muon, lion, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (muon if id(p) in muon_ids else lion).append(p)
    return muon, lion

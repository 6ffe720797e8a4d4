"""mHC-lite residual connections (REFERENCE.md section 3; arXiv 2601.05732).

The residual state is n streams x of shape (batch, seq, n, C). Around every sub-layer F:

    h = H_pre · x                    read: (n) -> 1, H_pre = sigmoid(.)
    x' = H_res · x + H_post ⊗ F(h)   write: 1 -> (n), H_post = 2·sigmoid(.)

with H_res = Σ_k a_k P_k, a softmax-weighted mixture of all n! permutation matrices: exactly doubly
stochastic by construction, so the product over all layers is non-expansive. Each coefficient is a
static logit plus (mode `dynamic`) a gated, zero-initialised projection of RMSNorm(vec x). The first and
the last sub-layer have no H_res (see MHCLiteResidual: it would be provably inert there).

`mode: seed` reproduces the original system's 2-stream variant (REFERENCE.md section 1) including its
symmetric init, so that `seed_tiny` can be compared with the original run; its streams never diverge.

The coefficients and the stream mixing are computed in fp32 even under autocast: a bf16 mixture is not
doubly stochastic to 1e-6, and a bf16 residual stream would lose the small per-layer updates.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from nanoternary.model.config import ModelConfig
from nanoternary.model.residual import Branch

IDENTITY_LOGIT = 0.0
OFF_IDENTITY_LOGIT = -8.0  # H_res ≈ I at init: identity weight 1 / (1 + (n! - 1)·e^-8)
FAVOURED_LOGIT = 1.0  # H_pre / H_post logit of the stream a layer favours; the others get -1

Coefficients = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def permutation_table(n: int) -> torch.Tensor:
    """All n! permutation matrices, (n!, n, n), identity first: P_k[i, perm_k[i]] = 1."""
    perms = torch.tensor(list(itertools.permutations(range(n))), dtype=torch.long)
    table = torch.zeros(len(perms), n, n)
    table.scatter_(2, perms.unsqueeze(-1), 1.0)
    return table


def no_autocast(t: torch.Tensor) -> torch.autocast:
    return torch.autocast(t.device.type, enabled=False)


def combine_permutations(weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """H_res = Σ_k weights_k P_k: (..., n!) -> (..., n, n), in fp32 even under autocast."""
    n = table.shape[-1]
    with no_autocast(weights):
        return (weights.float() @ table.reshape(len(table), n * n)).unflatten(-1, (n, n))


# Under torch.compile the stream products are written as a broadcast multiply and a sum over the n
# streams, which inductor fuses with the element-wise work around them; as batched matmuls of n x n
# blocks per token they cost about twice as much there. Eager, einsum avoids the (..., n, n, C) temporary.
def read_streams(pre: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """H_pre · x: weights (..., n) and streams (..., n, C) -> (..., C)."""
    if torch.compiler.is_compiling():
        return (pre.unsqueeze(-1) * x).sum(-2)
    return torch.einsum("...j,...jc->...c", pre, x)


def mix_streams(h_res: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """H_res · x: (..., n, n) and streams (..., n, C) -> (..., n, C)."""
    if torch.compiler.is_compiling():
        return (h_res.unsqueeze(-1) * x.unsqueeze(-3)).sum(-2)
    return torch.einsum("...ij,...jc->...ic", h_res, x)


class StreamResidual(nn.Module):
    """Shared forward of the n-stream residuals; subclasses define the coefficients (pre, post, mixture)."""

    def __init__(self, n_streams: int) -> None:
        super().__init__()
        self.n_streams = n_streams
        self.register_buffer("perms", permutation_table(n_streams), persistent=False)

    def coefficients(self, x: torch.Tensor) -> Coefficients:
        """(H_pre, H_post, permutation weights or None) of fp32 streams x: shapes (n,), (n,), (n!,) when
        static, else (B, T, n), (B, T, n), (B, T, n!). None: this sub-layer does not mix its streams."""
        raise NotImplementedError

    def res_weights(self, x: torch.Tensor) -> torch.Tensor | None:
        with no_autocast(x):
            return self.coefficients(x.float())[2]

    def forward(self, x: torch.Tensor, branch: Branch) -> torch.Tensor:
        """x: (B, T, n, C) streams; branch(h) = sub-layer(pre-norm(h)) maps (B, T, C) -> (B, T, C)."""
        with no_autocast(x):
            x = x.float()
            pre, post, weights = self.coefficients(x)
            h = read_streams(pre, x)
        y = branch(h)
        with no_autocast(x):
            if weights is not None:
                x = mix_streams(combine_permutations(weights, self.perms), x)
            return x + post.unsqueeze(-1) * y.float().unsqueeze(-2)


class MHCLiteResidual(StreamResidual):
    """mHC-lite around one sub-layer: static logits (+ gated dynamic projection when `dynamic`).

    Init (reference code): the favoured stream i = layer mod n gets pre/post logit +1, the others -1;
    the identity permutation gets logit 0, the others -8. The attention and FFN sub-layers of one layer
    share i, so the FFN mostly reads the stream its attention just wrote, as in a plain block.
    `mix=False` leaves out H_res, which is provably inert around the first and the last sub-layer: the
    streams entering the first are n copies of the embedding, and a doubly stochastic matrix maps identical
    rows to themselves; the streams leaving the last are summed, and its columns sum to 1, so it preserves
    that sum. Its parameters there would never receive a gradient.
    """

    def __init__(
        self,
        n_streams: int,
        dim: int,
        favoured: int,
        dynamic: bool,
        gate_init: float,
        eps: float,
        mix: bool = True,
    ) -> None:
        super().__init__(n_streams)
        n = n_streams
        self.eps = eps
        self.n_perms = math.factorial(n) if mix else 0
        side = torch.full((n,), -FAVOURED_LOGIT)
        side[favoured] = FAVOURED_LOGIT
        self.pre_bias = nn.Parameter(side.clone())
        self.post_bias = nn.Parameter(side.clone())
        if mix:
            res = torch.full((self.n_perms,), OFF_IDENTITY_LOGIT)
            res[0] = IDENTITY_LOGIT
            self.res_bias = nn.Parameter(res)
        self.dynamic = dynamic
        if dynamic:
            self.proj = nn.Parameter(torch.zeros(2 * n + self.n_perms, n * dim))
            self.gates = nn.Parameter(torch.full((3 if mix else 2,), gate_init))

    def coefficients(self, x: torch.Tensor) -> Coefficients:
        n = self.n_streams
        pre, post = self.pre_bias, self.post_bias
        logits = self.res_bias if self.n_perms else None
        if self.dynamic:
            d = self.dynamic_logits(x)
            pre = self.gates[0] * d[..., :n] + pre
            post = self.gates[1] * d[..., n : 2 * n] + post
            if logits is not None:
                logits = self.gates[2] * d[..., 2 * n :] + logits
        weights = None if logits is None else torch.softmax(logits, dim=-1)
        return torch.sigmoid(pre), 2 * torch.sigmoid(post), weights

    def dynamic_logits(self, x: torch.Tensor) -> torch.Tensor:
        """RMSNorm(vec x)·projᵀ computed as ((vec x)·projᵀ)·rsqrt(mean((vec x)²) + eps): the same value
        without writing a normalized n·C copy of the streams and reading it back in the backward pass
        (the norm is one scalar per token, so it commutes with the projection)."""
        flat = x.flatten(-2)
        return F.linear(flat, self.proj) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + self.eps)


class SeedResidual(StreamResidual):
    """The original system's 2-stream residual, 9 parameters, H_res = [[a, 1-a], [1-a, a]].

    Kept with its symmetric init for parity: both streams start equal, every operation treats them alike,
    so they stay equal and alpha_logit gets exactly zero gradient (a plain residual with a gain).
    """

    def __init__(self) -> None:
        super().__init__(2)
        self.alpha_logit = nn.Parameter(torch.tensor([5.0]))
        self.pre_logits = nn.Parameter(torch.zeros(2))
        self.pre_bias = nn.Parameter(torch.full((2,), 0.5))
        self.post_logits = nn.Parameter(torch.zeros(2))
        self.post_bias = nn.Parameter(torch.full((2,), 0.5))

    def coefficients(self, x: torch.Tensor) -> Coefficients:
        # weights (a, 1 - a) of the 2 permutations (identity, swap), formed as the seed did so that alpha's
        # gradient sigmoid'(alpha)·(g_identity - g_swap) is exactly zero for identical streams
        a = torch.sigmoid(self.alpha_logit)
        pre = torch.sigmoid(self.pre_logits + self.pre_bias)
        post = 2 * torch.sigmoid(self.post_logits + self.post_bias)
        return pre, post, torch.cat([a, 1 - a])


class StreamIO(nn.Module):
    """Expand the embedding to n identical streams once; reduce them once before the final norm."""

    def __init__(self, n_streams: int, reduce_mean: bool = False) -> None:
        super().__init__()
        self.n_streams, self.reduce_mean = n_streams, reduce_mean

    # No stride-0 views either way: expand() here (forward) or sum() in reduce (its gradient is expanded)
    # would hand stride-0 tensors to the residuals' batched matmuls, which are then ~25x slower on CPU.
    def expand(self, h: torch.Tensor) -> torch.Tensor:
        return h.unsqueeze(-2).repeat_interleave(self.n_streams, dim=-2)

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        weights = x.new_full(
            (self.n_streams,), 1 / self.n_streams if self.reduce_mean else 1.0, dtype=torch.float32
        )
        with no_autocast(x):
            return torch.einsum("...nc,n->...c", x.float(), weights)

    def extra_repr(self) -> str:
        return f"n_streams={self.n_streams}, reduce={'mean' if self.reduce_mean else 'sum'}"


def make_mhc_residual(cfg: ModelConfig, sublayer_index: int) -> StreamResidual:
    """The residual around sub-layer `sublayer_index` (attention = 2·layer, FFN = 2·layer + 1)."""
    m = cfg.mhc
    if m.mode == "seed":
        return SeedResidual()
    favoured = (sublayer_index // 2) % m.n_streams
    return MHCLiteResidual(
        m.n_streams,
        cfg.dim,
        favoured,
        m.mode == "dynamic",
        m.gate_init,
        cfg.norm_eps,
        mix=0 < sublayer_index < 2 * cfg.n_layers - 1,
    )


def make_stream_io(cfg: ModelConfig) -> StreamIO:
    """mHC-lite sums the streams (reference code); the seed variant averages them."""
    return StreamIO(cfg.mhc.n_streams, reduce_mean=cfg.mhc.mode == "seed")


class MHCProbe:
    """Validation statistics of the n-stream residuals, gathered by forward hooks during normal forwards.

    Wrap forward passes in `with probe:`; `summary()` returns (empty for a plain residual model)
    `mhc/res_identity_weight`: mean mixture weight on the identity permutation, over tokens and sub-layers;
    `mhc/composite_gain`: max over tokens of the largest row/column abs sum of the product of all H_res
    (exactly 1 for doubly stochastic matrices, up to rounding);
    `mhc/stream_distance`: mean pairwise L2 distance between the streams leaving the last block, divided
    by their mean L2 norm (0 = identical streams, the seed variant's failure).
    """

    def __init__(self, model: nn.Module) -> None:
        self.residuals = [m for m in model.modules() if isinstance(m, StreamResidual)]
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.identity_sum = self.identity_count = 0.0
        self.gain = 0.0
        self.pair_distance_sum = self.pair_count = self.norm_sum = self.norm_count = 0.0
        self._product: torch.Tensor | None = None

    def __enter__(self) -> MHCProbe:
        self.handles = [m.register_forward_hook(self._hook) for m in self.residuals]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    @torch.no_grad()
    def _hook(self, module: StreamResidual, args: tuple[torch.Tensor, Branch], out: torch.Tensor) -> None:
        x = args[0]
        if module is self.residuals[0]:
            self._product = None
        weights = module.res_weights(x)
        if weights is not None:
            weights = weights.expand(*x.shape[:-2], weights.shape[-1])
            self.identity_sum += float(weights[..., 0].sum())
            self.identity_count += weights[..., 0].numel()
            h_res = combine_permutations(weights, module.perms)
            with no_autocast(x):
                self._product = h_res if self._product is None else h_res @ self._product
        if module is self.residuals[-1]:
            self._last_block(out.float())

    def _last_block(self, streams: torch.Tensor) -> None:
        if self._product is not None:
            abs_product = self._product.abs()
            rows, cols = abs_product.sum(-1).amax(), abs_product.sum(-2).amax()
            self.gain = max(self.gain, float(torch.maximum(rows, cols)))
        n = streams.shape[-2]
        for i, j in itertools.combinations(range(n), 2):
            self.pair_distance_sum += float((streams[..., i, :] - streams[..., j, :]).norm(dim=-1).sum())
            self.pair_count += streams[..., 0, 0].numel()
        self.norm_sum += float(streams.norm(dim=-1).sum())
        self.norm_count += streams[..., 0].numel()

    def summary(self) -> dict[str, float]:
        if not self.norm_count:
            return {}
        out = {
            "mhc/composite_gain": self.gain if self._product is not None else 1.0,
            "mhc/stream_distance": (self.pair_distance_sum / self.pair_count)
            / (self.norm_sum / self.norm_count),
        }
        if self.identity_count:
            out["mhc/res_identity_weight"] = self.identity_sum / self.identity_count
        return out

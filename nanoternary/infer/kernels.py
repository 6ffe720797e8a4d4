"""Inference linears: ternary weights held as packed 2-bit codes + scales, multiplied by 8-bit activations.

BitNet's forward is y = (q · γ/127) @ (codes · s)ᵀ with q = round(127·x/γ) per token. Because q and the
codes are small integers, q @ codesᵀ is an exact integer sum, and the scales can be applied afterwards.
Each linear also owns the RMSNorm that precedes it in the block (pre-norms and sub-norms), so the fast
backend can fuse the two. Three backends compute it:

- `cpp` (CPU): one fused C++ call per linear (csrc/ternary.cpp: norm, 8-bit activations, u8 x s8 dot
  products with AVX512-VNNI where the CPU has it). Compiled with the machine's C++ compiler on first use
  (~40 s on 2 idle cores, once per source version: see `native_ops`). A small model's decode step is
  dominated by per-op overhead, and this replaces ~12 PyTorch ops per linear with one.
- `int8` (CPU): the same arithmetic with PyTorch ops and `torch._int_mm` (int32 accumulation).
- `fp32` (any device): float32 matmul of the dequantized activations with codes · s folded into one dense
  weight: the training forward pass's own arithmetic (the reference path for exactness tests).

`cpp` and `int8` need one scale per tensor or per row; grouped scales run on `fp32`. Codes are kept
packed 4 per byte (`packed`, the model's storage); each backend derives its compute weight once.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import math
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from nanoternary.io.tensors import TernaryTensor
from nanoternary.model.quant import ACT_EPS

BACKENDS = ("cpp", "int8", "fp32")
CSRC = Path(__file__).with_name("csrc") / "ternary.cpp"
CFLAGS = ["-O3", "-march=native"]
log = logging.getLogger(__name__)


def build_directory() -> Path:
    """A folder per source version, torch version and CPU flags, under torch's own extensions root."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    key = hashlib.sha256(CSRC.read_bytes() + torch.__version__.encode() + " ".join(CFLAGS).encode())
    return root / f"nanoternary_ternary_{key.hexdigest()[:16]}"


@functools.cache
def native_ops() -> ModuleType | None:
    """The compiled csrc/ternary.cpp, or None (with a warning) when it cannot be built here.

    Why a lock of our own: torch's build lock is a plain file, which a process killed mid-build (a server
    stopped during its first start) leaves behind, and every later build then waits on it forever. An
    flock dies with its holder, and whoever holds it may clear torch's stale file.
    """
    from torch.utils.cpp_extension import load

    if shutil.which("ninja") is None:  # the `ninja` wheel of this environment, when its bin/ is not on PATH
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    build_dir = build_directory()
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        with open(build_dir / "nanoternary.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            (build_dir / "lock").unlink(missing_ok=True)
            return load(
                "nanoternary_ternary", [str(CSRC)], extra_cflags=CFLAGS, build_directory=str(build_dir)
            )
    except Exception as exc:  # no compiler, no ninja, unsupported flags...: the PyTorch path still works
        log.warning("the fused C++ kernel could not be built (%s); using backend int8", exc)
        return None


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in {-1, 0, 1}, (out, in) -> uint8 (out, ceil(in / 4)): code + 1 in 2 bits, low bits first."""
    out, inp = codes.shape
    padded = F.pad(codes.to(torch.uint8) + 1, (0, -inp % 4), value=1).reshape(out, -1, 4)
    return padded[..., 0] | padded[..., 1] << 2 | padded[..., 2] << 4 | padded[..., 3] << 6


def unpack_codes(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of `pack_codes`."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts & 3).reshape(packed.shape[0], -1)[:, :in_features]
    return codes.to(torch.int8) - 1


def head_tiles(embedding: torch.Tensor, dtype: torch.dtype = torch.float16, tile: int = 64) -> torch.Tensor:
    """A tied embedding (vocab, dim) as the cpp LM head kernel reads it: (tiles, dim, tile) in `dtype`
    (float16 or float32), each tile of `tile` vocab entries one contiguous block (zero-padded to whole
    tiles; see csrc/ternary.cpp)."""
    vocab, dim = embedding.shape
    padded = embedding.new_zeros(-(-vocab // tile) * tile, dim, dtype=dtype)
    padded[:vocab] = embedding
    return padded.view(-1, tile, dim).transpose(1, 2).contiguous()


def quantize_tokens(x: torch.Tensor, block: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax 8-bit: (q as float integers in [-127, 127], 127/γ), the same arithmetic as training.
    `block` > 0 takes γ per block of that many values instead (q shaped (..., blocks, block)): llama.cpp's
    Q8_K activations for TQ weights use 256-value blocks."""
    if block:
        x = x.unflatten(-1, (-1, block))
    inv = 127.0 / torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True).clamp_min_(ACT_EPS)
    return (x * inv).round_(), inv  # |x| <= γ, so q stays in [-127, 127]: training's clamp never bites


class FusedNorm(nn.Module):
    """The optional RMSNorm in front of a linear (weight None: no norm, e.g. without sub-norms)."""

    def __init__(self, norm: nn.Module | None) -> None:
        super().__init__()
        weight = getattr(norm, "weight", None)
        self.eps = float(getattr(norm, "eps", 0.0))
        self.register_buffer("norm_weight", None if weight is None else weight.detach().float().clone())

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_weight is None:
            return x
        return F.rms_norm(x, (x.shape[-1],), self.norm_weight, self.eps)


class TernaryLinear(FusedNorm):
    """A quantized BitLinear for inference: out = quant8(norm(x)) @ (codes · scales)ᵀ, no bias, no autograd."""

    def __init__(
        self, weight: TernaryTensor, backend: str = "cpp", act_block: int = 0, norm: nn.Module | None = None
    ) -> None:
        super().__init__(norm)
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        self.out_features, self.in_features = weight.codes.shape
        self.act_block = act_block  # > 0: llama.cpp's block-wise activation scales (fp32 backend only)
        self.register_buffer("packed", pack_codes(weight.codes))
        self.register_buffer("scales", weight.scales.float().clone())
        groups = weight.scales.shape[1]
        if backend == "cpp" and native_ops() is None:
            backend = "int8"
        # fp32 for llama.cpp's block-wise activations, and for group scales where int8 would need them
        self.backend = "fp32" if act_block or (groups > 1 and backend == "int8") else backend
        scales = weight.scales.float().expand(self.out_features, groups)  # cpp/int8: per row (and group)
        if self.backend == "cpp":
            codes = weight.codes.contiguous()
            self.register_buffer("weight", codes, persistent=False)  # (out, in) int8
            sums = codes.view(self.out_features, groups, -1).sum(dim=-1, dtype=torch.int32)
            self.register_buffer("code_sums", sums.contiguous(), persistent=False)  # (out, groups)
            self.register_buffer("out_scale", scales.contiguous(), persistent=False)
        elif self.backend == "int8":
            self.register_buffer("weight", weight.codes.t().contiguous(), persistent=False)  # (in, out) int8
            self.register_buffer("out_scale", scales.reshape(1, -1), persistent=False)
        else:
            self.register_buffer("weight", weight.dense(), persistent=False)  # (out, in) float32

    @classmethod
    def fuse(
        cls,
        weights: list[TernaryTensor],
        backend: str = "cpp",
        act_block: int = 0,
        norm: nn.Module | None = None,
    ) -> TernaryLinear:
        """One linear for several that read the same input (q/k/v, gate/up): their outputs, concatenated."""
        if len(weights) == 1:
            return cls(weights[0], backend, act_block, norm)

        def per_row(t: TernaryTensor) -> torch.Tensor:
            return (
                t.scales.expand(t.codes.shape[0], t.scales.shape[1]) if t.scales.shape[0] == 1 else t.scales
            )

        groups = {t.scales.shape[1] for t in weights}
        if len(groups) != 1:
            raise ValueError(f"cannot fuse linears with different scale groupings {sorted(groups)}")
        codes = torch.cat([t.codes for t in weights])
        return cls(TernaryTensor(codes, torch.cat([per_row(t) for t in weights])), backend, act_block, norm)

    def codes(self) -> torch.Tensor:
        return unpack_codes(self.packed, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "cpp":
            flat = x.reshape(-1, self.in_features).float().contiguous()
            empty = self.norm_weight if self.norm_weight is not None else flat.new_empty(0)
            out = native_ops().ternary_linear(
                flat, self.weight, self.code_sums, self.out_scale, empty, self.eps, ACT_EPS
            )
            return out.view(*x.shape[:-1], self.out_features)
        q, inv = quantize_tokens(self.norm(x.float()), self.act_block)
        if self.backend == "int8":
            acc = torch._int_mm(q.view(-1, self.in_features).to(torch.int8), self.weight)
            return (acc.view(*q.shape[:-1], self.out_features) * self.out_scale).div_(inv)
        x = q.div_(inv)  # dequantize first: the training forward's exact arithmetic
        return F.linear(x.flatten(-2) if self.act_block else x, self.weight)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, backend={self.backend}, "
            f"scales={tuple(self.scales.shape)}, norm={self.norm_weight is not None}"
        )


class DenseLinear(FusedNorm):
    """A full-precision linear (models trained with quantize=false), fusable like TernaryLinear."""

    def __init__(self, weight: torch.Tensor, norm: nn.Module | None = None) -> None:
        super().__init__(norm)
        self.register_buffer("weight", weight.float().contiguous())

    @classmethod
    def fuse(cls, weights: list[torch.Tensor], norm: nn.Module | None = None) -> DenseLinear:
        return cls(torch.cat(weights), norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(x), self.weight)


def fp16_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """scaled_dot_product_attention with llama.cpp's CPU numerics: q, k, v (its fp16 KV cache) and the
    softmax probabilities rounded to fp16, products accumulated in fp32."""
    if enable_gqa:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    scores = (q.half().float() @ k.half().float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if is_causal:
        n_q, n_k = scores.shape[-2:]
        attn_mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(diagonal=n_k - n_q)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return torch.softmax(scores, dim=-1).half().float() @ v.half().float()

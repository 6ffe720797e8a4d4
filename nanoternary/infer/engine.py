"""The inference engine: KV-cached, batched decoding of a trained model from an export folder or a GGUF.

One `step` runs one forward pass over any mix of sequences: new prompts are prefilled and running
sequences decode one position, all in the same packed batch (tokens of every sequence side by side, so
nothing is padded); only attention, the one operation that mixes positions, runs per sequence against
that sequence's own KV cache. This is the primitive a continuous-batching server builds on:

    engine = Engine.from_path("outputs/.../export/final")      # or model.gguf (arch nanoternary or bitnet)
    seq = engine.start(engine.tokenizer.encode("def fib(n):"))
    logits = engine.step([seq])                                # (1, vocab) float32: prefill
    engine.append(seq, int(logits[0].argmax()))                # consumed by the next step

`generate` and `stream` are the batteries-included loops on top. The engine is not thread-safe: drive it
from one thread. It never imports Lightning and never reads a .ckpt.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nanoternary.data.tokenizer import TextTokenizer
from nanoternary.infer.kernels import (
    BACKENDS,
    DenseLinear,
    TernaryLinear,
    fp16_attention,
    head_tiles,
    native_ops,
)
from nanoternary.infer.sampling import SamplingParams, find_stop, make_generator, partial_stop_len, sample
from nanoternary.io.gguf import read_gguf
from nanoternary.io.tensors import ModelTensors, display_name
from nanoternary.model.mhc import MHCLiteResidual
from nanoternary.model.quant import ACT_EPS
from nanoternary.model.residual import PlainResidual
from nanoternary.model.transformer import TernaryLM

NUMERICS = ("native", "llama")
LLAMA_ACT_BLOCK = 256  # llama.cpp quantizes activations for TQ1_0/TQ2_0 weights per Q8_K block of 256
PROJECTIONS = {
    "qkv": ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
    "o": ("attn.o_proj",),
    "gate_up": ("ffn.gate_proj", "ffn.up_proj"),
    "down": ("ffn.down_proj",),
}


def load_tensors(path: str | Path) -> ModelTensors:
    """Weights from an export folder (model.safetensors + meta.json + tokenizer.json) or a .gguf file."""
    path = Path(path)
    if path.is_dir():
        return ModelTensors.from_folder(path)
    if path.suffix == ".gguf":
        return read_gguf(path)
    raise ValueError(f"model must be an export folder (with meta.json) or a .gguf file, got {path}")


@dataclass
class Sequence:
    """One sequence's tokens and KV cache. `ids[cached:]` are fed at the next `Engine.step`."""

    ids: list[int]
    cached: int = 0
    keys: torch.Tensor | None = field(default=None, repr=False)  # (layers, kv_heads, capacity, head_dim)
    values: torch.Tensor | None = field(default=None, repr=False)
    layer_keys: tuple[torch.Tensor, ...] = field(default=(), repr=False)  # keys[layer] views, made once
    layer_values: tuple[torch.Tensor, ...] = field(default=(), repr=False)

    @property
    def prefilled(self) -> bool:
        return self.cached > 0


@dataclass
class Completion:
    """One finished generation. finish_reason: "stop" (end-of-text or a stop string) or "length"."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int]


class Projections(nn.Module):
    """The four (fused) linears of one block, each with the RMSNorm in front of it: attn_norm -> q|k|v,
    attn sub-norm -> o, ffn_norm -> gate|up, ffn sub-norm -> down."""

    def __init__(
        self, index: int, block: nn.Module, tensors: ModelTensors, backend: str, act_block: int
    ) -> None:
        super().__init__()
        norms = {
            "qkv": block.attn_norm,
            "o": block.attn.sub_norm,
            "gate_up": block.ffn_norm,
            "down": block.ffn.sub_norm,
        }
        for name, parts in PROJECTIONS.items():
            keys = [f"blocks.{index}.{p}.weight" for p in parts]
            if all(k in tensors.ternary for k in keys):
                linear: nn.Module = TernaryLinear.fuse(
                    [tensors.ternary[k] for k in keys], backend, act_block, norms[name]
                )
            else:
                linear = DenseLinear.fuse([tensors.dense[k] for k in keys], norms[name])
            setattr(self, name, linear)


class Engine:
    """Prefill + incremental decode with per-sequence KV caches, batched across sequences.

    Attributes: tokenizer, eot_id, context_length, num_parameters, name, cfg (ModelConfig), meta (training
    facts), device, backend ("cpp", "int8" or "fp32": see `nanoternary.infer.kernels`; auto = cpp on the
    CPU when its C++ kernel builds, else int8; fp32 on other devices). The cpp backend keeps its KV cache
    in fp16, the others in float32.

    numerics="llama" reproduces llama.cpp's CPU arithmetic instead of the training forward's (activation
    scales per 256-value block, fp16 KV cache and attention probabilities, fp16 input to the LM head), to
    check a bitnet GGUF against llama.cpp value for value; it is slower and not meant for serving.
    """

    def __init__(
        self,
        tensors: ModelTensors,
        device: str = "cpu",
        backend: str = "auto",
        name: str = "nanoternary",
        numerics: str = "native",
    ):
        if numerics not in NUMERICS:
            raise ValueError(f"unknown numerics {numerics!r}; expected one of {NUMERICS}")
        cfg = tensors.cfg
        self.cfg, self.device, self.name, self.numerics = cfg, torch.device(device), name, numerics
        if backend == "auto":
            backend = "fp32" if self.device.type != "cpu" else "cpp"
        if backend == "cpp" and self.device.type == "cpu" and native_ops() is None:
            backend = "int8"  # no C++ compiler here: the PyTorch int8 path, as TernaryLinear falls back too
        self.backend = "fp32" if numerics == "llama" else backend
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected auto or one of {BACKENDS}")
        if self.backend != "fp32" and self.device.type != "cpu":
            raise ValueError(f"backend {self.backend} runs on the CPU; use backend=fp32 on {self.device}")
        self.attention = fp16_attention if numerics == "llama" else F.scaled_dot_product_attention
        self.tokenizer: TextTokenizer = tensors.tokenizer
        self.eot_id = self.tokenizer.eot_id
        self.context_length = cfg.context_length
        self.meta: dict[str, Any] = tensors.meta
        model = TernaryLM(cfg)
        self.num_parameters = model.num_parameters()
        result = model.load_state_dict(tensors.dense, strict=False)
        missing = sorted(set(result.missing_keys) - set(tensors.ternary))
        if missing or result.unexpected_keys:
            raise ValueError(
                f"weights do not fit the model config: missing {missing[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )
        for block in model.blocks:  # their weights now live in the fused Projections
            for parts in PROJECTIONS.values():
                for part in parts:
                    owner, attr = part.split(".")
                    setattr(getattr(block, owner), attr, nn.Identity())
        self.model = model.requires_grad_(False).to(self.device).eval()
        act_block = LLAMA_ACT_BLOCK if numerics == "llama" else 0
        self.proj = nn.ModuleList(
            Projections(i, b, tensors, self.backend, act_block) for i, b in enumerate(model.blocks)
        )
        self.proj.to(self.device)
        # fp16 where the cpp decode kernel reads the cache (reading it is that kernel's cost; see
        # csrc/ternary.cpp) and in llama numerics; the fp32 backend keeps the training forward's float32
        self.kv_dtype = torch.float16 if numerics == "llama" or self.backend == "cpp" else torch.float32
        half = cfg.head_dim // 2  # rotate-half as x·cos + roll(x)·sin' with sin' = [-sin, sin]
        self.rope_cos = model.rope_cos
        self.rope_sin = torch.cat([-model.rope_sin[:, :half], model.rope_sin[:, half:]], dim=-1)
        # LM head: the fp32 backend keeps the training forward's F.linear (bit-identical logits). cpp reads
        # the tied embedding as tiles (kernels.head_tiles), fp16 when that is exact (F16 GGUF embeddings),
        # else float32; int8 as (dim, vocab), whose matrix-vector product beats F.linear's on CPU.
        w = model.embed.weight
        self.head_tiles = self.head = None
        if self.backend == "cpp":
            exact_f16 = torch.equal(w.half().float(), w)
            self.head_tiles = head_tiles(w, torch.float16 if exact_f16 else torch.float32)
        elif self.backend == "int8":
            self.head = w.t().contiguous()
        self.decoder = self._native_decoder()

    def _native_decoder(self) -> Any:
        """The cpp backend's whole decode step in one C++ call (csrc/ternary.cpp, DecodeModel), for models
        whose four linears all run on the cpp kernel and whose residuals are plain or mHC-lite; None for
        any other model (the seed's residual), which decodes through `_forward`."""
        model, n = self.model, self.cfg.mhc.n_streams
        linears = [getattr(p, name) for p in self.proj for name in PROJECTIONS]
        residuals = [r for b in model.blocks for r in (b.attn_residual, b.ffn_residual)]
        if (
            self.backend != "cpp"
            or not all(isinstance(t, TernaryLinear) and t.backend == "cpp" for t in linears)
            or not all(isinstance(r, PlainResidual if n == 1 else MHCLiteResidual) for r in residuals)
            or getattr(model.streams, "reduce_mean", False)
        ):
            return None
        empty = torch.empty(0)

        def linear_parts(t: TernaryLinear) -> list[torch.Tensor]:
            norm = t.norm_weight if t.norm_weight is not None else empty
            return [t.weight, t.code_sums, t.out_scale, norm]

        def residual_parts(r: MHCLiteResidual) -> list[torch.Tensor]:
            dynamic = [r.proj, r.gates] if r.dynamic else [empty, empty]
            mix = r.res_bias if r.n_perms else empty
            return [r.pre_bias, r.post_bias, mix, *dynamic, r.perms.flatten(1)]

        blocks = list(model.blocks)
        return native_ops().DecodeModel(
            model.embed.weight,
            [[x for name in PROJECTIONS for x in linear_parts(getattr(p, name))] for p in self.proj],
            [[getattr(p, name).eps for name in PROJECTIONS] for p in self.proj],
            [
                [] if n == 1 else [*residual_parts(b.attn_residual), *residual_parts(b.ffn_residual)]
                for b in blocks
            ],
            [[] if n == 1 else [b.attn_residual.eps, b.ffn_residual.eps] for b in blocks],
            n,
            model.norm.weight,
            model.norm.eps,
            self.head_tiles,
            model.rope_cos,
            model.rope_sin,
            self.cfg.n_heads,
            self.cfg.n_kv_heads,
            self.cfg.ffn_dim,
            ACT_EPS,
        )

    @classmethod
    def from_path(
        cls, path: str | Path, device: str = "cpu", backend: str = "auto", numerics: str = "native"
    ) -> Engine:
        """Load an export folder or a .gguf (arch nanoternary or bitnet)."""
        path = Path(path)
        return cls(
            load_tensors(path), device=device, backend=backend, name=display_name(path), numerics=numerics
        )

    # ---- the batching primitive --------------------------------------------------------------------
    def start(self, prompt_ids: list[int]) -> Sequence:
        """A new sequence holding `prompt_ids`, not yet prefilled (the next `step` does it)."""
        ids = [int(i) for i in prompt_ids]
        if not ids:
            raise ValueError("prompt has no tokens")
        if len(ids) > self.context_length:
            raise ValueError(f"prompt of {len(ids)} tokens exceeds the context length {self.context_length}")
        bad = [i for i in ids if not 0 <= i < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.cfg.vocab_size}): {bad[:5]}")
        return Sequence(ids)

    def append(self, seq: Sequence, token: int) -> None:
        """Add a sampled token to `seq`; the next `step` feeds it."""
        if len(seq.ids) >= self.context_length:
            raise ValueError(f"sequence is full: context length {self.context_length}")
        seq.ids.append(int(token))

    @torch.inference_mode()
    def step(self, seqs: list[Sequence]) -> torch.Tensor:
        """ONE forward pass over all `seqs`: each feeds its pending tokens (the whole prompt when not yet
        prefilled, else the token given to `append`). Returns next-token logits (len(seqs), vocab) float32
        on the CPU, row i for seqs[i]. With the native decoder, the sequences that feed one token take
        its one-call step and the others (prefills) the PyTorch forward: two passes, the same rows."""
        if len({id(s) for s in seqs}) != len(seqs):
            raise ValueError("a sequence appears twice in one step")
        spans = []
        for seq in seqs:
            n = len(seq.ids) - seq.cached
            if n <= 0:
                raise ValueError("sequence has no new token: call append() before the next step")
            self._reserve(seq, len(seq.ids))
            spans.append(n)

        def forward(rows: list[int]) -> torch.Tensor:
            part = [seqs[i] for i in rows]
            ids = torch.tensor([t for s in part for t in s.ids[s.cached :]], device=self.device)
            pos = torch.tensor([p for s in part for p in range(s.cached, len(s.ids))], device=self.device)
            return self._forward(ids, pos, part, [spans[i] for i in rows], every_position=False).float().cpu()

        if self.decoder is not None and 1 in spans and max(spans) > 1:
            logits = torch.empty(len(seqs), self.cfg.vocab_size)
            for rows in (
                [i for i, n in enumerate(spans) if n == 1],
                [i for i, n in enumerate(spans) if n > 1],
            ):
                logits[rows] = forward(rows)
        else:
            logits = forward(list(range(len(seqs))))
        for seq in seqs:
            seq.cached = len(seq.ids)
        return logits

    @torch.inference_mode()
    def score(self, ids: list[int]) -> torch.Tensor:
        """Logits at every position of `ids` (len(ids), vocab), float32 on the CPU: one prefill of a fresh
        sequence, computed like the training model's forward (for evaluation and exactness checks)."""
        seq = self.start(ids)
        self._reserve(seq, len(ids))
        pos = torch.arange(len(ids), device=self.device)
        return (
            self._forward(torch.tensor(seq.ids, device=self.device), pos, [seq], [len(ids)], True)
            .float()
            .cpu()
        )

    def _reserve(self, seq: Sequence, length: int) -> None:
        """Grow the KV cache (doubling, up to the context length) so it holds `length` positions."""
        capacity = 0 if seq.keys is None else seq.keys.shape[2]
        if length <= capacity:
            return
        cfg = self.cfg
        new = min(self.context_length, max(length, 2 * capacity, 64))
        shape = (cfg.n_layers, cfg.n_kv_heads, new, cfg.head_dim)
        keys = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        values = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        if capacity:
            keys[:, :, :capacity] = seq.keys
            values[:, :, :capacity] = seq.values
        seq.keys, seq.values = keys, values
        seq.layer_keys, seq.layer_values = keys.unbind(0), values.unbind(0)

    def _forward(
        self,
        ids: torch.Tensor,
        pos: torch.Tensor,
        seqs: list[Sequence],
        spans: list[int],
        every_position: bool,
    ) -> torch.Tensor:
        """Modules are called through .forward (no hooks are used): the decode step of a small model is
        dominated by per-call overhead, not arithmetic."""
        if self.decoder is not None and len(spans) == len(ids):  # every sequence decodes one position
            return self.decoder.step(
                ids, [s.keys for s in seqs], [s.values for s in seqs], [s.cached for s in seqs]
            )
        model = self.model
        cos = sin = None  # the cpp decode kernel applies RoPE itself
        if not (self.backend == "cpp" and len(spans) == len(ids)):
            cos, sin = self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1)  # (T, 1, head_dim)
        x = model.streams.expand(model.embed.forward(ids).unsqueeze(0))
        for layer, (block, proj) in enumerate(zip(model.blocks, self.proj, strict=True)):
            x = block.attn_residual.forward(
                x, lambda h, p=proj, i=layer: p.o.forward(self._attend(i, p, h, cos, sin, seqs, spans))
            )
            x = block.ffn_residual.forward(x, lambda h, p=proj: self._ffn(p, h))
        if not every_position and len(spans) != len(ids):  # some sequence fed several tokens
            x = x[:, torch.tensor(spans, device=self.device).cumsum(0) - 1]
        h = model.norm.forward(model.streams.reduce(x))[0]
        if self.numerics == "llama":
            h = h.half().float()
        if self.head_tiles is not None:
            return native_ops().head_tiled(h.contiguous(), self.head_tiles, self.cfg.vocab_size)
        return h @ self.head if self.head is not None else F.linear(h, model.embed.weight)

    def _ffn(self, proj: Projections, h: torch.Tensor) -> torch.Tensor:
        gate_up, width = proj.gate_up.forward(h), self.cfg.ffn_dim
        return proj.down.forward(F.silu(gate_up[..., :width]).mul_(gate_up[..., width:]))

    def _attend(
        self,
        layer: int,
        proj: Projections,
        h: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        seqs: list[Sequence],
        spans: list[int],
    ) -> torch.Tensor:
        """Causal attention of each sequence's new tokens over its cache: (1, T, dim) -> (1, T, dim)."""
        cfg = self.cfg
        hq, hkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qkv = proj.qkv.forward(h[0]).view(-1, hq + 2 * hkv, d)
        if self.backend == "cpp" and len(spans) == qkv.shape[0]:  # every sequence decodes one position
            y = native_ops().decode_attention(
                qkv,
                self.model.rope_cos,
                self.model.rope_sin,
                [s.layer_keys[layer] for s in seqs],
                [s.layer_values[layer] for s in seqs],
                [s.cached for s in seqs],
                hq,
                hkv,
                1.0 / math.sqrt(d),
            )
            return y.view(1, -1, hq * d)
        qk = qkv[:, : hq + hkv]
        qk = qk * cos + qk.roll(d // 2, dims=-1) * sin  # rotate-half RoPE with the sign folded into sin
        q, k, v = qk[:, :hq], qk[:, hq:], qkv[:, hq + hkv :]
        out, start = [], 0
        for seq, n in zip(seqs, spans, strict=True):
            p0, end = seq.cached, seq.cached + n
            seq.keys[layer, :, p0:end] = k[start : start + n].transpose(0, 1)
            seq.values[layer, :, p0:end] = v[start : start + n].transpose(0, 1)
            mask = None
            if n > 1 and p0 > 0:  # new tokens after cached ones: token j sees positions <= p0 + j
                mask = torch.ones(n, end, dtype=torch.bool, device=self.device).tril(diagonal=p0)
            y = self.attention(
                q[start : start + n].transpose(0, 1).unsqueeze(0),
                seq.keys[layer, :, :end].unsqueeze(0).to(q.dtype),
                seq.values[layer, :, :end].unsqueeze(0).to(q.dtype),
                attn_mask=mask,
                is_causal=n > 1 and p0 == 0,
                enable_gqa=hq != hkv,
            )
            out.append(y[0].transpose(0, 1).reshape(n, hq * d))
            start += n
        return (torch.cat(out) if len(out) > 1 else out[0]).unsqueeze(0)

    # ---- generation loops --------------------------------------------------------------------------
    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a prompt; an empty prompt starts from end-of-text (the document separator)."""
        return self.tokenizer.encode(prompt) or [self.eot_id]

    def generate(
        self,
        prompts: list[str],
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop: list[str] | None = None,
        seed: int | None = None,
        keep_last: int | None = None,
    ) -> list[Completion]:
        """Complete every prompt (batched: one `step` per position for all unfinished prompts). With a
        seed, prompt i samples with seed + i: repeated prompts give different, reproducible samples.
        `keep_last` cuts each prompt to its last that many tokens (evaluating a short-context model on
        longer prompts, as lm-evaluation-harness does); without it a too-long prompt is an error."""
        params = SamplingParams(max_tokens, temperature, top_p, top_k, stop or [], seed)
        gens = [
            Generation(
                self,
                self.encode_prompt(p)[-keep_last:] if keep_last else self.encode_prompt(p),
                replace(params, seed=None if seed is None else seed + i),
            )
            for i, p in enumerate(prompts)
        ]
        active = [g for g in gens if not g.done]
        while active:
            logits = self.step([g.seq for g in active])
            for g, row in zip(active, logits, strict=True):
                g.feed(row)
            active = [g for g in active if not g.done]
        return [g.completion() for g in gens]

    def stream(
        self,
        prompt: str,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop: list[str] | None = None,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Yield the completion of one prompt as text deltas: never a split UTF-8 character, never any
        part of a stop string."""
        gen = Generation(
            self,
            self.encode_prompt(prompt),
            SamplingParams(max_tokens, temperature, top_p, top_k, stop or [], seed),
        )
        while not gen.done:
            delta = gen.feed(self.step([gen.seq])[0])
            if delta:
                yield delta


class Generation:
    """One request's decoding state on top of a Sequence: sampling with its own seeded generator,
    end-of-text, stop strings (also across token boundaries), max_tokens, the context limit, and text
    deltas that are safe to send (complete UTF-8 characters; a tail that may start a stop string is held
    back until it is decided). A server drives many of these with `Engine.step` over their `seq`s."""

    def __init__(self, engine: Engine, prompt_ids: list[int], params: SamplingParams) -> None:
        self.engine, self.params = engine, params
        self.seq = engine.start(prompt_ids)
        self.prompt_tokens = len(prompt_ids)
        self.generator = make_generator(params.seed)
        self.token_ids: list[int] = []
        self.text = ""  # decoded, final text (complete characters, cut at a stop string)
        self._decoded = 0  # tokens already decoded into self.text
        self._sent = 0  # characters of self.text already returned by feed()
        self.finish_reason: str | None = "length" if params.max_tokens == 0 else None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def feed(self, logits: torch.Tensor) -> str:
        """Sample from this sequence's next-token logits, update the state, return the new safe text."""
        if self.done:
            raise ValueError("generation already finished")
        token = sample(logits, self.params, self.generator)
        if token == self.engine.eot_id:
            self.finish_reason = "stop"
        else:
            self.token_ids.append(token)
            self._decode()
            if self.finish_reason is None and len(self.token_ids) >= self.params.max_tokens:
                self.finish_reason = "length"
            if self.finish_reason is None and len(self.seq.ids) >= self.engine.context_length:
                self.finish_reason = "length"
            if self.finish_reason is None:
                self.engine.append(self.seq, token)
        if self.done:
            self._decode(final=True)
            end = len(self.text)
        else:
            end = len(self.text) - partial_stop_len(self.text, self.params.stop)
        delta, self._sent = self.text[self._sent : end], max(self._sent, end)
        return delta

    def _decode(self, final: bool = False) -> None:
        """Move newly complete characters into self.text, cutting it at the earliest stop string."""
        if self._decoded == len(self.token_ids):
            return
        piece = self.engine.tokenizer.decode(self.token_ids[self._decoded :])
        if piece.endswith("\ufffd") and not final:
            return  # an incomplete UTF-8 sequence: wait for the token that completes it
        search_from = max(0, len(self.text) - max((len(s) for s in self.params.stop), default=0) + 1)
        self.text += piece
        self._decoded = len(self.token_ids)
        cut = find_stop(self.text, self.params.stop, search_from)
        if cut is not None:
            self.text = self.text[:cut]
            self.finish_reason = "stop"

    def completion(self) -> Completion:
        return Completion(
            self.text,
            self.finish_reason or "length",
            self.prompt_tokens,
            len(self.token_ids),
            list(self.token_ids),
        )

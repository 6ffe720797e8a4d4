"""The inference engine on real model folders: exact logits, KV-cached decode, batching, generation."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nanoternary.infer.engine import Engine, Generation
from nanoternary.infer.kernels import (
    TernaryLinear,
    build_directory,
    head_tiles,
    native_ops,
    pack_codes,
    unpack_codes,
)
from nanoternary.infer.sampling import SamplingParams
from nanoternary.io.tensors import ModelTensors, TernaryTensor
from nanoternary.model.config import MHCConfig, ModelConfig
from nanoternary.model.quant import quantize_activation
from nanoternary.model.transformer import RMSNorm
from tests.models import assert_close_logits, assert_same_logits, random_model

CODE = "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n"
SMALL = ModelConfig(n_layers=2, context_length=64, sub_norms=True, group_size=0)


@pytest.fixture(scope="module")
def tokenizer(code_corpus):
    return code_corpus[1].tokenizer


@pytest.fixture(scope="module")
def small_engine(tokenizer):
    return Engine(ModelTensors.from_model(random_model(SMALL), tokenizer))


# cpp tiles 4 tokens x 4 outputs: whole tiles, the tokens left over, and 98 = 24 x 4 + 2 outputs; scales
# per tensor, or per row and group of 128, 64 (whole 64-byte VNNI vectors) or 32 inputs (the scalar loop)
@pytest.mark.parametrize("groups", [0, 2, 4, 8], ids=["per_tensor", "g128", "g64", "g32"])
@pytest.mark.parametrize("tokens", [1, 5, 16, 19])
def test_backends_agree_on_the_integer_sums_with_and_without_a_fused_norm(tokens, groups):
    torch.manual_seed(0)
    codes = torch.randint(-1, 2, (98, 256), dtype=torch.int8)
    scales = torch.rand(98, groups) + 0.01 if groups else torch.tensor([[0.0123]])
    weight = TernaryTensor(codes, scales)
    norm = RMSNorm(256, 1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(tokens, 256)
    # int8 has one scale per output column; group scales make it fall back to fp32
    backends = {"cpp": "cpp", "int8": "fp32" if groups else "int8"}
    for fused in (None, norm):
        ref = TernaryLinear(weight, "fp32", norm=fused)
        want = ref(x)
        for backend, runs_as in backends.items():
            fast = TernaryLinear(weight, backend, norm=fused)
            assert fast.backend == runs_as
            torch.testing.assert_close(fast(x), want, rtol=1e-5, atol=1e-5)
    expected = F.linear(quantize_activation(norm(x)), weight.dense())  # the training BitLinear's arithmetic
    assert torch.equal(TernaryLinear(weight, "fp32", norm=norm)(x), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 3, 4, 16, 17])  # whole 4-token tiles and the rows left over
def test_tiled_head_kernel_equals_the_float_product(tokens, dtype):
    torch.manual_seed(0)
    vocab, dim = 64 * 5 + 37, 256  # 5 whole 64-entry vocab tiles and a tail
    embedding = torch.randn(vocab, dim).to(dtype)
    h = torch.randn(tokens, dim)
    tiles = head_tiles(embedding, dtype)
    assert tiles.shape == (6, dim, 64) and tiles.dtype == dtype
    assert torch.equal(tiles[5, :, 37:], torch.zeros(dim, 27, dtype=dtype))
    logits = native_ops().head_tiled(h, tiles, vocab)
    assert logits.shape == (tokens, vocab) and logits.is_contiguous()
    torch.testing.assert_close(logits, h @ embedding.float().t(), rtol=1e-5, atol=1e-4)
    with pytest.raises(RuntimeError, match=r"wt: contiguous \(ceil\(V / 64\), K, 64\) fp16 or float32 tiles"):
        native_ops().head_tiled(h, tiles, vocab + 64)


# cache lengths: a single position, vector-width tails (17 = 16 + 1, 40) and whole vectors; GQA 4 -> 2 heads
@pytest.mark.parametrize("positions", [[0, 16, 39], [63]])
def test_decode_attention_kernel_equals_rope_then_softmax_attention_over_the_fp16_cache(positions):
    torch.manual_seed(0)
    hq, hkv, d, capacity = 4, 2, 64, 64
    angles = torch.arange(capacity)[:, None] * torch.linspace(0.01, 1.0, d // 2)[None]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    keys = [torch.randn(hkv, capacity, d).half() for _ in positions]
    values = [torch.randn(hkv, capacity, d).half() for _ in positions]
    cached_keys, cached_values = [k.clone() for k in keys], [v.clone() for v in values]
    qkv = torch.randn(len(positions), hq + 2 * hkv, d)
    out = native_ops().decode_attention(qkv, cos, sin, keys, values, positions, hq, hkv, d**-0.5)
    assert out.shape == (len(positions), hq, d)
    for b, p in enumerate(positions):
        x = qkv[b]
        rotated = x * cos[p] + torch.cat([-x[:, d // 2 :], x[:, : d // 2]], -1) * sin[p]
        q, k, v = rotated[:hq], rotated[hq : hq + hkv], x[hq + hkv :]
        want_keys, want_values = cached_keys[b].clone(), cached_values[b].clone()
        want_keys[:, p], want_values[:, p] = k.half(), v.half()  # written at its position, rounded to fp16
        assert torch.equal(keys[b], want_keys) and torch.equal(values[b], want_values)
        kk = want_keys[:, : p + 1].float().repeat_interleave(hq // hkv, 0)
        vv = want_values[:, : p + 1].float().repeat_interleave(hq // hkv, 0)
        want = torch.softmax(q[:, None] @ kk.transpose(1, 2) * d**-0.5, -1) @ vv
        torch.testing.assert_close(out[b], want[:, 0], rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="caches must be contiguous float16"):
        native_ops().decode_attention(
            qkv, cos, sin, [k.float() for k in keys], values, positions, hq, hkv, 1.0
        )


def test_packed_codes_round_trip():
    codes = torch.randint(-1, 2, (7, 13), dtype=torch.int8)
    packed = pack_codes(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 4)
    assert torch.equal(unpack_codes(packed, 13), codes)


@pytest.mark.parametrize("backend", ["cpp", "int8"])  # exact integer sums: the decode paths
@pytest.mark.parametrize(
    "cfg",
    [SMALL, ModelConfig(n_layers=2, n_kv_heads=2, context_length=64, mhc=MHCConfig(n_streams=2))],
    ids=["bitnet_shape", "gqa_mhc2"],
)
def test_incremental_decode_matches_the_training_model(cfg, backend, tokenizer):
    model = random_model(cfg)
    engine = Engine(ModelTensors.from_model(model, tokenizer), backend=backend)
    assert engine.backend == backend
    assert (engine.decoder is not None) == (backend == "cpp")
    ids = tokenizer.encode(CODE)
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0]
    seq = engine.start(ids[:3])
    rows = [engine.step([seq])[0]]
    for t in ids[3:]:
        engine.append(seq, t)
        rows.append(engine.step([seq])[0])
    decoded = torch.stack(rows)
    assert_same_logits(decoded, engine.score(ids)[2:])  # the KV-cached path = one prefill, same arithmetic
    assert_close_logits(decoded, want[2:])  # exact integer sums vs the training forward's float sums


@pytest.mark.parametrize(
    ("cfg", "f16_embedding"),
    [
        (ModelConfig(n_layers=2, n_kv_heads=2, context_length=64, sub_norms=True, group_size=0), False),
        (ModelConfig(n_layers=2, n_kv_heads=2, context_length=64, sub_norms=True, group_size=0), True),
        (ModelConfig(n_layers=3, context_length=64, group_size=128, mhc=MHCConfig(n_streams=4)), False),
        (ModelConfig(n_layers=3, context_length=64, mhc=MHCConfig(n_streams=3, mode="static")), True),
    ],
    ids=["bitnet_float_head", "bitnet_fp16_head", "mhc4_dynamic_groups", "mhc3_static"],
)
def test_native_decode_step_equals_the_python_decode_step(cfg, f16_embedding, tokenizer):
    """DecodeModel (the whole step in one C++ call) against Engine._forward's cpp path, which runs the same
    kernels and computes mHC-lite with PyTorch ops: the same logits and cache contents, with GQA, sub-norms,
    group scales, dynamic and static stream mixing, sequences of different lengths and either LM head."""
    model = random_model(cfg)
    if f16_embedding:
        with torch.no_grad():
            model.embed.weight.copy_(model.embed.weight.half().float())
    tensors = ModelTensors.from_model(model, tokenizer)
    native, python = Engine(tensors), Engine(tensors)
    python.decoder = None
    assert native.decoder is not None and (native.head_tiles.dtype == torch.float16) == f16_embedding
    runs = []
    for engine in (native, python):
        seqs = [engine.start(tokenizer.encode(p)) for p in ("def add(a, b):", "import os\n", "x = [")]
        rows = [engine.step(seqs)]  # the prefill: Python on both
        for i in range(6):
            for seq in seqs:
                engine.append(seq, 100 + 7 * i)
            rows.append(engine.step(seqs))
        runs.append((torch.stack(rows), seqs))
    (got, native_seqs), (want, python_seqs) = runs
    # mHC's plain C++ loops sum in another order than the PyTorch ops, which now and then flips one 8-bit
    # activation rounding (see assert_same_logits); a wrong layer, stream or cache row moves far more
    assert_same_logits(got.flatten(0, 1), want.flatten(0, 1))
    for a, b in zip(native_seqs, python_seqs, strict=True):
        assert a.keys.shape == b.keys.shape and (a.keys - b.keys).abs().max() < 0.05
        assert (a.values - b.values).abs().max() < 0.05


def test_one_step_prefills_and_decodes_sequences_of_different_lengths(small_engine, tokenizer):
    a_ids, b_ids, c_ids = tokenizer.encode(CODE), tokenizer.encode("import os\n"), tokenizer.encode("x = [")
    a = small_engine.start(a_ids[:-1])
    small_engine.step([a])
    small_engine.append(a, a_ids[-1])  # a decodes one position while b and c are prefilled
    b, c = small_engine.start(b_ids), small_engine.start(c_ids)
    logits = small_engine.step([b, a, c])
    assert logits.shape == (3, SMALL.vocab_size) and logits.dtype == torch.float32
    want = torch.stack([small_engine.score(ids)[-1] for ids in (b_ids, a_ids, c_ids)])
    assert_same_logits(logits, want)
    assert a.cached == len(a_ids) and b.prefilled and c.cached == len(c_ids)


def test_batched_greedy_generation_equals_one_prompt_at_a_time(small_engine):
    prompts = ["def add(a, b):", "import", "class Foo:\n    def __init__(self):"]
    batched = small_engine.generate(prompts, max_tokens=12)
    for prompt, done in zip(prompts, batched, strict=True):
        alone = small_engine.generate([prompt], max_tokens=12)[0]
        assert done.token_ids == alone.token_ids and done.text == alone.text
        assert done.prompt_tokens == len(small_engine.tokenizer.encode(prompt))
        assert done.finish_reason in ("stop", "length")
        if done.finish_reason == "length":
            assert done.completion_tokens == 12 == len(done.token_ids)
    assert "".join(small_engine.stream(prompts[0], max_tokens=12)) == batched[0].text


def test_seeded_sampling_is_reproducible_and_repeated_prompts_differ(small_engine):
    kwargs = dict(max_tokens=16, temperature=1.5, top_k=200, seed=11)
    first = small_engine.generate(["def", "def"], **kwargs)
    again = small_engine.generate(["def", "def"], **kwargs)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert first[0].token_ids != first[1].token_ids  # prompt i samples with seed + i


def logits_for(token: int, vocab: int) -> torch.Tensor:
    row = torch.zeros(vocab)
    row[token] = 10.0
    return row


def feed_tokens(
    engine: Engine, tokens: list[int], stop: list[str], max_tokens: int = 20
) -> tuple[Generation, list[str]]:
    """Drive a Generation with logits that force `tokens` (greedy), as Engine.step's rows would."""
    gen = Generation(engine, [engine.eot_id], SamplingParams(max_tokens=max_tokens, stop=stop))
    deltas = []
    for t in tokens:
        deltas.append(gen.feed(logits_for(t, engine.cfg.vocab_size)))
        if gen.done:
            break
    return gen, deltas


def test_stop_string_across_tokens_is_cut_exactly_and_never_streamed(small_engine):
    tok = small_engine.tokenizer
    tokens = tok.encode("x = 1\n") + tok.encode("def") + tok.encode(" f")
    gen, deltas = feed_tokens(small_engine, tokens, stop=["\ndef"])
    assert gen.finish_reason == "stop" and gen.text == "x = 1"
    assert "".join(deltas) == "x = 1" and "\n" not in "".join(deltas)
    assert gen.completion().completion_tokens == len(tok.encode("x = 1\n") + tok.encode("def"))


def test_end_of_text_stops_and_is_not_part_of_the_text(small_engine):
    tok = small_engine.tokenizer
    gen, deltas = feed_tokens(small_engine, tok.encode("pass") + [small_engine.eot_id], stop=[])
    assert gen.finish_reason == "stop" and gen.text == "pass" and "".join(deltas) == "pass"
    assert gen.token_ids == tok.encode("pass")


def test_split_utf8_character_is_streamed_whole(small_engine):
    tok = small_engine.tokenizer
    # byte-level BPE: bytes C3 A9 ("é") as the single-byte tokens 'Ã' and '©'
    first, second = tok.tokenizer.token_to_id("Ã"), tok.tokenizer.token_to_id("©")
    gen, deltas = feed_tokens(small_engine, [first, second], stop=[])
    assert deltas == ["", "é"] and gen.text == "é"


def test_max_tokens_and_context_limit_finish_with_length(tokenizer):
    engine = Engine(
        ModelTensors.from_model(random_model(ModelConfig(n_layers=1, context_length=8)), tokenizer)
    )
    prompt = tokenizer.decode(tokenizer.encode(CODE)[:5])
    assert len(engine.encode_prompt(prompt)) == 5
    done = engine.generate([prompt], max_tokens=100)[0]
    if done.finish_reason == "length":  # unless end-of-text came first, the context (8) ends it
        assert done.completion_tokens == 8 - 5 + 1
    assert engine.generate([prompt], max_tokens=2)[0].completion_tokens <= 2
    zero = engine.generate([prompt], max_tokens=0)[0]
    assert (zero.text, zero.finish_reason, zero.completion_tokens) == ("", "length", 0)


def test_misuse_gives_clear_errors(small_engine, tmp_path):
    seq = small_engine.start([1, 2, 3])
    small_engine.step([seq])
    with pytest.raises(ValueError, match="no new token: call append"):
        small_engine.step([seq])
    with pytest.raises(ValueError, match="appears twice"):
        small_engine.step([seq, seq])
    with pytest.raises(ValueError, match="exceeds the context length 64"):
        small_engine.start([1] * 65)
    with pytest.raises(ValueError, match="out of range"):
        small_engine.start([SMALL.vocab_size])
    with pytest.raises(ValueError, match="prompt has no tokens"):
        small_engine.start([])
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="export folder .* or a .gguf file"):
        Engine.from_path(tmp_path / "weights.bin")
    with pytest.raises(FileNotFoundError, match="meta.json is missing"):
        Engine.from_path(tmp_path)


def test_a_build_lock_left_by_a_killed_process_does_not_hang_the_next_start():
    """torch's own build lock is a plain file: a server killed during its first build left one behind, and
    every later start waited on it forever (CI's serve tests all timed out). Ours is an flock."""
    assert native_ops() is not None  # built once here, so the child below only loads it
    stale = build_directory() / "lock"
    stale.touch()
    child = "from nanoternary.infer.kernels import native_ops; print(native_ops().__name__)"
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() == "nanoternary_ternary", proc.stderr
    assert not stale.exists()


def test_keep_last_completes_the_tail_of_a_prompt_longer_than_the_context(small_engine):
    prompt = CODE * 20
    ids = small_engine.encode_prompt(prompt)
    keep = small_engine.context_length // 2
    assert len(ids) > small_engine.context_length
    with pytest.raises(ValueError, match="exceeds the context length 64"):
        small_engine.generate([prompt], max_tokens=4)
    done = small_engine.generate([prompt], max_tokens=4, keep_last=keep)[0]
    assert done.prompt_tokens == keep
    seq, greedy = small_engine.start(ids[-keep:]), []  # the same greedy steps by hand from the tail
    for _ in range(done.completion_tokens):
        greedy.append(int(small_engine.step([seq])[0].argmax()))
        small_engine.append(seq, greedy[-1])
    assert done.token_ids == greedy

"""GGUF export for both architectures: exact codes and scales, llama.cpp names and keys, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import gguf
import numpy as np
import pytest
import torch

from nanoternary.infer.engine import Engine
from nanoternary.io.export_dir import save_export
from nanoternary.io.gguf import bitnet_misfits, export_gguf, read_gguf
from nanoternary.io.tensors import ModelTensors
from nanoternary.lit.callbacks.gguf_export import GGUFExport
from nanoternary.model.config import MHCConfig, ModelConfig
from tests.conftest import REPO_ROOT
from tests.models import assert_close_logits, assert_same_logits, preset, random_model

CODE = "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n"
Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def tokenizer(code_corpus):
    return code_corpus[1].tokenizer


@pytest.fixture(scope="module")
def bitnet_model():
    return random_model(preset("tiny_bitnet"))


@pytest.fixture(scope="module")
def bitnet(bitnet_model, tokenizer):
    return ModelTensors.from_model(bitnet_model, tokenizer)


@pytest.mark.parametrize(
    "cfg",
    [preset("tiny", mhc=MHCConfig(n_streams=4)), preset("seed_tiny"), preset("tiny_bitnet")],
    ids=["tiny_mhc4", "seed_tiny", "tiny_bitnet"],
)
def test_export_folder_and_gguf_logits_equal_the_training_model(cfg, tokenizer, tmp_path):
    model = random_model(cfg)
    ids = tokenizer.encode(CODE)
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0]
    folder = save_export(tmp_path / "final", model, tokenizer, {"step": 1})
    engine = Engine.from_path(folder, backend="fp32")
    assert_same_logits(engine.score(ids), want)
    assert engine.num_parameters == model.num_parameters() and engine.name == "final"
    path = export_gguf(
        tmp_path / "m.gguf", ModelTensors.from_model(model, tokenizer), arch="nanoternary", embed_type="f32"
    )
    assert_same_logits(Engine.from_path(path, backend="fp32").score(ids), want)


def test_bitnet_gguf_logits_equal_the_training_model_with_fp16_embeddings(bitnet, tmp_path):
    ids = bitnet.tokenizer.encode(CODE)
    rounded = random_model(preset("tiny_bitnet"))  # the same weights (same seed), embedding as stored: fp16
    with torch.no_grad():
        rounded.embed.weight.copy_(rounded.embed.weight.half().float())
        want = rounded(torch.tensor([ids]))[0]
    path = export_gguf(tmp_path / "b.gguf", bitnet, arch="bitnet")
    engine = Engine.from_path(path, backend="fp32")
    assert_same_logits(engine.score(ids), want)
    assert engine.cfg.sub_norms and engine.cfg.group_size == 0 and engine.cfg.mhc.n_streams == 1
    assert engine.tokenizer.encode(CODE) == ids
    fast = Engine.from_path(path)  # integer sums, and the F16 embedding read by the fp16 head kernel
    assert fast.backend == "cpp" and fast.head_tiles.dtype == torch.float16
    # its fp16 KV cache rounds every cached key and value, which flips more 8-bit activation roundings of
    # the output projection than float32 would (0.064 at most here, against < 0.05)
    assert_close_logits(fast.score(ids), want, max_diff=0.1)


def test_bitnet_layout_names_types_shapes_and_keys(bitnet, tmp_path):
    path = export_gguf(tmp_path / "b.gguf", bitnet, arch="bitnet", qtype="tq2_0")
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    per_block = {
        "attn_norm.weight": (Q.F32, [256]),
        "attn_q.weight": (Q.TQ2_0, [256, 256]),
        "attn_q.scale": (Q.F32, [1]),
        "attn_k.weight": (Q.TQ2_0, [256, 256]),
        "attn_k.scale": (Q.F32, [1]),
        "attn_v.weight": (Q.TQ2_0, [256, 256]),
        "attn_v.scale": (Q.F32, [1]),
        "attn_sub_norm.weight": (Q.F32, [256]),
        "attn_output.weight": (Q.TQ2_0, [256, 256]),
        "attn_output.scale": (Q.F32, [1]),
        "ffn_norm.weight": (Q.F32, [256]),
        "ffn_gate.weight": (Q.TQ2_0, [256, 512]),
        "ffn_gate.scale": (Q.F32, [1]),
        "ffn_up.weight": (Q.TQ2_0, [256, 512]),
        "ffn_up.scale": (Q.F32, [1]),
        "ffn_sub_norm.weight": (Q.F32, [512]),
        "ffn_down.weight": (Q.TQ2_0, [512, 256]),
        "ffn_down.scale": (Q.F32, [1]),
    }
    want = {"token_embd.weight": (Q.F16, [256, 4096]), "output_norm.weight": (Q.F32, [256])}
    want |= {f"blk.{i}.{k}": v for i in range(4) for k, v in per_block.items()}
    assert {n: (t.tensor_type, [int(d) for d in t.shape]) for n, t in tensors.items()} == want  # ggml order
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "bitnet"
    assert field("general.file_type") == gguf.LlamaFileType.MOSTLY_TQ2_0
    assert [
        field(f"bitnet.{k}")
        for k in (
            "context_length",
            "embedding_length",
            "block_count",
            "feed_forward_length",
            "attention.head_count",
            "attention.head_count_kv",
        )
    ] == [256, 256, 4, 512, 4, 4]
    assert field("bitnet.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert field("bitnet.rope.freq_base") == 10000.0
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    eot = bitnet.tokenizer.eot_id
    assert len(tokens) == len(types) == 4096 and tokens[eot] == "<|endoftext|>"
    assert types[eot] == gguf.TokenType.CONTROL and types.count(gguf.TokenType.CONTROL) == 1
    assert field("tokenizer.ggml.bos_token_id") == field("tokenizer.ggml.eos_token_id") == eot
    assert field("tokenizer.ggml.add_bos_token") is False
    assert len(field("tokenizer.ggml.merges")) > 3000
    # the exact trained scale, not a rounded one
    q_scale = float(tensors["blk.0.attn_q.scale"].data[0])
    assert q_scale == float(bitnet.ternary["blocks.0.attn.q_proj.weight"].scales.item())


@pytest.mark.parametrize("qtype, qt, bits", [("tq2_0", Q.TQ2_0, 2.0625), ("tq1_0", Q.TQ1_0, 1.6875)])
def test_tq_types_dequantize_to_exactly_the_trained_codes(bitnet, tmp_path, qtype, qt, bits):
    path = export_gguf(tmp_path / f"{qtype}.gguf", bitnet, arch="bitnet", qtype=qtype)
    reader = gguf.GGUFReader(path)
    for t in reader.tensors:
        if t.tensor_type == qt:
            assert t.n_bytes * 8 / t.n_elements == bits
    raw = next(t for t in reader.tensors if t.name == "blk.2.ffn_down.weight")
    assert raw.tensor_type == qt
    values = gguf.quants.dequantize(raw.data, qt).reshape(256, 512)
    assert np.array_equal(
        values, bitnet.ternary["blocks.2.ffn.down_proj.weight"].codes.numpy().astype(np.float32)
    )


def test_nanoternary_arch_round_trips_every_tensor_of_an_mhc_model(tokenizer, tmp_path):
    cfg = ModelConfig(n_layers=2, n_kv_heads=2, group_size=128, mhc=MHCConfig(n_streams=3))
    tensors = ModelTensors.from_model(random_model(cfg), tokenizer, {"step": 7, "val_bpb": 1.5})
    path = export_gguf(tmp_path / "m.gguf", tensors, arch="nanoternary", qtype="tq1_0", embed_type="f32")
    back = read_gguf(path)
    assert back.cfg == cfg and back.meta["step"] == 7 and back.meta["gguf_arch"] == "nanoternary"
    assert set(back.dense) == set(tensors.dense) and any("residual.proj" in k for k in back.dense)
    for k, v in tensors.dense.items():
        assert torch.equal(back.dense[k], v), k
    for k, t in tensors.ternary.items():
        assert torch.equal(back.ternary[k].codes, t.codes) and torch.equal(
            back.ternary[k].scales, t.scales
        ), k
    assert back.ternary["blocks.0.attn.k_proj.weight"].scales.shape == (128, 2)  # GQA, group 128


def test_q8_0_embedding_stores_the_q8_0_rounding_and_the_engine_runs_it(tokenizer, tmp_path):
    tensors = ModelTensors.from_model(random_model(preset("tiny")), tokenizer)
    path = export_gguf(tmp_path / "q8.gguf", tensors, qtype="tq1_0", embed_type="q8_0")
    embedding = tensors.dense["embed.weight"]
    blocks = embedding.view(-1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127  # per 32 values; stored as fp16
    y = blocks * (1 / scale)  # ggml's reference: multiply by the inverse, round half away from zero
    rounded = (y.sign() * (y.abs() + 0.5).floor() * scale.half().float()).view_as(embedding)
    back = read_gguf(path)
    torch.testing.assert_close(back.dense["embed.weight"], rounded, rtol=0, atol=1e-6)
    assert not torch.equal(back.dense["embed.weight"], embedding.half().float())  # lossy, unlike f16
    f16 = export_gguf(tmp_path / "f16.gguf", tensors, qtype="tq1_0")
    assert f16.stat().st_size - path.stat().st_size == 4096 * 256 * 2 - 4096 * 256 // 32 * 34
    engine, ids = Engine.from_path(path), tokenizer.encode(CODE)
    want = Engine(replace(tensors, dense={**tensors.dense, "embed.weight": rounded}), backend="fp32").score(
        ids
    )
    assert_close_logits(engine.score(ids), want, max_diff=0.1)  # fp16 KV: see the F16 bitnet test
    odd = ModelTensors.from_model(
        random_model(ModelConfig(dim=48, n_heads=2, ffn_dim=96, n_layers=1, group_size=0)), tokenizer
    )
    with pytest.raises(ValueError, match="embed_type=q8_0 needs model.dim to be a multiple of 32, got 48"):
        export_gguf(tmp_path / "odd.gguf", odd, qtype="f16", embed_type="q8_0")


def test_f16_qtype_and_unquantized_models(tokenizer, tmp_path):
    fp = ModelTensors.from_model(random_model(ModelConfig(n_layers=1, quantize=False)), tokenizer)
    back = read_gguf(export_gguf(tmp_path / "fp.gguf", fp, qtype="f16"))
    assert not back.ternary and torch.equal(
        back.dense["blocks.0.attn.q_proj.weight"], fp.dense["blocks.0.attn.q_proj.weight"]
    )
    odd = ModelTensors.from_model(
        random_model(ModelConfig(dim=192, n_heads=3, ffn_dim=384, n_layers=1, group_size=64)), tokenizer
    )
    with pytest.raises(ValueError, match="rows of 192 values are not a whole number of 256-value TQ blocks"):
        export_gguf(tmp_path / "odd.gguf", odd, qtype="tq2_0")
    assert not (tmp_path / "odd.gguf").exists() and [p.name for p in tmp_path.iterdir()] == ["fp.gguf"]
    assert (
        read_gguf(export_gguf(tmp_path / "odd.gguf", odd, qtype="f16")).ternary.keys() == odd.ternary.keys()
    )


def test_bitnet_refuses_other_shapes_and_lists_every_misfit(tokenizer, tmp_path):
    cfg = preset("tiny", mhc=MHCConfig(n_streams=4))
    assert len(bitnet_misfits(cfg)) == 3
    tensors = ModelTensors.from_model(
        random_model(ModelConfig(n_layers=1, mhc=MHCConfig(n_streams=2))), tokenizer
    )
    with pytest.raises(ValueError, match="llama.cpp's BitNet shape") as err:
        export_gguf(tmp_path / "x.gguf", tensors, arch="bitnet")
    message = str(err.value)
    assert "model.mhc.n_streams=1), got 2" in message
    assert "model.sub_norms=true), got false" in message
    assert "model.group_size=0), got 256" in message
    assert not (tmp_path / "x.gguf").exists() and list(tmp_path.iterdir()) == []


def test_corrupt_truncated_wrong_arch_and_missing_keys(bitnet, tmp_path):
    good = export_gguf(tmp_path / "good.gguf", bitnet, arch="bitnet").read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(good[: len(good) - 1000])
    with pytest.raises(ValueError, match="truncated"):
        read_gguf(tmp_path / "trunc.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(ValueError, match="corrupt or truncated GGUF file"):
        read_gguf(tmp_path / "junk.gguf")
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        read_gguf(tmp_path / "none.gguf")

    w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    with pytest.raises(ValueError, match="architecture 'llama'; expected one of"):
        read_gguf(tmp_path / "llama.gguf")

    key = b"bitnet.attention.layer_norm_rms_epsilon"  # renamed in place: a valid file without the key
    (tmp_path / "nokeys2.gguf").write_bytes(good.replace(key, key[:-1] + b"X"))
    with pytest.raises(ValueError, match="missing required keys: bitnet.attention.layer_norm_rms_epsilon"):
        read_gguf(tmp_path / "nokeys2.gguf")


def test_export_cli_writes_a_loadable_gguf(tokenizer, tmp_path):
    folder = save_export(
        tmp_path / "run" / "export" / "final", random_model(preset("tiny_bitnet")), tokenizer, {"step": 3}
    )
    proc = subprocess.run(
        [sys.executable, "-m", "nanoternary.cli.export", f"src={folder}", "qtype=tq1_0", "progress=false"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = folder / "model.gguf"
    engine = Engine.from_path(out)
    assert engine.meta["gguf_arch"] == "bitnet" and engine.meta["step"] == 3  # auto: it has the shape
    assert engine.name == "run-final"
    assert [t.tensor_type for t in gguf.GGUFReader(out).tensors if t.name == "blk.0.attn_q.weight"] == [
        Q.TQ1_0
    ]
    bad = subprocess.run(
        [sys.executable, "-m", "nanoternary.cli.export", f"src={tmp_path / 'nothing.bin'}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0 and "src must be a model folder (with meta.json) or a .ckpt file" in bad.stderr


def test_callback_converts_final_and_every_nth_step_folder(tokenizer, tmp_path):
    model = random_model(ModelConfig(n_layers=1))
    export = tmp_path / "export"
    for name in ("step-00000002", "step-00000003", "step-00000004", "final"):
        save_export(export / name, model, tokenizer, {"step": 4})
    callback = GGUFExport(str(export), every_n_steps=2, progress=False)
    assert [f.name for f in callback.step_folders()] == ["step-00000002", "step-00000004"]
    for folder in callback.step_folders():
        callback.convert(folder)
    assert callback.step_folders() == []
    assert sorted(p.name for p in export.glob("*/model.gguf")) == ["model.gguf"] * 2
    final = callback.convert(export / "final")
    assert read_gguf(final).meta["gguf_arch"] == "nanoternary"  # no sub-norms: not bitnet-shaped
    assert sorted(p.name for p in (export / "final").iterdir()) == [
        "meta.json",
        "model.gguf",
        "model.safetensors",
        "tokenizer.json",
    ]

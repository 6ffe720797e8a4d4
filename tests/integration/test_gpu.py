"""On a CUDA device (marker `gpu`, outside the default run): the engine's GPU path against the CPU
engine, and `trainer=gpu` / `trainer=ddp` jobs through train.py as a user starts them."""

from __future__ import annotations

import json

import pytest
import torch

from nanoternary.infer.engine import Engine
from nanoternary.io.tensors import ModelTensors
from tests.models import assert_close_logits, preset, random_model
from tests.train_cli import TINY, train_cli

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CODE = "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n"


@pytest.fixture(scope="module")
def tokenizer(code_corpus):
    return code_corpus[1].tokenizer


@pytest.mark.parametrize("name", ["tiny", "tiny_bitnet"])
def test_engine_on_cuda_decodes_like_the_cpu_engine(name, tokenizer):
    """The fp32 backend on the GPU against the CPU fp32 engine: prefill and KV-cached decode logits, and
    the tokens of batched greedy generation. cuBLAS sums in another order than the CPU, so the logits
    agree to ~1e-6 until one 8-bit activation rounding flips, then within what a flip moves (< 0.05; seen
    on an H100: 0.01-0.04 after the flip); a greedy pick may differ only at such a near-tie."""
    torch.backends.cuda.matmul.allow_tf32 = False  # TF32 would round the float sums the CPU does exactly
    tensors = ModelTensors.from_model(random_model(preset(name)), tokenizer)
    cpu, gpu = Engine(tensors, backend="fp32"), Engine(tensors, device="cuda")
    assert gpu.backend == "fp32" and gpu.device.type == "cuda"
    assert all(b.is_cuda for b in gpu.proj.buffers())
    ids = tokenizer.encode(CODE)
    want = cpu.score(ids)
    assert_close_logits(gpu.score(ids).cpu(), want)
    seq = gpu.start(ids[:3])
    rows = [gpu.step([seq])[0]]
    for t in ids[3:]:
        gpu.append(seq, t)
        rows.append(gpu.step([seq])[0])
    assert_close_logits(torch.stack(rows).cpu(), want[2:])
    prompts = ["def add(a, b):", "import", "class Foo:\n    def __init__(self):"]
    for prompt, done in zip(prompts, gpu.generate(prompts, max_tokens=16), strict=True):
        prefix = gpu.encode_prompt(prompt)
        assert len(done.token_ids) > 0
        for token in done.token_ids:
            logits = cpu.score(prefix)[-1]
            assert logits[token] >= logits.max() - 0.05, (prompt, prefix, token)
            prefix.append(token)


@pytest.mark.parametrize(
    "trainer",
    [
        ["trainer=gpu", "compile=true"],
        ["trainer=ddp", "trainer.accelerator=gpu", "trainer.devices=1"],
        ["trainer=fsdp", "trainer.devices=1"],
    ],
    ids=["gpu_bf16_compiled", "ddp_1gpu", "fsdp_1gpu"],
)
def test_train_runs_on_one_gpu_and_exports(trainer, tmp_path, cache_dir):
    """trainer=gpu (compiled), trainer=ddp and trainer=fsdp on 1 GPU train their steps on the GPU in
    bf16-mixed (the configs' default on a CUDA machine) and write the final export, which for FSDP means
    gathering the sharded weights on rank 0."""
    run = tmp_path / "run"
    overrides = [o for o in TINY if not o.startswith("trainer.precision")]
    proc = train_cli(cache_dir, *overrides, *trainer, "trainer.max_steps=4", f"hydra.run.dir={run}")
    log = proc.stdout + proc.stderr
    assert "GPU available: True (cuda), used: True" in log
    meta = json.loads((run / "export" / "final" / "meta.json").read_text())
    assert meta["step"] == 4
    assert meta["training"]["precision"] == "bf16-mixed"
    assert (run / "export" / "final" / "model.gguf").stat().st_size > 0

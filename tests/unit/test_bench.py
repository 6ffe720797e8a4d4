"""`nanoternary-bench train`: its pieces run for real on a 1-layer model for a few steps (no timing
assertions: the machine is shared). What is checked is the bookkeeping: which loop ran how many steps,
what the ratios are computed from, what the table and the JSON contain, and that A (Lightning) and B
(the plain loop) train identically when A is run without compilation and autocast."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from nanoternary.cli.bench import CONF_DIR, bench, compare_curves, curves_summary, plot_curves, speed_table
from nanoternary.cli.bench_loops import PlainLoop, autocast_for, wsd_schedule
from nanoternary.cli.bench_train import Spec, run
from nanoternary.lit.module import lm_loss
from nanoternary.model.config import ModelConfig
from nanoternary.model.transformer import TernaryLM
from tests.conftest import REPO_ROOT

# a 1-layer, 64-wide tiny (4 mHC streams as configured), 2 x 32 tokens per step
DIM, FFN, CTX, BATCH = 64, 128, 32, 2
FAST = [
    "model.n_layers=1",
    f"model.context_length={CTX}",
    f"model.dim={DIM}",
    "model.n_heads=2",
    f"model.ffn_dim={FFN}",
    f"model.group_size={DIM}",
    "compile=false",
]


@pytest.fixture(scope="module")
def speed(cache_dir):
    return run(
        Spec(model="tiny", batch_size=BATCH, warmup_steps=2, chunk_steps=1, rounds=3, train_overrides=FAST)
    )


def test_every_loop_is_timed_every_round(speed):
    assert set(speed["chunks"]) == {"A", "B", "bare"}
    assert all(len(chunks) == 3 for chunks in speed["chunks"].values())
    assert set(speed["warmup_s"]) == {"A", "B", "bare"}
    assert speed["batch"] == [BATCH, CTX + 1] and speed["tokens_per_step"] == BATCH * CTX
    assert speed["compile"] is False and speed["precision"] in ("bf16-mixed", "32-true")
    shape = ModelConfig(
        n_layers=1, context_length=CTX, dim=DIM, n_heads=2, ffn_dim=FFN, group_size=DIM, mhc={"n_streams": 4}
    )
    assert speed["params"] == TernaryLM(shape).num_parameters()
    assert 0 < speed["peak_rss_mb"] < 4096 and len(speed["load_avg_before"]) == 3


def test_ratios_are_medians_of_per_round_ratios(speed):
    rate = {name: [BATCH * CTX / wall for wall, _ in chunks] for name, chunks in speed["chunks"].items()}
    assert speed["A_tokens_per_s"] == statistics.median(rate["A"])
    assert speed["A_over_B"] == statistics.median(a / b for a, b in zip(rate["A"], rate["B"], strict=True))
    assert speed["A_over_bare"] == statistics.median(
        a / b for a, b in zip(rate["A"], rate["bare"], strict=True)
    )
    assert speed["B_cpu_s_per_step"] == statistics.median(cpu for _, cpu in speed["chunks"]["B"])


def test_flops_per_step_count_every_matmul(speed):
    """6 x tokens x (BitLinear + mHC projection + tied head weights), plus the stream read and reduce
    (2·n·C per token each: forward, and backward to the streams; the read also to its weights).
    FlopCounterMode has no formula for PyTorch's CPU flash attention, so attention is not counted on CPU."""
    tokens, vocab, n = BATCH * CTX, 4096, 4
    matmul_weights = 4 * DIM * DIM + 3 * DIM * FFN + vocab * DIM + 2 * (2 * n) * (n * DIM)
    stream_ops = tokens * 2 * n * DIM * (2 * 3 + 2)  # 2 reads x (fwd + 2 bwd) + 1 reduce x (fwd + bwd)
    assert speed["flops_per_step"] == 6 * tokens * matmul_weights + stream_ops


def test_table_has_a_row_per_loop_and_the_ratios(speed):
    lines = speed_table([speed]).splitlines()
    assert (
        lines[0].startswith("device cpu, torch ")
        and "OMP_WAIT_POLICY=" in lines[0]
        and "compile=False" in lines[0]
    )
    assert lines[1].split() == ["model", "loop", "tokens/s", "CPU", "s/step", "first", "step", "s"]
    assert [line.split()[:2] for line in lines[2:5]] == [["tiny", "A"], ["tiny", "B"], ["tiny", "bare"]]
    assert (
        "Lightning (train.py)" in lines[2]
        and "eager fp32 reference" in lines[3]
        and "no Lightning" in lines[4]
    )
    assert f"{speed['A_tokens_per_s']:,.0f}" in lines[2]
    summary = lines[5]
    assert summary.startswith("tiny ") and f"A/B {speed['A_over_B']:.2f}" in summary
    assert f"A/bare {speed['A_over_bare']:.3f} (Lightning overhead" in summary
    assert (
        "peak RSS" in summary
        and "params" in summary
        and f"batch {BATCH}x{CTX}" in summary
        and "load " in summary
    )


def test_without_compile_and_autocast_lightning_trains_exactly_like_the_plain_loop(cache_dir):
    """Same weights, batches, schedule, clipping and (batched vs torch's) Muon: A's losses are B's."""
    overrides = [*FAST, "trainer.precision=32-true"]
    result = run(Spec(model="tiny", batch_size=BATCH, curve_steps=4, train_overrides=overrides))
    assert len(result["A_loss"]) == len(result["B_loss"]) == 4
    torch.testing.assert_close(result["A_loss"], result["B_loss"], rtol=0, atol=1e-5)
    assert len(set(result["B_loss"])) == 4  # it trained: every step's loss differs


def test_under_autocast_the_curves_include_the_fp32_control(cache_dir):
    """Same weights and first batch: before any update, the fp32 control's loss is B's and A's is within
    bf16 rounding of it; then all three train."""
    fast = [*FAST, "trainer.precision=bf16-mixed"]
    result = run(Spec(model="tiny", batch_size=BATCH, curve_steps=3, train_overrides=fast))
    a, a32, b = result["A_loss"], result["A_fp32_loss"], result["B_loss"]
    assert result["precision"] == "bf16-mixed" and len(a) == len(a32) == len(b) == 3
    assert a32[0] == pytest.approx(b[0], abs=1e-5)
    assert a[0] != a32[0] and a[0] == pytest.approx(b[0], abs=0.05)
    assert len(set(a32)) == 3


def test_curves_summary_and_plot(tmp_path):
    a, b = [4.0, 3.0, 2.5, 2.0], [4.0, 3.1, 2.4, 2.2]
    out = compare_curves(a, b, window=2, block=2)
    assert out["max_abs_diff"] == pytest.approx(0.2) and out["mean_abs_diff"] == pytest.approx(0.1)
    assert out["max_abs_diff_2_step_mean"] == pytest.approx(0.05)
    assert out["mean_diff_per_2_steps"] == pytest.approx([-0.05, -0.05])
    assert (out["first_A"], out["final_B"]) == (4.0, 2.2)
    result = {"A_loss": a, "A_fp32_loss": b[::-1], "B_loss": b, "model": "tiny", "precision": "bf16-mixed"}
    result.update(compile=True, load_avg=(1.0, 1.0, 1.0), **compare_curves(a, b))
    result["A_fp32_vs_B"] = compare_curves(b[::-1], b)
    png = tmp_path / "curves.png"
    assert plot_curves(result, png)
    assert png.read_bytes()[:4] == b"\x89PNG"
    result["png"] = str(png)
    lines = curves_summary(result).splitlines()
    assert lines[0] == "model=tiny: 4 steps, first loss A 4.0000 B 4.0000, final A 2.0000 B 2.2000; load 1.0"
    assert lines[1] == (
        "A (bf16-mixed) vs B: max |diff| 0.2000, mean 0.1000, of 10-step means 0.0500; "
        "50-step means minus B's: -0.050"
    )
    assert lines[2].startswith("A_fp32 (control) vs B: max |diff| 1.8000") and lines[3] == f"plot {png}"


def test_plain_loop_applies_the_schedule_and_clips(cache_dir):
    model = TernaryLM(
        ModelConfig(n_layers=1, context_length=16, vocab_size=64, dim=256, mhc=dict(n_streams=1))
    )
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    batches = iter([torch.randint(0, 64, (2, 17)) for _ in range(2)])
    wsd = dict(warmup_steps=4, decay_fraction=0.0, final_mult=0.1, shape="linear", total_steps=None)
    loop = PlainLoop("B", model, lm_loss, [opt], batches, grad_clip=1e-3, schedule=wsd_schedule(wsd, 10))
    before = model.embed.weight.detach().clone()
    loop.step()
    assert opt.param_groups[0]["lr"] == 0.25  # step 1 of a 4-step warmup
    moved = (model.embed.weight.detach() - before).norm()
    assert 0 < moved <= 0.25 * 1e-3 + 1e-9  # SGD step of a gradient clipped to norm 1e-3
    loop.step()
    assert opt.param_groups[0]["lr"] == 0.5 and loop.steps == 2
    assert all(p.grad is None for p in model.parameters())


def test_autocast_for_the_trainer_precisions():
    assert autocast_for("32-true", torch.device("cpu"))().__class__.__name__ == "nullcontext"
    ctx = autocast_for("bf16-mixed", torch.device("cpu"))()
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16
    with pytest.raises(
        ValueError, match=r"trainer.precision='16-mixed' is not supported by the benchmark's bare loop"
    ):
        autocast_for("16-mixed", torch.device("cpu"))


def bench_cli(*args: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "nanoternary.cli.bench", *args, f"run_dir={tmp_path}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=600,
    )


def test_cli_prints_the_table_and_writes_the_json(tmp_path, cache_dir):
    overrides = "train_overrides=[" + ",".join(f"'{o}'" for o in FAST) + "]"  # quoted: they contain '='
    proc = bench_cli(
        "train",
        "models=[seed_tiny]",
        f"batch_size={BATCH}",
        "warmup_steps=1",
        "chunk_steps=1",
        "rounds=1",
        overrides,
        tmp_path=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == json.loads((tmp_path / "bench.json").read_text())
    (result,) = out["results"]
    assert result["model"] == "seed_tiny" and out["config"]["mode"] == "train"
    rows = [line.split()[:2] for line in proc.stderr.splitlines() if line.startswith("seed_tiny ")]
    assert rows[:3] == [["seed_tiny", "A"], ["seed_tiny", "B"], ["seed_tiny", "bare"]] and rows[3][1] == "A/B"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("mode=inference", "unknown benchmark mode 'inference'; expected one of ['train']"),
        ("device=tpu", "device must be one of ['cpu', 'cuda'], got 'tpu'"),
        ("rounds=0", "warmup_steps, chunk_steps, rounds and curve_steps must all be >= 1"),
    ],
)
def test_bad_settings_are_named(tmp_path, override, message):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("bench", overrides=[override])
    with pytest.raises(ValueError, match=re.escape(message)):
        bench(cfg, tmp_path)

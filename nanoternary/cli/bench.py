"""`nanoternary-bench train [key=value ...]`: how fast our trainer trains, next to a plain PyTorch loop.

For each model (conf/bench.yaml) a child process (nanoternary/cli/bench_train.py) times, taking turns
under the same load: A = our Lightning training step as train.py runs it with the device's defaults,
B = the same model and optimizers in an eager fp32 loop, bare = A's step without Lightning. The table
(stderr) gives tokens/s of each, A/B, A/bare (Lightning's overhead), A's first step including
compilation, peak RSS and the load average; stdout and bench.json carry the JSON.
`curves=true` instead trains A and B for `curve_steps` steps from the same weights on the same batches
and reports how far their losses drift apart (and plots them, when matplotlib is installed); when A uses
autocast, A in fp32 runs too, as the control for how far rounding alone moves a trajectory.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from nanoternary.cli.resolvers import register_resolvers
from nanoternary.io.atomic import atomic_write_text

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
MODES = ("train",)
DEFAULT_MODELS = {"cpu": ["tiny", "tiny_fp", "seed_tiny"], "cuda": ["tiny", "small"]}
LOOPS = {"A": "Lightning (train.py)", "B": "eager fp32 reference", "bare": "A's step, no Lightning"}
log = logging.getLogger(__name__)
register_resolvers()


def child_spec(cfg: DictConfig, model: str) -> dict[str, Any]:
    keys = (
        "device",
        "batch_size",
        "seq_len",
        "data",
        "warmup_steps",
        "chunk_steps",
        "rounds",
        "reference",
        "bare",
        "peak_tflops",
    )
    spec = {key: cfg[key] for key in keys}
    spec.update(
        model=model,
        train_overrides=list(cfg.train_overrides),
        curve_steps=cfg.curve_steps if cfg.curves else 0,
    )
    return spec


def run_child(spec: dict[str, Any], cold_compile: bool) -> dict[str, Any]:
    """Measure one model in a fresh interpreter; its last stdout line is the JSON result."""
    with tempfile.TemporaryDirectory(prefix="nt-bench-cache-") as cache:
        env = dict(os.environ)
        if cold_compile:
            env.update(TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=cache)
        cmd = [sys.executable, "-m", "nanoternary.cli.bench_train", json.dumps(spec)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
        raise RuntimeError(f"the benchmark of model={spec['model']} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt(value: float | None, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def speed_table(results: list[dict[str, Any]]) -> str:
    """One row per model and loop, then the ratios, memory and load of each model."""
    first = results[0]
    lines = [
        f"device {first['device']}{' (' + first['gpu'] + ')' if 'gpu' in first else ''}, torch {first['torch']}, "
        f"{first['threads']} threads, OMP_WAIT_POLICY={first['omp_wait_policy']}, A: precision "
        f"{first['precision']}, compile={first['compile']}",
        f"{'model':<10} {'loop':<5} {'':<24} {'tokens/s':>9} {'CPU s/step':>10} {'first step s':>12}",
    ]
    for r in results:
        for loop, what in LOOPS.items():
            if f"{loop}_tokens_per_s" in r:
                lines.append(
                    f"{r['model']:<10} {loop:<5} {what:<24} {fmt(r[f'{loop}_tokens_per_s']):>9} "
                    f"{r[f'{loop}_cpu_s_per_step']:>10.3f} {r['warmup_s'].get(loop, 0.0):>12.1f}"
                )
        lines.append(f"{r['model']:<10} " + "  ".join(summary_parts(r)))
    return "\n".join(lines)


def summary_parts(r: dict[str, Any]) -> list[str]:
    """A/B, Lightning's overhead, memory, FLOP rate and load of one model's result."""
    parts = [f"A/B {fmt(r.get('A_over_B'), '.2f')}"]
    if r.get("A_over_bare") is not None:
        parts.append(
            f"A/bare {r['A_over_bare']:.3f} (Lightning overhead {(1 - r['A_over_bare']) * 100:+.1f}%)"
        )
    parts.append(f"peak RSS {fmt(r['peak_rss_mb'])} MB")
    if "cuda_peak_mb" in r:
        parts.append(f"CUDA peak {fmt(r['cuda_peak_mb'])} MB")
    if "A_tflops" in r:
        mfu = r.get("A_mfu")
        parts.append(f"A {r['A_tflops']:.3f} TFLOP/s, MFU {'-' if mfu is None else f'{mfu * 100:.1f}%'}")
    parts.append(f"params {r['params']:,}, batch {r['batch'][0]}x{r['batch'][1] - 1}")
    parts.append(f"load {r['load_avg_before'][0]:.1f} -> {r['load_avg_after'][0]:.1f}")
    return parts


def block_mean_diffs(a: list[float], b: list[float], block: int) -> list[float]:
    """mean(a) - mean(b) over consecutive `block`-step blocks."""
    return [
        statistics.fmean(a[i : i + block]) - statistics.fmean(b[i : i + block])
        for i in range(0, len(a), block)
    ]


def compare_curves(a: list[float], b: list[float], window: int = 10, block: int = 50) -> dict[str, Any]:
    """How far two loss curves are apart: per step, as the largest gap between `window`-step means (the
    step-to-step noise of two trajectories that diverge by rounding averages out in them), and the signed
    gap of each `block`-step mean (does one run train systematically worse?)."""
    diffs = [abs(x - y) for x, y in zip(a, b, strict=True)]
    return {
        "max_abs_diff": max(diffs),
        "mean_abs_diff": statistics.fmean(diffs),
        f"max_abs_diff_{window}_step_mean": max(abs(d) for d in block_mean_diffs(a, b, window)),
        f"mean_diff_per_{block}_steps": block_mean_diffs(a, b, block),
        "final_A": a[-1],
        "final_B": b[-1],
        "first_A": a[0],
        "first_B": b[0],
    }


def curves_summary(result: dict[str, Any]) -> str:
    """The curves measurement in a few lines: A against B, and the fp32 control against B."""

    def gaps(r: dict[str, Any]) -> str:
        blocks = ", ".join(f"{d:+.3f}" for d in r["mean_diff_per_50_steps"])
        return (
            f"max |diff| {r['max_abs_diff']:.4f}, mean {r['mean_abs_diff']:.4f}, of 10-step means "
            f"{r['max_abs_diff_10_step_mean']:.4f}; 50-step means minus B's: {blocks}"
        )

    lines = [
        f"model={result['model']}: {len(result['A_loss'])} steps, first loss A {result['first_A']:.4f} "
        f"B {result['first_B']:.4f}, final A {result['final_A']:.4f} B {result['final_B']:.4f}; "
        f"load {result['load_avg'][0]:.1f}",
        f"A ({result['precision']}) vs B: {gaps(result)}",
    ]
    if "A_fp32_vs_B" in result:
        lines.append(f"A_fp32 (control) vs B: {gaps(result['A_fp32_vs_B'])}")
    if result["png"]:
        lines.append(f"plot {result['png']}")
    return "\n".join(lines)


def plot_curves(result: dict[str, Any], path: Path) -> bool:
    """curves.png: both losses and their difference; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no %s", path.name)
        return False
    b = result["B_loss"]
    steps = range(1, len(b) + 1)
    curves = {f"A: Lightning, {result['precision']}, compile={result['compile']}": result["A_loss"]}
    if "A_fp32_loss" in result:
        curves[f"A_fp32 (control): Lightning, 32-true, compile={result['compile']}"] = result["A_fp32_loss"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 1])
    top.plot(steps, b, label="B: eager fp32, torch.optim.Muon", linewidth=1, color="C0")
    for i, (label, losses) in enumerate(curves.items(), start=1):
        top.plot(steps, losses, label=label, linewidth=1, color=f"C{i}")
        diffs = [x - y for x, y in zip(losses, b, strict=True)]
        bottom.plot(steps, diffs, color=f"C{i}", linewidth=0.8, label=f"{label.split(':')[0]} - B")
    top.set_ylabel("train loss (nats)")
    top.set_title(f"model={result['model']}: training losses from the same weights and batches")
    top.legend(fontsize=8)
    bottom.axhline(0, color="grey", linewidth=0.5)
    bottom.legend(fontsize=8)
    bottom.set_ylabel("minus B")
    bottom.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def bench(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    if cfg.mode not in MODES:
        raise ValueError(f"unknown benchmark mode {cfg.mode!r}; expected one of {list(MODES)}")
    if cfg.device not in DEFAULT_MODELS:
        raise ValueError(f"device must be one of {list(DEFAULT_MODELS)}, got {cfg.device!r}")
    if min(cfg.warmup_steps, cfg.chunk_steps, cfg.rounds, cfg.curve_steps) < 1:
        raise ValueError("warmup_steps, chunk_steps, rounds and curve_steps must all be >= 1")
    models = list(cfg.models) if cfg.models else DEFAULT_MODELS[cfg.device]
    if cfg.curves:
        result = run_child(child_spec(cfg, models[0]), cfg.cold_compile)
        result.update(compare_curves(result["A_loss"], result["B_loss"]))
        if "A_fp32_loss" in result:
            result["A_fp32_vs_B"] = compare_curves(result["A_fp32_loss"], result["B_loss"])
        result["png"] = str(out_dir / "curves.png") if plot_curves(result, out_dir / "curves.png") else None
        print(curves_summary(result), file=sys.stderr)
        return result
    results = []
    for model in models:
        log.info("measuring model=%s ...", model)
        results.append(run_child(child_spec(cfg, model), cfg.cold_compile))
    print(speed_table(results), file=sys.stderr)
    return {"results": results}


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="bench")
def hydra_main(cfg: DictConfig) -> None:
    out_dir = Path(cfg.paths.output_dir)
    result = bench(cfg, out_dir)
    result["config"] = OmegaConf.to_container(cfg, resolve=True)
    text = json.dumps(result)
    atomic_write_text(out_dir / "bench.json", text)
    print(text)


def main() -> None:
    """`nanoternary-bench train ...`: the leading bare word is the mode (Hydra takes only key=value)."""
    args = sys.argv[1:]
    if args and "=" not in args[0] and not args[0].startswith("-"):
        args[0] = f"mode={args[0]}"
    sys.argv = [sys.argv[0], *args]
    hydra_main()


if __name__ == "__main__":
    main()

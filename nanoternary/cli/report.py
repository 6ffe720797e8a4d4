"""The end-of-run summary: held-out bpb beside gzip/bzip2/xz on the same bytes, and a sample."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from nanoternary.data.datamodule import TokenDataModule
from nanoternary.evals.bpb import compression_bpb
from nanoternary.infer.generate import greedy_complete
from nanoternary.lit.module import LitTernaryLM


def print_run_summary(
    run_dir: Path,
    module: LitTernaryLM,
    datamodule: TokenDataModule,
    metrics: dict[str, Any],
    wall_seconds: float,
    sample_prompt: str,
    sample_tokens: int,
) -> dict[str, Any]:
    """Print and save (run_dir/summary.json) what the run achieved."""
    baselines = compression_bpb(datamodule.heldout_bytes())
    table = Table(title=f"held-out {datamodule.source_name} ({len(datamodule.heldout_bytes()):,} bytes)")
    table.add_column("model / compressor")
    table.add_column("bits per byte", justify="right")
    if "val/bpb" in metrics:
        table.add_row("nanoternary val/bpb", f"{metrics['val/bpb']:.4f}")
    for name, bpb in baselines.items():
        table.add_row(f"{name} -9{'e' if name == 'xz' else ''}", f"{bpb:.4f}")
    console = Console()
    console.print(table)
    module.model.eval()
    sample = greedy_complete(module.model.float(), datamodule.prepare().tokenizer, sample_prompt, sample_tokens)
    console.print(f"[bold]sample[/bold] (greedy, {sample_tokens} tokens):")
    console.print(sample_prompt + sample, markup=False, highlight=False)
    summary = {
        "val/loss": metrics.get("val/loss"),
        "val/bpb": metrics.get("val/bpb"),
        "baselines_bpb": baselines,
        "perf/tokens_per_sec": metrics.get("perf/tokens_per_sec"),
        "wall_seconds": wall_seconds,
        "sample_prompt": sample_prompt,
        "sample": sample,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    console.print(f"run directory: {run_dir}  (wall {wall_seconds:.0f} s)")
    return summary

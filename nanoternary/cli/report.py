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
from nanoternary.model.transformer import TernaryLM


def heldout_table(title: str, loss: float | None, bpb: float | None, baselines: dict[str, float]) -> Table:
    """The model's held-out loss and bpb above the compressors' bpb on the same bytes ("n/a": undefined)."""
    table = Table(title=title)
    table.add_column("model / compressor")
    table.add_column("nats per token", justify="right")
    table.add_column("bits per byte", justify="right")
    table.add_row("nanoternary", *(f"{v:.4f}" if v is not None else "n/a" for v in (loss, bpb)))
    for name, value in baselines.items():
        table.add_row(f"{name} -9{'e' if name == 'xz' else ''}", "", f"{value:.4f}")
    return table


def print_run_summary(
    run_dir: Path,
    model: TernaryLM,
    datamodule: TokenDataModule,
    metrics: dict[str, Any],
    wall_seconds: float,
    sample_prompt: str,
    sample_tokens: int,
) -> dict[str, Any]:
    """Print and save (run_dir/summary.json) what the run achieved."""
    console = Console()
    sample = None
    if datamodule.has_text:
        heldout = datamodule.heldout_bytes()
        baselines = compression_bpb(heldout)
        title = f"held-out {datamodule.source_name} ({len(heldout):,} bytes)"
    else:
        baselines = {}
        title = f"held-out {datamodule.source_name} (token ids: no bytes, so no bpb and no compressors)"
    console.print(heldout_table(title, metrics.get("val/loss"), metrics.get("val/bpb"), baselines))
    if datamodule.has_text:
        model.eval()
        tokenizer = datamodule.prepare().tokenizer
        sample = greedy_complete(model.float(), tokenizer, sample_prompt, sample_tokens)
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

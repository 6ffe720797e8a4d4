"""`nanoternary-eval task=humaneval model=<export|gguf> | endpoint=<url> | canonical=true`: score a model."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from nanoternary.evals.humaneval import (
    CanonicalCompleter,
    CodeExecutionNotAllowed,
    Completer,
    EndpointCompleter,
    EndpointError,
    EngineCompleter,
    Problem,
    SamplingParams,
    evaluate,
    load_problems,
    require_opt_in,
)
from nanoternary.evals.sandbox import Limits

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf" / "eval")
log = logging.getLogger(__name__)


def make_completer(cfg: DictConfig, problems: list[Problem]) -> tuple[Completer, str]:
    """The completion source the config names, and a label for it."""
    sources = [name for name in ("model", "endpoint", "canonical") if cfg[name]]
    if len(sources) != 1:
        raise ValueError(
            f"name exactly one of model=<path>, endpoint=<url>, canonical=true (got {sources or 'none'})"
        )
    t = cfg.task
    params = SamplingParams(
        max_tokens=t.max_tokens,
        temperature=t.temperature,
        top_p=t.top_p,
        top_k=t.top_k,
        stop=tuple(t.stop),
        seed=t.seed,
    )
    if cfg.canonical:
        return CanonicalCompleter(problems), "canonical solutions"
    if cfg.endpoint:
        h = cfg.http
        return EndpointCompleter(
            cfg.endpoint,
            params,
            model=h.model_name,
            api_key=h.api_key,
            timeout_s=h.timeout_s,
            retries=h.retries,
            backoff_s=h.backoff_s,
        ), cfg.endpoint
    return EngineCompleter.from_path(cfg.model, params, device=cfg.device), str(cfg.model)


def print_summary(summary: dict[str, Any], source: str, output_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"HumanEval · {source} · {summary['problems']} problems × {summary['samples_per_problem']}"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in summary["pass_at_k"].items():
        table.add_row(name, f"{value:.2%}")
    table.add_section()
    for name, share in summary["categories"].items():
        table.add_row(name, f"{share:.1%} of samples")
    table.add_section()
    table.add_row(
        "wall time", f"{summary['wall_time_s']:.1f} s ({summary['seconds_per_problem']:.3f} s/problem)"
    )
    table.add_row("of which generation", f"{summary['generation_time_s']:.1f} s")
    table.add_row("executed / resumed", f"{summary['executed_now']} / {summary['resumed']}")
    console = Console()
    console.print(table)
    console.print("sandbox: " + "; ".join(f"{k}: {v}" for k, v in summary["isolation"].items()))
    console.print(f"results: {output_dir / 'samples.jsonl'}  {output_dir / 'summary.json'}")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate, write summary.json next to samples.jsonl, print the table; return the summary."""
    if cfg.task.name != "humaneval":
        raise ValueError(f"unknown task {cfg.task.name!r}; available: humaneval")
    require_opt_in(cfg.allow_code_execution)  # before loading a model, not after
    t, output_dir = cfg.task, Path(cfg.output_dir)
    problems = load_problems(t.limit)
    completer, source = make_completer(cfg, problems)
    summary = evaluate(
        problems,
        completer,
        output_dir / "samples.jsonl",
        allow_code_execution=cfg.allow_code_execution,
        num_samples=t.num_samples,
        ks=list(t.ks),
        stop=list(t.stop),
        limits=Limits(**OmegaConf.to_container(t.sandbox)),
        workers=t.workers,
        batch_size=t.batch_size,
        progress=cfg.progress,
    )
    summary = {**summary, "source": source, "sampling": OmegaConf.to_container(t, resolve=True)}
    tmp = output_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, output_dir / "summary.json")
    print_summary(summary, source, output_dir)
    return summary


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> float | None:
    try:
        summary = run(cfg)
    except (CodeExecutionNotAllowed, EndpointError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    return summary["pass_at_k"].get("pass@1")


if __name__ == "__main__":
    main()

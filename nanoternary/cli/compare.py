"""`nanoternary-report`: every training run under outputs/ in one markdown table, plus train/val loss
and learning-rate curves against tokens seen, so runs (a sweep, tiny vs tiny_fp, ...) compare at a glance.

A run folder is any folder with `.hydra/config.yaml`; what it reports comes from the files the run
wrote: `.hydra/` (config, chosen options), `metrics.csv`, `summary.json` and `export/final/meta.json`.
Missing pieces (a run still going, or stopped early) show as "–".
"""

from __future__ import annotations

import csv
import fnmatch
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from nanoternary.cli.resolvers import register_resolvers
from nanoternary.io.atomic import atomic_file, atomic_write_text
from nanoternary.model.bitlinear import BitLinear
from nanoternary.model.config import ModelConfig
from nanoternary.model.transformer import TernaryLM

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
COLUMNS = ("run", "model", "params", "bits/weight", "tokens", "val/bpb", "tokens/s", "wall time", "commit")
MISSING = "–"
log = logging.getLogger(__name__)
register_resolvers()


@dataclass
class Run:
    """What one run folder says about itself."""

    name: str  # path relative to the scanned folder
    path: Path
    config: DictConfig
    choices: dict[str, Any]
    metrics: list[dict[str, float]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def setting(self, key: str) -> Any:
        """A config value, None where it is absent or does not resolve outside the run (${hydra:...})."""
        try:
            return OmegaConf.select(self.config, key, throw_on_resolution_failure=True)
        except Exception:  # OmegaConf raises several resolution error types
            return None

    def tokens_per_micro_batch(self) -> int | None:
        """Tokens one logged step stands for: batch x seq_len x ranks (from meta.json when it exists)."""
        step, accumulate = self.meta.get("step"), self.setting("optim.accumulate") or 1
        if step and self.meta.get("tokens_seen"):
            return int(self.meta["tokens_seen"]) // (int(step) * int(accumulate))
        batch, seq = self.setting("data.batch_size"), self.setting("data.seq_len")
        devices, nodes = self.setting("trainer.devices"), self.setting("trainer.num_nodes") or 1
        if not isinstance(batch, int) or not isinstance(seq, int):
            return None
        return batch * seq * (devices if isinstance(devices, int) else 1) * int(nodes)

    def curve(self, key: str) -> tuple[list[float], list[float]]:
        """(tokens, value) of every logged `key`; metrics.csv step s is micro-batch s, i.e. s + 1 batches seen."""
        per_step = self.tokens_per_micro_batch() or 1
        points = [((row["step"] + 1) * per_step, row[key]) for row in self.metrics if key in row]
        return [p[0] for p in points], [p[1] for p in points]


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        log.warning("skipping unreadable %s: %s", path, exc)
        return {}
    return value if isinstance(value, dict) else {}


def read_metrics(path: Path) -> list[dict[str, float]]:
    """metrics.csv rows with their empty cells dropped and every value a float."""
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [
            {k: float(v) for k, v in row.items() if k and v not in ("", None)} for row in csv.DictReader(f)
        ]


def find_runs(root: Path, select: list[str]) -> list[Path]:
    """Run folders under `root` (sorted), only those whose relative path matches one of `select` if given."""
    found = sorted(p.parent.parent for p in root.rglob(".hydra/config.yaml"))
    if select:
        found = [
            p for p in found if any(fnmatch.fnmatch(p.relative_to(root).as_posix(), pat) for pat in select)
        ]
    return found


def load_run(path: Path, root: Path, config: DictConfig | None = None) -> Run:
    """The run in folder `path`. `config` instead of its .hydra/config.yaml: train.py passes its own, since
    with `paths.output_dir=...` the run's files and Hydra's .hydra/ folder are in different places."""
    hydra_cfg = (
        OmegaConf.load(path / ".hydra" / "hydra.yaml") if (path / ".hydra" / "hydra.yaml").is_file() else None
    )
    choices = OmegaConf.to_container(hydra_cfg.hydra.runtime.choices) if hydra_cfg is not None else {}
    return Run(
        name=path.relative_to(root).as_posix(),
        path=path,
        config=config if config is not None else OmegaConf.load(path / ".hydra" / "config.yaml"),
        choices=choices,
        metrics=read_metrics(path / "metrics.csv"),
        summary=read_json(path / "summary.json"),
        meta=read_json(path / "export" / "final" / "meta.json"),
    )


def storage_bits(model: torch.nn.Module) -> float:
    """Mean bits per parameter when every quantized BitLinear weight is stored as a ternary code
    (log2 3 bits) plus one fp16 scale per group, and every other parameter (embeddings, norms, mHC,
    unquantized layers) as fp16: 16.0 for a float model, about 2 for the tiny ternary one."""
    ternary = scales = 0
    for module in model.modules():
        if isinstance(module, BitLinear) and module.quantize:
            numel = module.weight.numel()
            ternary += numel
            scales += numel // module.group_size if module.group_size else 1
    total = sum(p.numel() for p in model.parameters())
    return (ternary * math.log2(3) + 16 * scales + 16 * (total - ternary)) / total


def model_facts(run: Run) -> tuple[str, int | None, float | None]:
    """(model label, parameter count, storage bits per weight) from the run's model config."""
    cfg = run.meta.get("model") or (
        OmegaConf.to_container(run.config.model, resolve=True) if "model" in run.config else None
    )
    if cfg is None:
        return run.choices.get("model") or MISSING, None, None
    model_cfg = ModelConfig.from_dict(cfg)
    with torch.device("meta"):
        model = TernaryLM(model_cfg)
    label = f"{run.choices.get('model') or 'custom'} ({model_cfg.dim}d×{model_cfg.n_layers}L)"
    return label, model.num_parameters(), storage_bits(model)


def human(n: float | None, unit: str = "") -> str:
    if n is None:
        return MISSING
    for factor, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.3g}{suffix}{unit}"
    return f"{n:.3g}{unit}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return MISSING
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def final_bpb(run: Run) -> str:
    """The full held-out bpb of export/final (its meta.json then counts val_tokens); else the last
    periodic validation's, marked †."""
    if run.meta.get("val_tokens") and run.meta.get("val_bpb") is not None:
        return f"{run.meta['val_bpb']:.4f}"
    logged = run.curve("val/bpb")[1]
    return f"{logged[-1]:.4f}†" if logged else MISSING


def table_row(run: Run) -> dict[str, str]:
    label, params, bits = model_facts(run)
    tokens = run.meta.get("tokens_seen")
    if tokens is None and run.metrics:
        per_step = run.tokens_per_micro_batch()
        tokens = (max(r["step"] for r in run.metrics) + 1) * per_step if per_step else None
    speeds = run.curve("perf/tokens_per_sec")[1]
    commit = run.meta.get("git_commit")
    return {
        "run": run.name,
        "model": label,
        "params": human(params),
        "bits/weight": f"{bits:.2f}" if bits is not None else MISSING,
        "tokens": human(tokens),
        "val/bpb": final_bpb(run),
        "tokens/s": human(sum(speeds) / len(speeds)) if speeds else MISSING,
        "wall time": duration(run.summary.get("wall_seconds")),
        "commit": commit[:8] if commit else MISSING,
    }


def markdown_table(rows: list[dict[str, str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(row[c].replace("|", "\\|") for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_runs(runs: list[Run], out_dir: Path) -> list[Path]:
    """loss.png (train and val loss) and lr.png (every train/lr_* of every run) against tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, (train_ax, val_ax) = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        train_ax.plot(*run.curve("train/loss"), color=color, lw=1, label=run.name)
        val_ax.plot(*run.curve("val/loss"), color=color, marker="o", ms=3, label=run.name)
    for ax, title in ((train_ax, "train/loss"), (val_ax, "val/loss")):
        ax.set(title=title, xlabel="tokens seen", ylabel="nats per token")
        ax.grid(alpha=0.3)
    val_ax.legend(fontsize=7)
    written.append(save_figure(fig, out_dir / "loss.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, run in enumerate(runs):
        lr_keys = sorted({k for row in run.metrics for k in row if k.startswith("train/lr_")})
        for key, style in zip(lr_keys, ("-", "--", ":", "-."), strict=False):
            ax.plot(
                *run.curve(key), color=f"C{i % 10}", ls=style, label=f"{run.name} {key[len('train/lr_') :]}"
            )
    ax.set(title="learning rate", xlabel="tokens seen", ylabel="lr", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    written.append(save_figure(fig, out_dir / "lr.png"))
    return written


def save_figure(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def write_report(root: Path, out_dir: Path, select: list[str] | None = None) -> tuple[Path, list[Path]]:
    """Scan `root` for runs and write report.md, loss.png and lr.png into `out_dir`."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"runs_dir={root} does not exist: train something first (make train)")
    paths = find_runs(root, list(select or []))
    if not paths:
        what = f" matching {list(select)}" if select else ""
        raise FileNotFoundError(f"no run folders (with .hydra/config.yaml) under {root}{what}")
    runs = [load_run(p, root) for p in paths]
    out_dir.mkdir(parents=True, exist_ok=True)
    notes = (
        "val/bpb: bits per byte on the whole held-out split at the end of training (export/final); "
        "† = last periodic validation only. bits/weight: ternary codes at log2(3) bits + fp16 group scales, "
        "other parameters fp16. tokens/s: mean over the logged intervals."
    )
    text = f"# Runs under {root}\n\n{markdown_table([table_row(r) for r in runs])}\n{notes}\n\n![loss](loss.png)\n![lr](lr.png)\n"
    report = out_dir / "report.md"
    atomic_write_text(report, text)
    return report, plot_runs(runs, out_dir)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="report")
def main(cfg: DictConfig) -> None:
    report, figures = write_report(Path(cfg.runs_dir), Path(cfg.out_dir), list(cfg.select))
    print(report.read_text(encoding="utf-8"))
    print(f"wrote {report} and {', '.join(str(p) for p in figures)}")


if __name__ == "__main__":
    main()

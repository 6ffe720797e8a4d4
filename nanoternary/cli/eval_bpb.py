"""`nanoternary-eval-bpb export=<model folder or .gguf> [data=...]`: held-out loss and bits per byte of a
model, next to gzip -9, bzip2 -9 and xz -9e on the same held-out text.

A .gguf (either arch) is scored by the inference engine's fp32 backend, the training forward's arithmetic
on the file's own codes and scales, so a GGUF's figure checks the export as well as the model.

The held-out text is tokenized with the model folder's own tokenizer (cached like training's), cut into
non-overlapping windows of the model's context length, and every token is scored once. The table goes to
stderr and the JSON to stdout, so `nanoternary-eval-bpb ... | jq` works.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from rich.console import Console
from torch.utils.data import DataLoader
from tqdm import tqdm

from nanoternary.cli.report import heldout_table
from nanoternary.cli.resolvers import register_resolvers
from nanoternary.data.datamodule import TokenDataModule, Windows
from nanoternary.evals.bpb import compression_bpb, evaluate_heldout
from nanoternary.infer.engine import Engine
from nanoternary.io.export_dir import load_export

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
log = logging.getLogger(__name__)
register_resolvers()


class EngineLM(torch.nn.Module):
    """An inference Engine as a (batch, seq) -> logits model, so a GGUF file is scored like a model folder."""

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self.engine, self.cfg = engine, engine.cfg

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.engine.score(row.tolist()) for row in inputs]).to(inputs.device)


def evaluate_export(cfg: DictConfig) -> dict[str, Any]:
    """Score the model folder or .gguf `cfg.export` on the held-out split of `cfg.data`."""
    path = Path(cfg.export).expanduser()
    if path.suffix == ".gguf":
        engine = Engine.from_path(path, cfg.device, backend="fp32")
        model, meta, tokenizer = EngineLM(engine), engine.meta, engine.tokenizer
    else:
        model, meta, tokenizer = load_export(path, cfg.device)
    context = model.cfg.context_length
    with open_dict(cfg.data):
        cfg.data.seq_len = context
        cfg.data.vocab_size = tokenizer.vocab_size
        cfg.data.tokenizer_path = None
    datamodule: TokenDataModule = instantiate(cfg.data)
    if not datamodule.has_text:
        raise ValueError(
            f"data.source={datamodule.source_name!r} is token-id data: bits per byte is undefined"
        )
    windows = Windows(datamodule.split_tokens("val", tokenizer), context)
    batches = tqdm(
        DataLoader(windows, batch_size=cfg.batch_size), desc="scoring held-out windows", disable=None
    )
    token_bytes = torch.tensor(tokenizer.token_bytes(), device=cfg.device)
    score = evaluate_heldout(model, batches, token_bytes, tokenizer.eot_id)
    heldout = datamodule.heldout_bytes()
    return {
        "export": str(path),
        "step": meta.get("step"),
        "data": datamodule.source_name,
        "val/loss": score.loss,
        "val/bpb": score.bpb,
        "val/tokens": score.tokens,
        "val/bytes": score.bytes,  # bytes of the scored tokens: all held-out text but the first token
        "heldout_bytes": len(heldout),  # what the compressors saw
        "baselines_bpb": compression_bpb(heldout),
    }


def write_json(result: dict[str, Any], output_dir: Path) -> Path:
    """output_dir/bpb.json, written to a temp name and renamed."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path, tmp = output_dir / "bpb.json", output_dir / ".bpb.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval_bpb")
def main(cfg: DictConfig) -> float | None:
    try:
        result = evaluate_export(cfg)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    title = f"held-out {result['data']} ({result['heldout_bytes']:,} bytes) · {result['export']}"
    Console(stderr=True).print(
        heldout_table(title, result["val/loss"], result["val/bpb"], result["baselines_bpb"])
    )
    log.info("wrote %s", write_json(result, Path(cfg.paths.output_dir)))
    print(json.dumps(result))
    return result["val/bpb"]


if __name__ == "__main__":
    main()

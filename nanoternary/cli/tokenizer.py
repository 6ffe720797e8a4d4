"""`nanoternary-tokenizer [data=...] [vocab_size=N]`: train or inspect a tokenizer on any data config and
report its bytes per token on the held-out split.

It builds exactly what `train.py` with the same data config would use (same cache keys), so running it
first also warms the cache for training. The table goes to stderr and the JSON to stdout.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from nanoternary.cli.resolvers import register_resolvers
from nanoternary.data.datamodule import TokenDataModule
from nanoternary.data.tokenizer import TextTokenizer

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
log = logging.getLogger(__name__)
register_resolvers()


def heldout_bytes_per_token(tokenizer: TextTokenizer, tokens: np.ndarray) -> tuple[int, int]:
    """(UTF-8 bytes, tokens) of a held-out stream, end-of-text separators not counted as tokens."""
    ids = np.asarray(tokens)
    return int(tokenizer.token_bytes()[ids].sum()), int((ids != tokenizer.eot_id).sum())


def inspect_tokenizer(cfg: DictConfig) -> dict[str, Any]:
    datamodule: TokenDataModule = instantiate(cfg.data)
    if not datamodule.has_text:
        raise ValueError(f"data.source={datamodule.source_name!r} is token-id data: it has no tokenizer")
    tokenizer = datamodule.tokenizer()
    nbytes, ntokens = heldout_bytes_per_token(tokenizer, datamodule.split_tokens("val", tokenizer))
    # special tokens count 0 bytes, so they never make the list
    longest = np.argsort(-tokenizer.token_bytes(), kind="stable")[: cfg.longest]
    sample_ids = tokenizer.encode(cfg.sample)
    result: dict[str, Any] = {
        "tokenizer": str(datamodule.tokenizer_file()),
        "fingerprint": tokenizer.fingerprint,
        "vocab_size": tokenizer.vocab_size,
        "data": datamodule.source_name,
        "heldout_bytes": nbytes,
        "heldout_tokens": ntokens,
        "bytes_per_token": nbytes / ntokens if ntokens else None,
        "sample_tokens": [tokenizer.decode([i]) for i in sample_ids],
        "longest_tokens": [tokenizer.decode([int(i)]) for i in longest],
    }
    stats = getattr(datamodule.documents, "stats", None)
    if stats:  # the files source counts what it read and skipped
        result["scan"] = {split: s.as_dict() for split, s in stats.items()}
    if cfg.save_to:
        dest = Path(cfg.save_to).expanduser()
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(datamodule.tokenizer_file(), dest)
        result["saved_to"] = str(dest)
    return result


def print_table(result: dict[str, Any]) -> None:
    table = Table(title=f"tokenizer on held-out {result['data']}")
    table.add_column("")
    table.add_column("value")
    table.add_row("file", result["tokenizer"])
    table.add_row("vocab size", f"{result['vocab_size']:,}")
    table.add_row("held-out bytes / tokens", f"{result['heldout_bytes']:,} / {result['heldout_tokens']:,}")
    table.add_row(
        "bytes per token", f"{result['bytes_per_token']:.3f}" if result["bytes_per_token"] else "n/a"
    )
    table.add_row("sample", " | ".join(repr(t) for t in result["sample_tokens"]))
    table.add_row("longest tokens", " | ".join(repr(t) for t in result["longest_tokens"]))
    for split, stats in result.get("scan", {}).items():
        table.add_row(
            f"{split} files / docs / skipped", f"{stats['files']} / {stats['documents']} / {stats['skipped']}"
        )
    Console(stderr=True).print(table)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="tokenizer")
def main(cfg: DictConfig) -> None:
    try:
        result = inspect_tokenizer(cfg)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    print_table(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

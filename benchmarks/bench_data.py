"""`make bench-data`: how fast data=files tokenizes a large corpus, and whether memory stays flat.

The corpus is >= 200 MB of copies of this interpreter's stdlib (*.py, test suites excluded), hard-linked
(or copied) into a temp dir that is deleted afterwards. The tokenizer is trained once on one copy and
handed over as data.tokenizer_path, so the figures measure tokenization, not BPE training. Each measured
run is a fresh child process, so its peak RSS is its own:

  one copy, cold   hash both splits, tokenize both into the cache
  all copies, cold the same at >= 16x the size: peak RSS should not grow with it
  all copies, warm the same inputs again: the cache is reused, only hashing remains

Prints a table and a JSON line. `--min-mb` changes the corpus size (e.g. 20 for a quick look).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from nanoternary.data.datamodule import TokenDataModule
from nanoternary.data.sources import stdlib_files
from nanoternary.data.tokenizer import TextTokenizer

VOCAB_SIZE = 4096
MAX_FILE_BYTES = 50_000_000  # keep every stdlib file: the bench measures bytes, not the default filter


def build_corpus(root: Path, min_bytes: int) -> tuple[int, int]:
    """Copies of the stdlib under root/copy_XX/ until they hold >= min_bytes; returns (copies, bytes)."""
    files = stdlib_files()
    one_copy = sum(path.stat().st_size for _, path in files)
    copies = max(1, math.ceil(min_bytes / one_copy))
    for c in range(copies):
        for name, src in files:
            dst = root / f"copy_{c:02d}" / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:  # another file system
                shutil.copyfile(src, dst)
    return copies, copies * one_copy


def measure(paths: list[str], tokenizer: Path, cache: Path) -> dict[str, float]:
    """Child process body: prepare the token caches of both splits and time each phase."""
    dm = TokenDataModule("files", 8, 256, VOCAB_SIZE, str(cache), paths=paths, tokenizer_path=str(tokenizer),
                         max_file_bytes=MAX_FILE_BYTES)  # fmt: skip
    tok = dm.tokenizer()
    t0 = time.perf_counter()
    dm.split_hash("train"), dm.split_hash("val")
    t1 = time.perf_counter()
    tokens = sum(len(dm.split_tokens(split, tok)) for split in ("train", "val"))
    t2 = time.perf_counter()
    corpus_bytes = sum(s.bytes for s in dm.documents.stats.values())
    return {
        "bytes": corpus_bytes,
        "tokens": tokens,
        "hash_s": t1 - t0,
        "tokenize_s": t2 - t1,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_child(paths: list[str], tokenizer: Path, cache: Path) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", json.dumps({"paths": paths, "tokenizer": str(tokenizer),
                                                            "cache": str(cache)})]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-mb", type=float, default=200.0, help="corpus size to build (MB, default 200)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(measure(spec["paths"], Path(spec["tokenizer"]), Path(spec["cache"]))))
        return
    console = Console()
    with tempfile.TemporaryDirectory(prefix="nt-bench-data-") as tmp:
        root = Path(tmp)
        copies, nbytes = build_corpus(root / "corpus", int(args.min_mb * 1e6))
        console.print(f"corpus: {copies} copies of the stdlib, {nbytes / 1e6:.1f} MB in {root / 'corpus'}")
        t0 = time.perf_counter()
        texts = (p.read_text(encoding="utf-8") for p in sorted((root / "corpus" / "copy_00").rglob("*.py")))
        tokenizer_path = root / "tokenizer.json"
        TextTokenizer.train(texts, VOCAB_SIZE).save(tokenizer_path)
        train_s = time.perf_counter() - t0
        one = [str(root / "corpus" / "copy_00")]
        everything = [str(root / "corpus")]
        runs = {
            "one copy, cold": run_child(one, tokenizer_path, root / "cache-one"),
            "all copies, cold": run_child(everything, tokenizer_path, root / "cache-all"),
            "all copies, warm": run_child(everything, tokenizer_path, root / "cache-all"),
        }
    table = Table(title=f"data=files tokenization ({os.cpu_count()} CPUs, vocab {VOCAB_SIZE})")
    for column in ("run", "MB", "tokens", "hash s", "tokenize s", "tokenize MB/s", "peak RSS MB"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for name, r in runs.items():
        rate = r["bytes"] / 1e6 / r["tokenize_s"] if "cold" in name else None  # warm: a cache read
        r["tokenize_mb_per_s"] = rate
        table.add_row(name, f"{r['bytes'] / 1e6:.1f}", f"{r['tokens']:,}", f"{r['hash_s']:.1f}",
                      f"{r['tokenize_s']:.1f}", f"{rate:.2f}" if rate else "cached", f"{r['peak_rss_mb']:.0f}")  # fmt: skip
    console.print(table)
    console.print(f"BPE training on one copy ({nbytes / copies / 1e6:.1f} MB): {train_s:.1f} s")
    print(json.dumps({"copies": copies, "corpus_mb": nbytes / 1e6, "bpe_train_s": train_s, "runs": runs}))


if __name__ == "__main__":
    main()

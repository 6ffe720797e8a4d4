"""Token cache: a corpus split tokenized once into a flat uint16/uint32 file, then memory-mapped.

Documents are joined with the end-of-text id. The file is written to a temp name and renamed, so an
interrupted run leaves no half cache behind; the key (in the file name) covers corpus and tokenizer.
Encoding streams in chunks bounded by document count and bytes, so memory stays flat however large
the corpus; a progress bar (bytes, rate) shows on a terminal.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nanoternary.data.sources import Document
from nanoternary.data.tokenizer import TextTokenizer

ENCODE_CHUNK_DOCS = 256
ENCODE_CHUNK_BYTES = 1 << 20  # ~300k tokens in flight: HF Encoding objects are ~100 bytes a token


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def _chunks(docs: Iterable[Document], max_docs: int, max_chars: int) -> Iterator[list[str]]:
    """Texts in groups of at most `max_docs` documents and (beyond one document) `max_chars` characters."""
    chunk: list[str] = []
    chars = 0
    for d in docs:
        chunk.append(d.text)
        chars += len(d.text)
        if len(chunk) == max_docs or chars >= max_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def build_token_file(
    docs: Iterable[Document], tokenizer: TextTokenizer, path: Path, progress: bool | None = None
) -> int:
    """Stream-encode `docs` into `path` (each document followed by EOT); returns the token count.

    progress: True/False forces the bar on/off; None shows it only on a terminal.
    """
    dtype = token_dtype(tokenizer.vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    count = 0
    disable = None if progress is None else not progress
    bar = tqdm(desc=f"tokenizing {path.name}", unit="B", unit_scale=True, disable=disable)
    try:
        with open(tmp, "wb") as f, bar:
            for texts in _chunks(docs, ENCODE_CHUNK_DOCS, ENCODE_CHUNK_BYTES):
                for ids in tokenizer.encode_batch(texts):
                    ids.append(tokenizer.eot_id)
                    f.write(np.asarray(ids, dtype=dtype).tobytes())
                    count += len(ids)
                bar.update(sum(len(t.encode("utf-8")) for t in texts))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return count


def load_tokens(path: Path, vocab_size: int) -> np.ndarray:
    """Read-only memmap of a token file; a clear error for a missing or empty one."""
    if not path.is_file():
        raise FileNotFoundError(f"token cache not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"token cache is empty: {path}")
    return np.memmap(path, dtype=token_dtype(vocab_size), mode="r")


def cached_tokens(docs: Iterable[Document], tokenizer: TextTokenizer, path: Path) -> np.ndarray:
    """Memmap of `path`, building it from `docs` first if it does not exist."""
    if not path.is_file() and build_token_file(docs, tokenizer, path) == 0:
        raise ValueError(f"no tokens produced for {path}")
    return load_tokens(path, tokenizer.vocab_size)

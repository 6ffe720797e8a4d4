"""Token cache: a corpus split tokenized once into a flat uint16/uint32 file, then memory-mapped.

Documents are joined with the end-of-text id. The file is written to a temp name and renamed, so an
interrupted run leaves no half cache behind; the key (in the file name) covers corpus and tokenizer.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from nanoternary.data.sources import Document
from nanoternary.data.tokenizer import TextTokenizer

ENCODE_CHUNK_DOCS = 256


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def _chunks(docs: Iterable[Document], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for d in docs:
        chunk.append(d.text)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def build_token_file(docs: Iterable[Document], tokenizer: TextTokenizer, path: Path) -> int:
    """Stream-encode `docs` into `path` (each document followed by EOT); returns the token count."""
    dtype = token_dtype(tokenizer.vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    count = 0
    try:
        with open(tmp, "wb") as f:
            for texts in _chunks(docs, ENCODE_CHUNK_DOCS):
                for ids in tokenizer.encode_batch(texts):
                    ids.append(tokenizer.eot_id)
                    f.write(np.asarray(ids, dtype=dtype).tobytes())
                    count += len(ids)
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
    if not path.is_file():
        if build_token_file(docs, tokenizer, path) == 0:
            raise ValueError(f"no tokens produced for {path}")
    return load_tokens(path, tokenizer.vocab_size)

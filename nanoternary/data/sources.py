"""Corpus sources: where documents come from and which split each belongs to.

A document is (name, text). The split of a document is a pure function of its name (sha256 of the
relative path mod `holdout_mod`), so the same file can never land in both splits and the split never
depends on the file order or on which other files exist.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

EXCLUDED_STDLIB_DIRS = frozenset({"test", "tests", "site-packages"})


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def is_heldout(name: str, holdout_mod: int) -> bool:
    """REFERENCE.md section 7: held out iff sha256(relative path) is 0 mod `holdout_mod`."""
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % holdout_mod == 0


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """Sorted (relative name, path) of the interpreter's own *.py stdlib files, minus its test suites."""
    root = root or stdlib_root()
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if EXCLUDED_STDLIB_DIRS.isdisjoint(rel.parts):
            found.append((rel.as_posix(), path))
    if not found:
        raise FileNotFoundError(f"no Python source files found under the stdlib directory {root}")
    return sorted(found)


def stdlib_documents(split: str, holdout_mod: int = 20, root: Path | None = None) -> Iterator[Document]:
    """Documents of one split ('train' or 'val') of the stdlib corpus, in a fixed order."""
    want_val = wants_heldout(split)
    for name, path in stdlib_files(root):
        if is_heldout(name, holdout_mod) == want_val:
            yield Document(name, path.read_text(encoding="utf-8", errors="replace"))


def wants_heldout(split: str) -> bool:
    """True for 'val', False for 'train', a clear error for anything else."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    return split == "val"


def split_documents(docs: Iterator[Document], split: str, holdout_mod: int) -> Iterator[Document]:
    """Filter any document stream down to one split by name hash."""
    want_val = wants_heldout(split)
    return (d for d in docs if is_heldout(d.name, holdout_mod) == want_val)


def corpus_fingerprint(docs: Iterator[Document]) -> str:
    """sha256 over names and texts: the cache key of everything derived from a corpus."""
    h = hashlib.sha256()
    for d in docs:
        h.update(d.name.encode())
        h.update(b"\0")
        h.update(d.text.encode("utf-8", errors="replace"))
        h.update(b"\0")
    return h.hexdigest()

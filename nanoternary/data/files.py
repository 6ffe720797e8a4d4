"""The `files` data source: the user's own files, directories, globs and JSONL files.

`data.paths` entries may be files, directories (walked recursively) or glob patterns (`**` allowed).
A document's name is its path relative to the parent of the entry's root (the directory given, the
fixed directory prefix of a glob, or the file itself), e.g. `myrepo/pkg/mod.py` for `data.paths=[myrepo]`.
Names, not absolute paths, decide the split, so moving the corpus never moves a file between splits.
A JSONL file (`*.jsonl`) yields one document per line, named `<file name>:<line number>`, from the
configured text field.

Nothing in the corpus can crash a run: binary files (a NUL byte in the first 8 KiB), files that are not
valid UTF-8, empty files, files over `max_file_bytes` (for JSONL: records whose text is over it),
unreadable files and malformed JSONL records are skipped and counted in `ScanStats`. Hidden files and
directories (a name part starting with '.') are skipped unless given directly.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nanoternary.data.sources import Document, is_heldout, wants_heldout

log = logging.getLogger(__name__)

JSONL_SUFFIX = ".jsonl"
BINARY_SNIFF_BYTES = 8192
DEFAULT_MAX_FILE_BYTES = 1_000_000
GLOB_CHARS = frozenset("*?[")


@dataclass
class ScanStats:
    """What one pass over a split found; every skipped file or record is counted under its reason."""

    files: int = 0  # files read; a JSONL file is read for both splits
    documents: int = 0
    bytes: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def as_dict(self) -> dict:
        return asdict(self)


def _is_glob(entry: str) -> bool:
    return not GLOB_CHARS.isdisjoint(entry)


def _glob_root(pattern: str) -> Path:
    """The fixed directory prefix of a glob pattern: `src/**/*.py` -> `src`."""
    fixed = []
    for part in Path(pattern).parts:
        if _is_glob(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _walk(root: Path) -> Iterator[Path]:
    """Regular files under `root`, hidden entries and symlinked directories skipped."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            path = Path(dirpath, name)
            if not name.startswith(".") and path.is_file():
                yield path


def _expand(entry: str) -> list[tuple[str, Path]]:
    """(name, path) of every regular file one `data.paths` entry stands for."""
    if _is_glob(entry):
        root = Path(os.path.abspath(_glob_root(entry)))
        matches = [Path(m) for m in sorted(glob.glob(entry, recursive=True))]
        found: list[tuple[str, Path]] = []
        for match in matches:
            files = _walk(match) if match.is_dir() else [match] if match.is_file() else []
            for path in files:
                rel = Path(os.path.abspath(path)).relative_to(root)
                if not _is_hidden(rel):
                    found.append(((Path(root.name) / rel).as_posix(), path))
        if not found:
            raise FileNotFoundError(f"data.paths entry {entry!r} matches no file")
        return found
    path = Path(entry).expanduser()
    if path.is_file():
        return [(path.name, path)]
    if path.is_dir():
        root_name = Path(os.path.abspath(path)).name
        return [((Path(root_name) / p.relative_to(path)).as_posix(), p) for p in _walk(path)]
    raise FileNotFoundError(
        f"data.paths entry {entry!r} is not a file, a directory or a glob that matches files"
    )


class FilesSource:
    """A DocumentSource over user files: call it with 'train' or 'val'."""

    def __init__(
        self,
        paths: Sequence[str],
        holdout_mod: int,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        text_field: str = "text",
    ) -> None:
        if isinstance(paths, str) or not paths:
            raise ValueError(
                "data.paths must be a non-empty list of files, directories or globs, e.g. data.paths=[src]"
            )
        if max_file_bytes < 1:
            raise ValueError(f"data.max_file_bytes must be >= 1, got {max_file_bytes}")
        if not text_field:
            raise ValueError("data.text_field must name the JSONL field that holds the text")
        self.paths, self.holdout_mod = [str(p) for p in paths], holdout_mod
        self.include, self.exclude = list(include), list(exclude)
        self.max_file_bytes, self.text_field = max_file_bytes, text_field
        self.stats: dict[str, ScanStats] = {}
        self._reported: set[str] = set()

    def wanted(self, name: str) -> bool:
        """include/exclude are shell patterns matched against the document name (`*` also matches '/')."""
        if self.include and not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)

    def files(self) -> list[tuple[str, Path]]:
        """Sorted (name, path) of every selected file, each real file once whichever entries reach it."""
        seen: set[Path] = set()
        chosen = []
        for entry in self.paths:
            for name, path in _expand(entry):
                real = path.resolve()
                if real not in seen and self.wanted(name):
                    seen.add(real)
                    chosen.append((name, path))
        return sorted(chosen)

    def __call__(self, split: str) -> Iterator[Document]:
        want_val = wants_heldout(split)
        stats = ScanStats()
        for name, path in self.files():
            if path.name.endswith(JSONL_SUFFIX):
                stats.files += 1
                yield from self._records(name, path, want_val, stats)
            elif is_heldout(name, self.holdout_mod) == want_val:
                stats.files += 1
                text = self._read_text(path, stats)
                if text is not None:
                    yield self._count(Document(name, text), stats)
        self.stats[split] = stats
        if split not in self._reported:
            self._reported.add(split)
            log.info("data.paths %s split: %s", split, stats.as_dict())

    @staticmethod
    def _count(doc: Document, stats: ScanStats) -> Document:
        stats.documents += 1
        stats.bytes += len(doc.text.encode("utf-8"))
        return doc

    def _read_text(self, path: Path, stats: ScanStats) -> str | None:
        try:
            size = path.stat().st_size
            if size > self.max_file_bytes:
                stats.skip("too_large")
                return None
            raw = path.read_bytes()
        except OSError:
            stats.skip("unreadable")
            return None
        return self._decode(raw, stats)

    @staticmethod
    def _decode(raw: bytes, stats: ScanStats) -> str | None:
        if b"\0" in raw[:BINARY_SNIFF_BYTES]:
            stats.skip("binary")
            return None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            stats.skip("undecodable")
            return None
        if not text.strip():
            stats.skip("empty")
            return None
        return text

    def _records(self, name: str, path: Path, want_val: bool, stats: ScanStats) -> Iterator[Document]:
        """The split's documents of a JSONL file, one per line; blank lines are ignored, bad ones counted
        (in the split their line name hashes to, like any document)."""
        try:
            with open(path, "rb") as f:
                for lineno, line in enumerate(f, start=1):
                    record = f"{name}:{lineno}"
                    if not line.strip() or is_heldout(record, self.holdout_mod) != want_val:
                        continue
                    text = self._record_text(line, stats)
                    if text is not None:
                        yield self._count(Document(record, text), stats)
        except OSError:
            stats.skip("unreadable")

    def _record_text(self, line: bytes, stats: ScanStats) -> str | None:
        try:
            record = json.loads(line)
        except UnicodeDecodeError:
            stats.skip("undecodable")
            return None
        except ValueError:
            stats.skip("bad_record")
            return None
        text = record.get(self.text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            stats.skip("bad_record")
            return None
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:  # a lone surrogate escaped in the JSON
            stats.skip("undecodable")
            return None
        if size > self.max_file_bytes:
            stats.skip("too_large")
            return None
        if not text.strip():
            stats.skip("empty")
            return None
        return text

"""Shared fixtures: one token cache for the whole session, so the stdlib tokenizer is trained once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide NANOTERNARY_CACHE (tests never touch the user's ~/.cache)."""
    path = Path(os.environ.get("NANOTERNARY_TEST_CACHE", tmp_path_factory.mktemp("nt-cache")))
    os.environ["NANOTERNARY_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def code_corpus(cache_dir: Path):
    """The prepared stdlib corpus (tokenizer + token caches) used by several tests."""
    from nanoternary.data.datamodule import TokenDataModule

    dm = TokenDataModule(source="code", batch_size=4, seq_len=64, vocab_size=4096, cache_dir=str(cache_dir))
    return dm, dm.prepare()

"""The token cache: reused for the same inputs, rebuilt for changed ones, uint16/uint32, never half-written."""

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from nanoternary.data.cache import build_token_file, load_tokens, token_dtype
from nanoternary.data.datamodule import TokenDataModule
from nanoternary.data.sources import Document, is_heldout
from nanoternary.data.tokenizer import EOT, TextTokenizer

FILES = {f"src/mod_{i}.py": f"def f_{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(24)}


def write_tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")


def snapshot(cache: Path) -> dict[str, int]:
    """Every cache file and its modification time: a rebuild or a new key shows up here."""
    return {
        p.relative_to(cache).as_posix(): p.stat().st_mtime_ns for p in sorted(cache.rglob("*")) if p.is_file()
    }


def make_dm(root: Path, cache: Path, **kw) -> TokenDataModule:
    return TokenDataModule("files", 2, 8, 300, str(cache), holdout_mod=4, paths=[str(root / "src")], **kw)


def first_of_split(want_val: bool) -> str:
    return next(n for n in sorted(FILES) if is_heldout(f"src/{Path(n).name}", 4) == want_val)


def test_reuse_and_invalidation(tmp_path: Path):
    root, cache = tmp_path / "corpus", tmp_path / "cache"
    write_tree(root, FILES)
    dm = make_dm(root, cache)
    first = dm.prepare()
    built = snapshot(cache)
    assert [k.split("-")[0] for k in built] == ["tokenizers/" + dm.tokenizer_file().name.split("-")[0],
                                                "tokens/train", "tokens/val"]  # fmt: skip

    again = make_dm(root, cache).prepare()  # same inputs: nothing is rebuilt
    assert snapshot(cache) == built
    assert np.array_equal(again.train_tokens, first.train_tokens)

    (root / first_of_split(want_val=True)).write_text("def changed():\n    pass\n")  # a held-out file
    make_dm(root, cache).prepare()
    after_val_edit = snapshot(cache)
    new = sorted(set(after_val_edit) - set(built))
    assert [n.split("-")[0] for n in new] == ["tokens/val"]  # same tokenizer, same train tokens
    assert {k: after_val_edit[k] for k in built} == built

    (root / first_of_split(want_val=False)).write_text("class Changed:\n    pass\n")  # a training file
    make_dm(root, cache).prepare()
    new = sorted(set(snapshot(cache)) - set(after_val_edit))
    assert any(n.startswith("tokenizers/") for n in new) and any(n.startswith("tokens/train-") for n in new)

    before = snapshot(cache)
    given = make_dm(root, cache, tokenizer_path=str(dm.tokenizer_file()))  # the first, now stale, tokenizer
    assert given.prepare().tokenizer_hash == first.tokenizer_hash
    assert {k: snapshot(cache)[k] for k in before} == before  # used as is, nothing overwritten


def test_a_changed_setting_changes_the_key(tmp_path: Path):
    root, cache = tmp_path / "corpus", tmp_path / "cache"
    write_tree(root, FILES)
    a, b = (
        make_dm(root, cache),
        TokenDataModule("files", 2, 8, 280, str(cache), holdout_mod=4, paths=[str(root / "src")]),
    )
    assert a.settings_key() != b.settings_key()
    assert a.tokenizer_file() != b.tokenizer_file()


def word_level(vocab_size: int) -> TextTokenizer:
    """A real tokenizer whose ids go past 65535: one token per whitespace-separated word."""
    vocab = {f"w{i}": i for i in range(vocab_size - 1)} | {EOT: vocab_size - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=EOT))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return TextTokenizer(tok)


def test_uint16_until_65536_ids_then_uint32(tmp_path: Path):
    assert (
        token_dtype(4096) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    )
    tok = word_level(70_000)
    docs = [Document("a", "w1 w65535 w69998"), Document("b", "w70000 w2")]  # w70000 is unknown -> EOT id
    path = tmp_path / "big.bin"
    assert build_token_file(docs, tok, path, progress=False) == 7
    assert path.stat().st_size == 7 * 4
    assert load_tokens(path, tok.vocab_size).tolist() == [1, 65535, 69998, 69999, 69999, 2, 69999]


def test_an_interrupted_build_leaves_nothing_behind(tmp_path: Path):
    tok = word_level(10)

    def docs():
        yield Document("a", "w1 w2")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_token_file(docs(), tok, tmp_path / "t.bin", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_progress_bar_reports_bytes(tmp_path: Path, capsys):
    build_token_file([Document("a", "w1 w2 w3")], word_level(10), tmp_path / "t.bin", progress=True)
    err = capsys.readouterr().err
    assert "tokenizing t.bin" in err and "8.00B" in err

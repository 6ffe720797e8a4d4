"""data=files on a real temp tree: nested dirs, globs, binary / non-UTF-8 / empty / too-large files, JSONL."""

import json
from pathlib import Path

import numpy as np
import pytest

from nanoternary.data.datamodule import TokenDataModule, make_source
from nanoternary.data.files import FilesSource
from nanoternary.data.sources import is_heldout

TEXTS = {
    "repo/pkg/core.py": "def add(a, b):\n    return a + b\n",
    "repo/pkg/sub/deep.py": "class Deep:\n    level = 3\n",
    "repo/pkg/sub/notes.md": "# notes\nsome prose\n",
    "repo/top.py": "import os\nprint(os.getcwd())\n",
    "repo/tests/test_core.py": "def test_add():\n    assert 1 + 1 == 2\n",
}
RECORDS = [  # line -> (raw line, text or None)
    ('{"text": "def f():\\n    return 1\\n"}', "def f():\n    return 1\n"),
    ("", None),  # blank line: ignored, not counted
    ('{"text": 5}', None),  # bad record
    ("not json", None),  # bad record
    ('{"content": "def g(): pass"}', None),  # bad record: no text field
    ('{"text": "   "}', None),  # empty
    ('{"text": "x = \\ud800"}', None),  # lone surrogate: undecodable
    ('{"text": "print(\'jsonl\')\\n"}', "print('jsonl')\n"),
]


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    for name, text in TEXTS.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    (tmp_path / "repo/pkg/blob.bin").write_bytes(b"\x7fELF\x00\x01\x02" + b"x" * 100)
    (tmp_path / "repo/pkg/latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    (tmp_path / "repo/pkg/empty.py").write_bytes(b"")
    (tmp_path / "repo/pkg/huge.py").write_text("x = 1\n" * 100, encoding="utf-8")  # 600 bytes > limit
    (tmp_path / "repo/.git").mkdir()
    (tmp_path / "repo/.git/config").write_text("[core]\n", encoding="utf-8")
    (tmp_path / "repo/data.jsonl").write_text("\n".join(line for line, _ in RECORDS) + "\n", encoding="utf-8")
    return tmp_path


def collect(source: FilesSource) -> tuple[dict[str, str], dict[str, str], dict[str, int]]:
    train = {d.name: d.text for d in source("train")}
    val = {d.name: d.text for d in source("val")}
    skipped: dict[str, int] = {}
    for stats in source.stats.values():
        for reason, n in stats.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
    return train, val, skipped


def expected_documents() -> dict[str, str]:
    docs = dict(TEXTS)
    for lineno, (_, text) in enumerate(RECORDS, start=1):
        if text is not None:
            docs[f"repo/data.jsonl:{lineno}"] = text
    return docs


def test_directory_walk_reads_text_skips_and_counts_the_rest(tree: Path):
    source = FilesSource([str(tree / "repo")], holdout_mod=3, max_file_bytes=500)
    train, val, skipped = collect(source)
    assert {**train, **val} == expected_documents()
    assert set(train).isdisjoint(val)
    assert sorted(val) == sorted(n for n in expected_documents() if is_heldout(n, 3))
    assert skipped == {"binary": 1, "undecodable": 2, "empty": 2, "too_large": 1, "bad_record": 3}
    total_docs = sum(s.documents for s in source.stats.values())
    assert total_docs == len(expected_documents())
    assert sum(s.bytes for s in source.stats.values()) == sum(
        len(t.encode()) for t in expected_documents().values()
    )


def test_globs_include_exclude_and_dedup(tree: Path):
    source = FilesSource(
        [f"{tree}/repo/**/*.py", str(tree / "repo/top.py")], holdout_mod=2, exclude=["*/tests/*"]
    )
    names = [name for name, _ in source.files()]
    # the glob root is repo/, so names match the directory walk's; top.py reached twice is read once
    assert names == ["repo/pkg/core.py", "repo/pkg/empty.py", "repo/pkg/huge.py", "repo/pkg/latin1.py",
                     "repo/pkg/sub/deep.py", "repo/top.py"]  # fmt: skip
    only_md = FilesSource([str(tree / "repo")], holdout_mod=2, include=["*.md"])
    assert [name for name, _ in only_md.files()] == ["repo/pkg/sub/notes.md"]
    direct = FilesSource([str(tree / "repo/.git/config")], holdout_mod=2)  # hidden, but named directly
    assert [name for name, _ in direct.files()] == ["config"]


def test_names_do_not_depend_on_where_the_corpus_lives(tree: Path, tmp_path_factory):
    moved = tmp_path_factory.mktemp("elsewhere") / "repo"
    (tree / "repo").rename(moved)
    source = FilesSource([str(moved)], holdout_mod=3, max_file_bytes=500)
    train, val, _ = collect(source)
    assert {**train, **val} == expected_documents()


def test_bad_paths_and_options_give_clear_errors(tree: Path):
    with pytest.raises(FileNotFoundError, match="'nope/' is not a file, a directory or a glob"):
        FilesSource(["nope/"], holdout_mod=2).files()
    with pytest.raises(FileNotFoundError, match=r"matches no file"):
        FilesSource([f"{tree}/**/*.rs"], holdout_mod=2).files()
    with pytest.raises(ValueError, match="data.paths must be a non-empty list"):
        FilesSource([], holdout_mod=2)
    with pytest.raises(ValueError, match="data.paths must be a non-empty list"):
        FilesSource(str(tree), holdout_mod=2)  # a bare string is a common slip
    with pytest.raises(ValueError, match="data.max_file_bytes must be >= 1"):
        FilesSource([str(tree)], holdout_mod=2, max_file_bytes=0)
    with pytest.raises(ValueError, match=r"data.source='files' does not take \['pathz'\]"):
        make_source("files", 20, pathz=[str(tree)])
    with pytest.raises(ValueError, match=r"data.source='code' does not take \['paths'\]; its options: none"):
        make_source("code", 20, paths=[str(tree)])


def test_files_datamodule_end_to_end(tree: Path, tmp_path: Path):
    dm = TokenDataModule("files", 2, 16, 300, str(tmp_path / "cache"), holdout_mod=3,
                         paths=[str(tree / "repo")], max_file_bytes=500)  # fmt: skip
    corpus = dm.prepare()
    heldout = dm.heldout_bytes()
    assert heldout == b"".join(
        t.encode() for n, t in sorted(expected_documents().items()) if is_heldout(n, 3)
    )
    assert corpus.tokenizer.token_bytes()[np.asarray(corpus.val_tokens)].sum() == len(heldout)
    assert corpus.val_tokens.dtype == np.uint16
    assert corpus.tokenizer.decode(np.asarray(corpus.train_tokens)).count("<|endoftext|>") == sum(
        1 for n in expected_documents() if not is_heldout(n, 3)
    )


def test_jsonl_text_field_is_configurable(tmp_path: Path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"code": f"x = {i}\n", "text": "ignored"}) for i in range(6)) + "\n")
    source = FilesSource([str(path)], holdout_mod=2, text_field="code")
    train, val, skipped = collect(source)
    assert {**train, **val} == {f"corpus.jsonl:{i + 1}": f"x = {i}\n" for i in range(6)}
    assert skipped == {}

"""The synthetic_code source: valid, deterministic, index-addressable and varied Python programs."""

from __future__ import annotations

import ast
import hashlib
import inspect
import itertools
import os
import subprocess
import sys
import time
from collections import Counter

import pytest

from nanoternary.data.sources import Document
from nanoternary.data.synthetic import DEFAULT_NUM_SAMPLES, MAX_CHARS, generate_program, synthetic_documents

PREFIX = 4_000  # fast tests use this prefix of the default corpus; slow tests use all 16,000
STATS_SAMPLES = 2_000  # the prefix whose ASTs the coverage tests inspect


@pytest.fixture(scope="module")
def corpus() -> list[Document]:
    """The first PREFIX documents of the default corpus (seed 0), generated once for the module."""
    return list(itertools.islice(synthetic_documents(), PREFIX))


@pytest.fixture(scope="module")
def full_corpus() -> list[Document]:
    return list(synthetic_documents())


@pytest.fixture(scope="module")
def trees(corpus: list[Document]) -> list[ast.Module]:
    return [ast.parse(doc.text) for doc in corpus[:STATS_SAMPLES]]


def test_samples_are_valid_python(corpus: list[Document]) -> None:
    # compile() parses first and then also runs the symbol-table checks (duplicate arguments, misplaced
    # return/yield), so it is a stricter test than ast.parse and about three times faster.
    for doc in corpus:
        compile(doc.text, doc.name, "exec")


def test_a_prefix_parses_with_ast(trees: list[ast.Module]) -> None:
    assert len(trees) == STATS_SAMPLES
    assert all(tree.body for tree in trees)


def test_defaults_and_names(corpus: list[Document]) -> None:
    parameters = inspect.signature(synthetic_documents).parameters
    assert parameters["num_samples"].default == DEFAULT_NUM_SAMPLES == 16_000
    assert parameters["seed"].default == 0
    assert all(isinstance(doc, Document) for doc in corpus)
    assert [doc.name for doc in corpus] == [f"synthetic/{i:06d}.py" for i in range(PREFIX)]


@pytest.mark.parametrize("num_samples", [0, 1, 5, 37])
def test_count_is_honoured(num_samples: int) -> None:
    docs = list(synthetic_documents(num_samples, seed=3))
    assert len(docs) == num_samples
    assert [d.name for d in docs] == [f"synthetic/{i:06d}.py" for i in range(num_samples)]


def test_negative_num_samples_raises_at_call_time() -> None:
    with pytest.raises(ValueError, match=r"num_samples must be >= 0, got -1"):
        synthetic_documents(-1)  # not iterated: the check must not wait for the first next()


def test_negative_index_raises() -> None:
    with pytest.raises(ValueError, match=r"index must be >= 0, got -5"):
        generate_program(0, -5)


def test_same_seed_and_index_give_identical_text() -> None:
    for index in (0, 1, 999, 15_999):
        assert generate_program(0, index) == generate_program(0, index)
    assert list(synthetic_documents(50, seed=11)) == list(synthetic_documents(50, seed=11))


def test_different_seeds_and_indices_differ() -> None:
    seed0 = [generate_program(0, i) for i in range(300)]
    seed1 = [generate_program(1, i) for i in range(300)]
    assert all(a != b for a, b in zip(seed0, seed1, strict=True))
    assert len(set(seed0)) == len(seed0)


def test_sample_is_independent_of_the_rest_of_the_corpus(corpus: list[Document]) -> None:
    assert corpus[1234].text == generate_program(0, 1234)
    reversed_order = [generate_program(0, i) for i in reversed(range(40))][::-1]
    assert reversed_order == [doc.text for doc in corpus[:40]]
    assert list(synthetic_documents(1300, seed=7))[1234].text == generate_program(7, 1234)


def test_text_does_not_depend_on_the_interpreter_hash_seed() -> None:
    """Iterating a set of strings would make output vary with PYTHONHASHSEED; check two other seeds."""
    code = (
        "import hashlib; from nanoternary.data.synthetic import generate_program; "
        "print(hashlib.sha256(''.join(generate_program(5, i) for i in range(200)).encode()).hexdigest())"
    )
    here = hashlib.sha256("".join(generate_program(5, i) for i in range(200)).encode()).hexdigest()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == here


def check_lengths_and_layout(docs: list[Document]) -> None:
    lengths = [len(doc.text) for doc in docs]
    assert min(lengths) >= 200
    assert max(lengths) <= MAX_CHARS
    assert 700 <= sum(lengths) / len(lengths) <= 900  # measured 822 on the whole default corpus
    for doc in docs:
        assert doc.text.endswith("\n") and not doc.text.endswith("\n\n")
        assert "\t" not in doc.text
        assert all(line == line.rstrip() for line in doc.text.splitlines())


def test_lengths_and_layout(corpus: list[Document]) -> None:
    check_lengths_and_layout(corpus)


def feature_set(tree: ast.Module) -> set[str]:
    """The constructs one program uses, named as in the brief."""
    nodes = list(ast.walk(tree))
    kinds = {type(node).__name__ for node in nodes}
    groups = {
        "def": {"FunctionDef"}, "class": {"ClassDef"}, "for": {"For"}, "while": {"While"}, "if": {"If"},
        "try": {"Try"}, "with": {"With"}, "return": {"Return"}, "raise": {"Raise"}, "yield": {"Yield"},
        "lambda": {"Lambda"}, "fstring": {"JoinedStr"}, "listcomp": {"ListComp"}, "dictcomp": {"DictComp"},
        "comprehension": {"ListComp", "DictComp", "SetComp", "GeneratorExp"},
        "arithmetic": {"BinOp", "AugAssign"},
    }  # fmt: skip
    found = {name for name, types in groups.items() if kinds & types}
    functions = [node for node in nodes if isinstance(node, ast.FunctionDef)]
    defined = {fn.name for fn in functions}
    for fn in functions:
        called = {c.func.id for c in ast.walk(fn) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
        if fn.name in called:
            found.add("recursion")
        if called & (defined - {fn.name}):
            found.add("cross_call")
        if ast.get_docstring(fn):
            found.add("docstring")
        if fn.name == "__init__":
            found.add("init")
    string_methods = {"strip", "lower", "upper", "join", "split", "replace", "title", "startswith"}
    if any(isinstance(node, ast.Attribute) and node.attr in string_methods for node in nodes):
        found.add("string_ops")
    return found


# Share of programs using each construct: about 80% of the value measured on the first 2,000 samples.
MIN_SHARE = {
    "def": 0.99, "return": 0.95, "if": 0.75, "arithmetic": 0.65, "docstring": 0.85, "for": 0.38,
    "comprehension": 0.32, "class": 0.30, "string_ops": 0.30, "init": 0.20, "recursion": 0.23, "raise": 0.22,
    "fstring": 0.20, "listcomp": 0.17, "while": 0.14, "cross_call": 0.13, "try": 0.13, "dictcomp": 0.05,
    "yield": 0.035, "with": 0.015, "lambda": 0.012,
}  # fmt: skip


def test_construct_coverage(trees: list[ast.Module]) -> None:
    counts = Counter(feature for tree in trees for feature in feature_set(tree))
    shares = {name: counts[name] / len(trees) for name in MIN_SHARE}
    too_rare = {name: round(share, 3) for name, share in shares.items() if share < MIN_SHARE[name]}
    assert not too_rare, f"constructs below their minimum share: {too_rare}"


def test_every_function_is_fully_annotated(trees: list[ast.Module]) -> None:
    for tree in trees:
        for fn in (node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)):
            args = [a for a in fn.args.args + fn.args.kwonlyargs if a.arg not in ("self", "cls")]
            assert fn.returns is not None and all(a.annotation is not None for a in args), fn.name


def test_diversity(corpus: list[Document], trees: list[ast.Module]) -> None:
    texts = [doc.text for doc in corpus[:STATS_SAMPLES]]
    assert len(set(texts)) >= 0.99 * STATS_SAMPLES  # measured 1,999 of 2,000
    assert len({text.splitlines()[0] for text in texts}) >= 800  # measured 1,021
    names = {
        n.name for tree in trees for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef)
    }
    assert len(names) >= 2_000  # distinct function, method and class names; measured 2,521
    sizes = Counter(len(text) // 250 for text in texts)
    assert len(sizes) >= 7  # lengths spread over at least seven 250-character bands (measured 8)


@pytest.mark.slow
def test_full_default_corpus(full_corpus: list[Document]) -> None:
    assert [doc.name for doc in full_corpus] == [f"synthetic/{i:06d}.py" for i in range(DEFAULT_NUM_SAMPLES)]
    for doc in full_corpus:
        ast.parse(doc.text, filename=doc.name)
        compile(doc.text, doc.name, "exec")
    check_lengths_and_layout(full_corpus)
    assert full_corpus[15_999].text == generate_program(0, 15_999)


@pytest.mark.slow
def test_another_seed_parses_with_ast() -> None:
    for doc in synthetic_documents(seed=1):
        ast.parse(doc.text, filename=doc.name)


@pytest.mark.slow
def test_generation_speed() -> None:
    """16,000 samples in under 5 s of CPU time on one core."""
    start = time.process_time()
    count = sum(1 for _ in synthetic_documents())
    assert count == DEFAULT_NUM_SAMPLES
    assert time.process_time() - start < 5.0

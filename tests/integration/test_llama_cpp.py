"""Stock llama.cpp (through llama-cpp-python) runs the bitnet GGUF that training writes, and agrees with
our engine: same token ids, per-position logits, greedy text.

The model is trained for real (Lightning, Muon + Lion, tiny_bitnet, a few dozen steps) so its logits are
far from uniform. llama.cpp scales activations per 256-value block and keeps fp16 K/V, so the engine's
`numerics="llama"` mode is the value-for-value comparison; the native mode is checked more loosely.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import lightning as L
import numpy as np
import pytest
from omegaconf import OmegaConf

from nanoternary.data.datamodule import TokenDataModule
from nanoternary.infer.engine import Engine
from nanoternary.io.gguf import export_gguf, read_gguf
from nanoternary.io.tensors import ModelTensors
from nanoternary.lit.callbacks.export import ModelExport
from nanoternary.lit.callbacks.gguf_export import GGUFExport
from nanoternary.lit.module import LitTernaryLM
from tests.conftest import REPO_ROOT
from tests.models import preset
from tests.tiny_run import prepared, tiny_trainer

llama_cpp = pytest.importorskip(
    "llama_cpp",
    reason="llama-cpp-python is not installed: pip install -e '.[llama]' (compiles llama.cpp, ~6 min)",
)

PROMPTS = [
    "def fibonacci(n):\n    if n < 2:\n        return",
    "import os\nimport sys\n\n\nclass Config:\n    def __init__(self, path):\n        self.",
    "    for i in range(10):\n        total += i * 2  # ünïcode, tabs\tand  spaces\n    print(",
]
STEPS = 60


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """A real training run of tiny_bitnet: export/final/ and, from the GGUF callback, its model.gguf."""
    out = tmp_path_factory.mktemp("bitnet-run")
    L.seed_everything(0)
    dm = TokenDataModule(source="code", batch_size=8, seq_len=64, vocab_size=4096, cache_dir=str(cache_dir))
    dm.corpus = prepared(str(cache_dir))
    optim = OmegaConf.to_container(OmegaConf.load(REPO_ROOT / "conf" / "optim" / "muon_lion.yaml"))
    optim["lion"]["lr"] = 1e-3  # embeddings and norms learn fast enough for peaked logits in a few steps
    module = LitTernaryLM(
        model=preset("tiny_bitnet").to_dict(),
        optim=optim,
        token_bytes=dm.corpus.token_bytes(),
        eot_id=dm.corpus.eot_id,
    )
    callbacks = [
        ModelExport(str(out / "export"), final_eval=False),
        GGUFExport(str(out / "export"), progress=False),
    ]
    tiny_trainer(out, STEPS, callbacks, limit_val_batches=0).fit(module, datamodule=dm)
    return out


@pytest.fixture(scope="module")
def gguf_path(run_dir: Path) -> Path:
    path = run_dir / "export" / "final" / "model.gguf"
    assert read_gguf(path).meta["gguf_arch"] == "bitnet"
    return path


@pytest.fixture(scope="module")
def llm(gguf_path: Path):
    return llama_cpp.Llama(
        str(gguf_path), n_ctx=256, n_batch=256, n_threads=2, logits_all=True, verbose=False, seed=0
    )


@pytest.fixture(scope="module")
def native(gguf_path: Path) -> Engine:
    return Engine.from_path(gguf_path)


@pytest.fixture(scope="module")
def emulated(gguf_path: Path) -> Engine:
    return Engine.from_path(gguf_path, numerics="llama")


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([np.corrcoef(x, y)[0, 1] for x, y in zip(a, b, strict=True)])


def assert_same_argmax_away_from_ties(got: np.ndarray, want: np.ndarray) -> None:
    """The same argmax at every position where llama.cpp's top two logits lie further apart than the two
    implementations differ there (2x their largest difference), and such clear positions are >= 90%.

    Why not at every position: llama.cpp picks its kernels by CPU (AVX2, AVX-512 VNNI, AMX), each summing
    in its own order, so a near-tie between two tokens can go either way on one machine and not another.
    """
    top2 = np.sort(want, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * np.abs(got - want).max(axis=-1)
    assert clear.mean() >= 0.9, clear
    assert np.array_equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


def test_llama_cpp_tokenizes_like_our_tokenizer(llm, native):
    engine = native
    for text in PROMPTS:
        ids = engine.tokenizer.encode(text)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
        assert llm.detokenize(ids).decode() == text
    assert llm.tokenize(b"<|endoftext|>", add_bos=False, special=True) == [engine.eot_id]
    assert llm.token_eos() == engine.eot_id


def test_per_position_logits_agree(llm, emulated, native):
    for text in PROMPTS:
        ids = native.tokenizer.encode(text)
        want = llama_logits(llm, ids)
        assert want.std() > 1.0  # a trained model: peaked, non-degenerate logits
        got = emulated.score(ids).numpy()
        assert correlations(got, want).min() >= 0.9999
        assert_same_argmax_away_from_ties(got, want)
        fast = native.score(ids).numpy()  # the training model's arithmetic: per-token activation scales
        assert correlations(fast, want).min() >= 0.999
        assert (fast.argmax(-1) == want.argmax(-1)).mean() >= 0.9


def test_greedy_generation_of_32_tokens_matches(llm, emulated):
    for text in PROMPTS:
        llm.reset()
        want = llm.create_completion(text, max_tokens=32, temperature=0.0)["choices"][0]
        got = emulated.generate([text], max_tokens=32)[0]
        assert got.text == want["text"]
        assert got.finish_reason == want["finish_reason"]


def test_q8_0_embedding_halves_it_and_llama_cpp_agrees(run_dir, gguf_path):
    """embed_type=q8_0 with tq1_0 codes, the smallest file: llama.cpp reads the Q8_0 token embedding (and
    tied head) as our engine does. llama.cpp also rounds the head's input to Q8_0 blocks, which the
    emulation leaves in fp16, so the agreement is looser than for F16."""
    folder = run_dir / "export" / "final"
    path = export_gguf(folder / "q8.gguf", ModelTensors.from_folder(folder), "bitnet", "tq1_0", "q8_0")
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    embedding = tensors["token_embd.weight"]
    assert embedding.tensor_type.name == "Q8_0" and tensors["blk.0.attn_q.weight"].tensor_type.name == "TQ1_0"
    assert int(embedding.n_bytes) == 4096 * 256 // 32 * 34  # 32 int8 values + one fp16 scale per block
    assert path.stat().st_size < gguf_path.stat().st_size - 1_000_000  # than F16 and TQ2_0
    llm = llama_cpp.Llama(str(path), n_ctx=256, n_batch=256, n_threads=2, logits_all=True, verbose=False)
    emulated = Engine.from_path(path, numerics="llama")
    for text in PROMPTS:
        ids = emulated.tokenizer.encode(text)
        want, got = llama_logits(llm, ids), emulated.score(ids).numpy()
        assert correlations(got, want).min() >= 0.999
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9

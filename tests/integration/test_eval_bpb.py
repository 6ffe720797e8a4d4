"""nanoternary-eval-bpb as a real subprocess on a real model folder and a data=files corpus."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader

from nanoternary.cli.eval_bpb import evaluate_export
from nanoternary.data.datamodule import TokenDataModule, Windows
from nanoternary.evals.bpb import compression_bpb, evaluate_heldout
from nanoternary.io.export_dir import save_export
from nanoternary.io.gguf import folder_to_gguf
from nanoternary.model.config import ModelConfig
from nanoternary.model.transformer import TernaryLM

REPO = Path(__file__).resolve().parents[2]
CONTEXT = 32


@pytest.fixture(scope="module")
def corpus_and_export(tmp_path_factory) -> tuple[Path, Path, TokenDataModule, TernaryLM]:
    tmp = tmp_path_factory.mktemp("eval-bpb")
    corpus = tmp / "corpus"
    for i in range(40):
        path = corpus / f"pkg_{i % 3}" / f"mod_{i}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            f'"""Module {i}."""\n\n\ndef value_{i}(x: int) -> int:\n    return x * {i} - {i % 5}\n'
        )
    dm = TokenDataModule("files", 2, CONTEXT, 320, str(tmp / "cache"), holdout_mod=4, paths=[str(corpus)])
    tokenizer = dm.tokenizer()
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=320, dim=64, n_layers=1, n_heads=2, ffn_dim=128, context_length=CONTEXT, group_size=64
    )
    model = TernaryLM(cfg).eval()
    export = save_export(tmp / "export" / "final", model, tokenizer, {"step": 7})
    return corpus, export, dm, model


def test_cli_prints_json_and_table_with_the_same_numbers_as_in_process(corpus_and_export, tmp_path):
    corpus, export, dm, model = corpus_and_export
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "nanoternary.cli.eval_bpb", f"export={export}", "data=files",
           f"data.paths=[{corpus}]", "data.holdout_mod=4", f"run_dir={run_dir}"]  # fmt: skip
    env = {**os.environ, "NANOTERNARY_CACHE": str(dm.cache_dir)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # stdout is the JSON alone
    assert json.loads((run_dir / "bpb.json").read_text()) == result
    assert "gzip -9" in proc.stderr and "xz -9e" in proc.stderr and "nanoternary" in proc.stderr

    # the same score in process, from the model object that was exported (not from the folder)
    tokenizer = dm.tokenizer()
    windows = DataLoader(Windows(dm.split_tokens("val", tokenizer), CONTEXT), batch_size=16)
    score = evaluate_heldout(model, windows, torch.tensor(tokenizer.token_bytes()), tokenizer.eot_id)
    heldout = dm.heldout_bytes()
    assert result["step"] == 7 and result["data"] == "files"
    assert result["val/loss"] == pytest.approx(score.loss, rel=1e-6)
    assert result["val/bpb"] == pytest.approx(score.bpb, rel=1e-6)
    assert result["val/tokens"] == score.tokens and result["val/bytes"] == score.bytes
    assert result["heldout_bytes"] == len(heldout) and 0 < len(heldout) - score.bytes < 4 * CONTEXT
    assert result["baselines_bpb"] == compression_bpb(heldout)
    assert result["val/loss"] == pytest.approx(math.log(320), abs=0.1)  # untrained, std-0.02 init: ~ln(vocab)


def compose_eval(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("eval_bpb", overrides=overrides)


def test_clear_errors(corpus_and_export, tmp_path):
    _, export, _, _ = corpus_and_export
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        evaluate_export(compose_eval([f"export={tmp_path}"]))
    with pytest.raises(FileNotFoundError, match="GGUF file not found: .*missing.gguf"):
        evaluate_export(compose_eval([f"export={tmp_path / 'missing.gguf'}"]))
    with pytest.raises(ValueError, match="token-id data: bits per byte is undefined"):
        evaluate_export(compose_eval([f"export={export}", "data=seed_tokens"]))


@pytest.mark.parametrize("embed_type", ["f32", "f16"])
def test_a_gguf_scores_like_its_model_folder(corpus_and_export, embed_type):
    """The GGUF holds the ternary codes exactly (as f16 here: this model's 64-wide rows are no whole TQ
    block) and the scales in f32, so with an f32 embedding its loss is the folder's to float rounding; an
    f16 embedding moves it only slightly."""
    corpus, export, dm, _ = corpus_and_export
    data = ["data=files", f"data.paths=[{corpus}]", "data.holdout_mod=4"]
    gguf = folder_to_gguf(export, qtype="f16", embed_type=embed_type)
    from_folder = evaluate_export(compose_eval([f"export={export}", *data]))
    from_gguf = evaluate_export(compose_eval([f"export={gguf}", *data]))
    assert from_gguf["step"] == 7 and from_gguf["export"] == str(gguf)
    assert (
        from_gguf["val/tokens"] == from_folder["val/tokens"]
        and from_gguf["val/bytes"] == from_folder["val/bytes"]
    )
    tol = 1e-5 if embed_type == "f32" else 1e-3
    assert from_gguf["val/loss"] == pytest.approx(from_folder["val/loss"], rel=tol)
    assert from_gguf["val/bpb"] == pytest.approx(from_folder["val/bpb"], rel=tol)

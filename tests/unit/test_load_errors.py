"""Every broken file a resume or a model load can meet gives one error naming the file and the fault:
checkpoints (missing, truncated, flipped bit, not ours, other model), model folders (meta.json,
weights, tokenizer, shape), and the ckpt_path / run_dir settings themselves."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from nanoternary.data.tokenizer import TextTokenizer
from nanoternary.io.export_dir import load_export
from nanoternary.lit.resume import ResumeFrom, newest_checkpoint, read_checkpoint, resolve_resume
from tests.tiny_run import TINY_MODEL, run_callbacks, tiny_datamodule, tiny_module, tiny_trainer


@pytest.fixture(scope="module")
def run(tmp_path_factory, code_corpus, cache_dir) -> Path:
    """A real 4-step run: checkpoints/step-2, step-4, last.ckpt; export/step-2, step-4, final."""
    run_dir = tmp_path_factory.mktemp("run")
    dm = tiny_datamodule(cache_dir)
    tiny_trainer(run_dir, 4, run_callbacks(run_dir)).fit(tiny_module(dm), datamodule=dm)
    return run_dir


def damaged(src: Path, dst: Path, how: str) -> Path:
    data = bytearray(src.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "flipped":
        data[len(data) // 2] ^= 0x01
    dst.write_bytes(bytes(data))
    return dst


def rx(text: str) -> str:
    return re.escape(text)


# ---- .ckpt ------------------------------------------------------------------------------------
def test_a_good_checkpoint_reads_back_with_its_step(run):
    ckpt = read_checkpoint(run / "checkpoints" / "step-00000004.ckpt")
    assert ckpt["global_step"] == 4 and len(ckpt["optimizer_states"]) == 2


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=rx(f"checkpoint not found: {tmp_path / 'x.ckpt'}")):
        read_checkpoint(tmp_path / "x.ckpt")


def test_truncated_checkpoint(run, tmp_path):
    bad = damaged(run / "checkpoints" / "step-00000004.ckpt", tmp_path / "t.ckpt", "truncated")
    with pytest.raises(ValueError, match=rx(f"cannot read checkpoint {bad}: it is truncated or corrupted (")):
        read_checkpoint(bad)


def test_flipped_bit_in_a_checkpoint(run, tmp_path):
    bad = damaged(run / "checkpoints" / "step-00000004.ckpt", tmp_path / "f.ckpt", "flipped")
    with pytest.raises(
        ValueError, match=rx(f"corrupted checkpoint {bad}: its content no longer matches the sha256")
    ):
        read_checkpoint(bad)


def test_not_a_training_checkpoint(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "w.ckpt")
    with pytest.raises(
        ValueError,
        match=rx(
            f"{tmp_path / 'w.ckpt'} is not a nanoternary training checkpoint: it has "
            "no ['state_dict', 'global_step', 'loops', 'optimizer_states', "
        ),
    ):
        read_checkpoint(tmp_path / "w.ckpt")
    (tmp_path / "text.ckpt").write_text("hello")
    with pytest.raises(ValueError, match=rx(f"cannot read checkpoint {tmp_path / 'text.ckpt'}")):
        read_checkpoint(tmp_path / "text.ckpt")


def test_checkpoint_of_another_model_shape(run):
    ckpt = run / "checkpoints" / "step-00000004.ckpt"
    other = {**TINY_MODEL, "dim": 512, "n_layers": 2}
    with pytest.raises(
        ValueError,
        match=rx(
            f"{ckpt} holds a different model than this config asks for: "
            "dim=256 there, 512 here; n_layers=1 there, 2 here"
        ),
    ):
        resolve_resume(str(ckpt), None, run / "checkpoints", other)


def test_auto_skips_a_damaged_newest_checkpoint(run, tmp_path, caplog):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    shutil.copy(run / "checkpoints" / "step-00000002.ckpt", ckpts)
    damaged(run / "checkpoints" / "step-00000004.ckpt", ckpts / "step-00000004.ckpt", "flipped")
    os.link(ckpts / "step-00000004.ckpt", ckpts / "last.ckpt")
    with caplog.at_level(logging.WARNING):
        path, ckpt = newest_checkpoint(ckpts)
    assert path == ckpts / "step-00000002.ckpt" and ckpt["global_step"] == 2
    assert f"skipping corrupted checkpoint {ckpts / 'step-00000004.ckpt'}" in caplog.text
    assert resolve_resume("auto", str(tmp_path), ckpts, TINY_MODEL) == ResumeFrom(
        step=2, micro_step=2, ckpt=ckpts / "step-00000002.ckpt"
    )


def test_last_ckpt_counts_when_it_is_newer_than_every_step_file(run, tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    shutil.copy(run / "checkpoints" / "step-00000002.ckpt", ckpts)
    shutil.copy(run / "checkpoints" / "step-00000004.ckpt", ckpts / "last.ckpt")
    assert newest_checkpoint(ckpts)[0] == ckpts / "last.ckpt"


# ---- ckpt_path / run_dir settings -------------------------------------------------------------
def test_settings_errors_and_choices(run, tmp_path, caplog):
    ckpts = run / "checkpoints"
    with pytest.raises(
        ValueError, match=rx(f"run_dir={run} already holds checkpoints in {ckpts}: pass ckpt_path=auto")
    ):
        resolve_resume(None, str(run), ckpts, TINY_MODEL)
    with pytest.raises(ValueError, match=rx("ckpt_path=auto continues the run in run_dir=...: set run_dir")):
        resolve_resume("auto", None, ckpts, TINY_MODEL)
    with caplog.at_level(logging.WARNING):
        assert resolve_resume("auto", str(tmp_path), tmp_path / "checkpoints", TINY_MODEL) is None
    assert "no usable checkpoint" in caplog.text
    assert resolve_resume(None, None, ckpts, TINY_MODEL) is None  # a new run dir: fresh
    assert resolve_resume(str(run / "export" / "step-00000004"), None, ckpts, TINY_MODEL) == ResumeFrom(
        step=4, micro_step=4, ckpt=ckpts / "step-00000004.ckpt"
    )
    assert resolve_resume(str(run / "export" / "final"), None, ckpts, TINY_MODEL) == ResumeFrom(
        step=0, micro_step=0, weights=run / "export" / "final"
    )
    with pytest.raises(
        ValueError, match=rx(f"ckpt_path={tmp_path} is a folder but not a model folder (no meta.json)")
    ):
        resolve_resume(str(tmp_path), None, ckpts, TINY_MODEL)
    step2 = ckpts / "step-00000002.ckpt"
    with pytest.raises(
        ValueError,
        match=rx(
            f"run_dir={run} holds checkpoints newer than step 2 (steps [4]): "
            f"continuing there from {step2} would mix two histories"
        ),
    ):
        resolve_resume(str(step2), str(run), ckpts, TINY_MODEL)
    assert resolve_resume(str(step2), None, ckpts, TINY_MODEL).step == 2  # into a new run dir: fine


# ---- model folders ----------------------------------------------------------------------------
@pytest.fixture
def folder(run, tmp_path) -> Path:
    return Path(shutil.copytree(run / "export" / "step-00000004", tmp_path / "model"))


def test_a_good_model_folder_loads_with_the_checkpoint_weights(run, folder):
    model, meta, _ = load_export(folder)
    ckpt = read_checkpoint(run / "checkpoints" / "step-00000004.ckpt")
    assert meta["step"] == 4 and len(meta["weights_sha256"]) == 64
    assert all(torch.equal(v, ckpt["state_dict"][f"model.{k}"]) for k, v in model.state_dict().items())


def test_missing_meta(folder):
    (folder / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match=rx(f"not a model folder: {folder / 'meta.json'} is missing")):
        load_export(folder)


def test_truncated_meta(folder):
    damaged(folder / "meta.json", folder / "meta.json", "truncated")
    with pytest.raises(ValueError, match=rx(f"corrupt {folder / 'meta.json'}: ")):
        load_export(folder)


def test_meta_with_an_invalid_model_config(folder):
    meta = json.loads((folder / "meta.json").read_text())
    meta["model"]["bogus"] = 1
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(
        ValueError,
        match=rx(f"{folder / 'meta.json'} has an invalid model config: unknown model config keys: ['bogus']"),
    ):
        load_export(folder)


def test_missing_weights(folder):
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=rx(f"model weights missing: {folder / 'model.safetensors'}")):
        load_export(folder)


@pytest.mark.parametrize(
    ("how", "detail"), [("truncated", ": "), ("flipped", ": its sha256 does not match the one in")]
)
def test_damaged_weights(folder, how, detail):
    weights = folder / "model.safetensors"
    damaged(weights, weights, how)
    with pytest.raises(ValueError, match=rx(f"corrupt weights file {weights}{detail}")):
        load_export(folder)


def test_weights_of_another_shape(folder):
    meta = json.loads((folder / "meta.json").read_text())
    meta["model"].update(dim=512, ffn_dim=1024)
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(
        ValueError,
        match=rx(
            f"{folder / 'model.safetensors'} does not match the model shape in {folder / 'meta.json'}: "
        ),
    ):
        load_export(folder)


def test_missing_tokenizer(folder):
    (folder / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=rx(f"tokenizer file not found: {folder / 'tokenizer.json'}")):
        load_export(folder)


def test_corrupt_tokenizer(folder):
    damaged(folder / "tokenizer.json", folder / "tokenizer.json", "truncated")
    with pytest.raises(ValueError, match=rx(f"corrupt tokenizer file {folder / 'tokenizer.json'}: ")):
        load_export(folder)


def test_a_different_tokenizer(folder):
    TextTokenizer.train(["def f(x):\n    return x + 1\n"] * 20, 300).save(folder / "tokenizer.json")
    with pytest.raises(
        ValueError,
        match=rx(
            f"{folder / 'tokenizer.json'} is not the tokenizer this model was trained with: its fingerprint "
        ),
    ):
        load_export(folder)

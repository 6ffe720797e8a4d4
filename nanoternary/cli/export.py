"""`nanoternary-export src=<model folder | .ckpt> out=<file.gguf> qtype=tq2_0|tq1_0|f16`: write a GGUF."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from nanoternary.data.tokenizer import TextTokenizer
from nanoternary.io.export_dir import TOKENIZER
from nanoternary.io.gguf import GGUF_NAME, write_model_gguf
from nanoternary.io.tensors import ModelTensors, display_name
from nanoternary.model.config import ModelConfig
from nanoternary.model.transformer import TernaryLM

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
log = logging.getLogger(__name__)


def run_tokenizer(ckpt: Path) -> Path:
    """The tokenizer.json of the run a checkpoint belongs to (<run>/checkpoints/x.ckpt -> <run>/export/*/)."""
    export = ckpt.resolve().parent.parent / "export"
    found = sorted(export.glob(f"*/{TOKENIZER}"), key=lambda p: p.parent.name != "final")
    if not found:
        raise FileNotFoundError(
            f"no {TOKENIZER} in {export}/*/ for {ckpt}: pass tokenizer=<path to tokenizer.json>"
        )
    return found[0]


def load_source(src: Path, tokenizer: str | None) -> ModelTensors:
    """ModelTensors from a model folder or from the model weights inside a Lightning checkpoint."""
    if src.is_dir():
        return ModelTensors.from_folder(src)
    if src.suffix != ".ckpt":
        raise ValueError(f"src must be a model folder (with meta.json) or a .ckpt file, got {src}")
    if not src.is_file():
        raise FileNotFoundError(f"checkpoint not found: {src}")
    from nanoternary.lit.resume import read_checkpoint  # Lightning's import cost only for a .ckpt

    ckpt = read_checkpoint(src)
    model = TernaryLM(ModelConfig.from_dict(ckpt["hyper_parameters"]["model"]))
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    tok = TextTokenizer.from_file(Path(tokenizer) if tokenizer else run_tokenizer(src))
    return ModelTensors.from_model(model, tok, {"step": int(ckpt["global_step"]), "source": str(src)})


def default_out(src: Path) -> Path:
    return src / GGUF_NAME if src.is_dir() else src.with_suffix(".gguf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    src = Path(cfg.src)
    out = Path(cfg.out) if cfg.out else default_out(src)
    tensors = load_source(src, cfg.tokenizer)
    path = write_model_gguf(
        out,
        tensors,
        cfg.arch,
        cfg.qtype,
        cfg.embed_type,
        cfg.name or display_name(src),
        progress=cfg.progress,
    )
    ternary = sum(t.codes.numel() for t in tensors.ternary.values())
    log.info("%s: %.3f MB, %d ternary weights", path, path.stat().st_size / 1e6, ternary)


if __name__ == "__main__":
    main()

"""The self-describing model folder (DESIGN.md section 5): model.safetensors + meta.json + tokenizer.json.

It holds everything needed to rebuild the model without Lightning, the training code or the .ckpt.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nanoternary.data.tokenizer import TextTokenizer
from nanoternary.io.atomic import atomic_dir
from nanoternary.model.config import ModelConfig
from nanoternary.model.transformer import TernaryLM

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "meta.json"
TOKENIZER = "tokenizer.json"


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("nanoternary", "torch", "lightning", "tokenizers", "safetensors"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def save_export(path: str | Path, model: TernaryLM, tokenizer: TextTokenizer, meta: dict[str, Any]) -> Path:
    """Write the folder atomically; `meta` adds training facts (step, losses, bpb, hashes...)."""
    path = Path(path)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    full_meta = {
        "format_version": FORMAT_VERSION,
        "model": model.cfg.to_dict(),
        "num_parameters": model.num_parameters(),
        "tokenizer_hash": tokenizer.fingerprint,
        "git_commit": git_commit(),
        "versions": package_versions(),
        **meta,
    }
    with atomic_dir(path) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        full_meta["weights_sha256"] = sha256_file(tmp / WEIGHTS)  # catches bit rot that safetensors cannot
        (tmp / META).write_text(json.dumps(full_meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (tmp / TOKENIZER).write_text(tokenizer.to_json(), encoding="utf-8")
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    meta_path = Path(path) / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"not a model folder: {meta_path} is missing")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"corrupt {meta_path}: {exc}") from exc
    if not isinstance(meta, dict) or "model" not in meta:
        raise ValueError(f"corrupt {meta_path}: no 'model' section")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: unsupported format_version {meta.get('format_version')!r}")
    return meta


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_export(
    path: str | Path, device: str | torch.device = "cpu", verify: bool = True
) -> tuple[TernaryLM, dict, TextTokenizer]:
    """Rebuild (model in eval mode, meta, tokenizer) from a model folder, with one clear error per fault.
    `verify` checks the weights against the sha256 in meta.json (one extra read of the file)."""
    path = Path(path)
    meta = read_meta(path)
    try:
        model = TernaryLM(ModelConfig.from_dict(meta["model"]))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path / META} has an invalid model config: {exc}") from exc
    weights = path / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"model weights missing: {weights}")
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"corrupt weights file {weights}: {exc}") from exc
    if verify and meta.get("weights_sha256") and sha256_file(weights) != meta["weights_sha256"]:
        raise ValueError(
            f"corrupt weights file {weights}: its sha256 does not match the one in {path / META}"
        )
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise ValueError(f"{weights} does not match the model shape in {path / META}: {exc}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{weights} does not match the model in {path / META}: "
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    tokenizer = TextTokenizer.from_file(path / TOKENIZER)
    if meta.get("tokenizer_hash") and tokenizer.fingerprint != meta["tokenizer_hash"]:
        raise ValueError(
            f"{path / TOKENIZER} is not the tokenizer this model was trained with: its fingerprint "
            f"{tokenizer.fingerprint[:12]}... differs from tokenizer_hash {meta['tokenizer_hash'][:12]}... "
            f"in {path / META}"
        )
    return model.to(device).eval(), meta, tokenizer

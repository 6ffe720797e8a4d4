"""GGUF write and read for two architectures (DESIGN.md section 5, REFERENCE.md section 5).

- `nanoternary`: any model we train. Every tensor of `TernaryLM.state_dict()` under its own name;
  each quantized BitLinear as ternary codes (TQ2_0 / TQ1_0 / F16, every 256-block scale d = 1) plus its
  exact float32 scales in `<module>.scale`; the full ModelConfig as JSON in `nanoternary.config`.
- `bitnet`: llama.cpp's BitNet layout, written only for models of that shape (see `bitnet_misfits`):
  llama.cpp tensor names and keys, pure ternary codes plus a per-tensor F32 `blk.N.<name>.scale`, which
  llama.cpp multiplies into the matmul result (`build_lora_mm`), so the trained scales stay exact.

Both embed the byte-level BPE tokenizer as `tokenizer.ggml.*` (model `gpt2`, pre `gpt-2`), which is also
what the reader rebuilds the tokenizer from, so our engine and llama.cpp read the very same vocabulary.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from tqdm import tqdm

from nanoternary.data.tokenizer import TextTokenizer
from nanoternary.io.atomic import atomic_file
from nanoternary.io.tensors import ModelTensors, TernaryTensor, display_name
from nanoternary.model.config import ModelConfig

ARCHS = ("nanoternary", "bitnet")
FORMAT_VERSION = 1
BLOCK = 256  # TQ1_0 / TQ2_0 block length: a row must be a whole number of blocks
QTYPES = {"tq2_0": Q.TQ2_0, "tq1_0": Q.TQ1_0, "f16": Q.F16}
# q8_0 (8.5 bits per value, llama.cpp's 32-value blocks) is lossy: smaller files, not the trained values
EMBED_TYPES = {"f16": Q.F16, "f32": Q.F32, "q8_0": Q.Q8_0}
FILE_TYPES = {
    Q.TQ2_0: gguf.LlamaFileType.MOSTLY_TQ2_0,
    Q.TQ1_0: gguf.LlamaFileType.MOSTLY_TQ1_0,
    Q.F16: gguf.LlamaFileType.MOSTLY_F16,
}
SCALE_SUFFIX = ".scale"
EMBED = "embed.weight"

# TernaryLM names <-> llama.cpp bitnet names (per block, after the "blocks.N." / "blk.N." prefix)
BITNET_BLOCK_NAMES = {
    "attn_norm.weight": "attn_norm.weight",
    "attn.q_proj.weight": "attn_q.weight",
    "attn.k_proj.weight": "attn_k.weight",
    "attn.v_proj.weight": "attn_v.weight",
    "attn.sub_norm.weight": "attn_sub_norm.weight",
    "attn.o_proj.weight": "attn_output.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "ffn.gate_proj.weight": "ffn_gate.weight",
    "ffn.up_proj.weight": "ffn_up.weight",
    "ffn.sub_norm.weight": "ffn_sub_norm.weight",
    "ffn.down_proj.weight": "ffn_down.weight",
}
BITNET_TOP_NAMES = {EMBED: "token_embd.weight", "norm.weight": "output_norm.weight"}
K = gguf.Keys
# ModelConfig field <- llama.cpp key; every one is required to rebuild a bitnet model
BITNET_KEYS = {
    "context_length": K.LLM.CONTEXT_LENGTH,
    "dim": K.LLM.EMBEDDING_LENGTH,
    "n_layers": K.LLM.BLOCK_COUNT,
    "ffn_dim": K.LLM.FEED_FORWARD_LENGTH,
    "n_heads": K.Attention.HEAD_COUNT,
    "n_kv_heads": K.Attention.HEAD_COUNT_KV,
    "norm_eps": K.Attention.LAYERNORM_RMS_EPS,
    "rope_theta": K.Rope.FREQ_BASE,
}
TOKENIZER_KEYS = (K.Tokenizer.LIST, K.Tokenizer.TOKEN_TYPE, K.Tokenizer.MERGES)

Progress = Callable[[int, int, str], None]  # (tensors done, tensors total, current name)
GGUF_NAME = "model.gguf"  # inside a model folder
log = logging.getLogger(__name__)


# ---- shape checks -------------------------------------------------------------------------------
def bitnet_misfits(cfg: ModelConfig) -> list[str]:
    """What keeps a model out of llama.cpp's `bitnet` layout (empty: it fits).

    Our FFN is always SwiGLU (llama.cpp's bitnet graph hard-codes SiLU gating), embeddings are always
    tied and linears never have biases, so those never appear here.
    """
    out = []
    if not cfg.quantize:
        out.append("ternary weights (model.quantize=true), got a full-precision model")
    if cfg.mhc.n_streams != 1:
        out.append(f"one residual stream (model.mhc.n_streams=1), got {cfg.mhc.n_streams}")
    if not cfg.sub_norms:
        out.append("attn_sub_norm/ffn_sub_norm (model.sub_norms=true), got false")
    if cfg.group_size != 0:
        out.append(
            f"one weight scale per tensor as llama.cpp applies it (model.group_size=0), got {cfg.group_size}"
        )
    for name, width in (("dim", cfg.dim), ("ffn_dim", cfg.ffn_dim)):
        if width % BLOCK:
            out.append(f"model.{name} a multiple of {BLOCK} (TQ block length), got {width}")
    return out


def choose_arch(arch: str, cfg: ModelConfig) -> str:
    """`auto`: llama.cpp's `bitnet` when the model has its shape, else `nanoternary`."""
    if arch == "auto":
        return "nanoternary" if bitnet_misfits(cfg) else "bitnet"
    return arch


def check_bitnet(cfg: ModelConfig) -> None:
    misfits = bitnet_misfits(cfg)
    if misfits:
        raise ValueError(
            "model does not have llama.cpp's BitNet shape; export it with arch=nanoternary or train it with "
            "model=tiny_bitnet. It needs: " + "; ".join(misfits)
        )


# ---- names ----------------------------------------------------------------------------------------
def to_bitnet_name(name: str) -> str:
    if name in BITNET_TOP_NAMES:
        return BITNET_TOP_NAMES[name]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if m is None or m.group(2) not in BITNET_BLOCK_NAMES:
        raise ValueError(f"tensor {name!r} has no place in llama.cpp's bitnet layout")
    return f"blk.{m.group(1)}.{BITNET_BLOCK_NAMES[m.group(2)]}"


def from_bitnet_name(name: str) -> str:
    top = {v: k for k, v in BITNET_TOP_NAMES.items()}
    if name in top:
        return top[name]
    block = {v: k for k, v in BITNET_BLOCK_NAMES.items()}
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if m is None or m.group(2) not in block:
        raise ValueError(f"unexpected tensor {name!r} in a bitnet GGUF")
    return f"blocks.{m.group(1)}.{block[m.group(2)]}"


def scale_name(weight_name: str) -> str:
    """'blocks.0.attn.q_proj.weight' -> 'blocks.0.attn.q_proj.scale' (llama.cpp: 'blk.0.attn_q.scale')."""
    return weight_name.removesuffix(".weight") + SCALE_SUFFIX


# ---- tokenizer <-> tokenizer.ggml.* ---------------------------------------------------------------
def gguf_vocab(tokenizer: TextTokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) padded with UNUSED placeholders to the model's embedding rows."""
    vocab = tokenizer.tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise ValueError(f"tokenizer has {len(vocab)} tokens but the model only {vocab_size} embedding rows")
    by_id = {i: t for t, i in vocab.items()}
    specials = {t.content for t in tokenizer.tokenizer.get_added_tokens_decoder().values() if t.special}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if by_id[i] in specials else gguf.TokenType.NORMAL)
        else:
            tokens.append(f"<|unused_{i}|>")
            types.append(gguf.TokenType.UNUSED)
    merges = json.loads(tokenizer.to_json())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    return tokens, [int(t) for t in types], merges


def tokenizer_from_vocab(tokens: list[str], types: list[int], merges: list[str]) -> TextTokenizer:
    """The byte-level BPE tokenizer that `tokenizer.ggml.*` describes (the inverse of `gguf_vocab`)."""
    vocab = {
        t: i for i, (t, kind) in enumerate(zip(tokens, types, strict=True)) if kind != gguf.TokenType.UNUSED
    }
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [
            AddedToken(t, special=True)
            for t, kind in zip(tokens, types, strict=True)
            if kind == gguf.TokenType.CONTROL
        ]
    )
    return TextTokenizer(tok)


# ---- write --------------------------------------------------------------------------------------
def encode_codes(codes: torch.Tensor, qtype: Q, name: str) -> np.ndarray:
    """Ternary codes as GGUF data: every TQ block's scale d is 1 (0 for an all-zero block)."""
    if qtype != Q.F16 and codes.shape[1] % BLOCK:
        raise ValueError(
            f"{name}: rows of {codes.shape[1]} values are not a whole number of {BLOCK}-value TQ blocks; "
            "export with qtype=f16"
        )
    return gguf.quants.quantize(codes.numpy().astype(np.float32), qtype)


def write_gguf(
    path: str | Path,
    tensors: ModelTensors,
    arch: str = "nanoternary",
    qtype: str = "tq2_0",
    embed_type: str = "f16",
    name: str = "nanoternary",
    progress: Progress | None = None,
) -> Path:
    """Write `tensors` as a GGUF file at `path` (not atomic: see `export_gguf`)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown GGUF arch {arch!r}; expected one of {ARCHS}")
    if qtype not in QTYPES:
        raise ValueError(f"unknown qtype {qtype!r}; expected one of {sorted(QTYPES)}")
    if embed_type not in EMBED_TYPES:
        raise ValueError(f"unknown embed_type {embed_type!r}; expected one of {sorted(EMBED_TYPES)}")
    cfg = tensors.cfg
    if embed_type == "q8_0" and cfg.dim % 32:
        raise ValueError(f"embed_type=q8_0 needs model.dim to be a multiple of 32, got {cfg.dim}")
    if arch == "bitnet":
        check_bitnet(cfg)
    rename = to_bitnet_name if arch == "bitnet" else (lambda n: n)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_file_type(int(FILE_TYPES[QTYPES[qtype]]))
    write_hparams(writer, cfg)
    if arch == "nanoternary":
        writer.add_uint32("nanoternary.format_version", FORMAT_VERSION)
        writer.add_string("nanoternary.config", json.dumps(cfg.to_dict(), sort_keys=True))
    writer.add_string(
        "nanoternary.meta", json.dumps(tensors.meta, sort_keys=True, default=str)
    )  # llama.cpp ignores it
    write_tokenizer(writer, tensors.tokenizer, cfg.vocab_size)

    total, done = len(tensors.dense) + len(tensors.ternary), 0
    for key, value in tensors.dense.items():
        kind = EMBED_TYPES[embed_type] if key == EMBED else Q.F32
        writer.add_tensor(rename(key), gguf.quants.quantize(value.float().numpy(), kind), raw_dtype=kind)
        done += 1
        if progress:
            progress(done, total, key)
    for key, t in tensors.ternary.items():
        writer.add_tensor(rename(key), encode_codes(t.codes, QTYPES[qtype], key), raw_dtype=QTYPES[qtype])
        scales = t.scales.float().numpy()
        writer.add_tensor(scale_name(rename(key)), scales.reshape(1) if arch == "bitnet" else scales)
        done += 1
        if progress:
            progress(done, total, key)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def write_hparams(writer: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)


def write_tokenizer(writer: gguf.GGUFWriter, tokenizer: TextTokenizer, vocab_size: int) -> None:
    tokens, types, merges = gguf_vocab(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.eot_id)
    writer.add_eos_token_id(tokenizer.eot_id)
    writer.add_add_bos_token(False)


# ---- read ---------------------------------------------------------------------------------------
def open_reader(path: str | Path) -> gguf.GGUFReader:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError, IndexError, ... on damaged files
        raise ValueError(f"corrupt or truncated GGUF file {path}: {exc}") from exc
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise ValueError(
                f"truncated GGUF file {path}: tensor {t.name!r} extends past the end of the file"
            )
    return reader


def field_value(reader: gguf.GGUFReader, key: str, path: Path) -> Any:
    field = reader.fields.get(key)
    if field is None:
        raise ValueError(f"GGUF file {path} is missing key {key!r}")
    return field.contents()


def missing_keys(reader: gguf.GGUFReader, keys: list[str], path: Path) -> None:
    missing = [k for k in keys if k not in reader.fields]
    if missing:
        raise ValueError(f"GGUF file {path} is missing required keys: {', '.join(missing)}")


def read_config(reader: gguf.GGUFReader, arch: str, path: Path) -> ModelConfig:
    if arch == "nanoternary":
        version = field_value(reader, "nanoternary.format_version", path)
        if version != FORMAT_VERSION:
            raise ValueError(f"GGUF file {path}: unsupported nanoternary.format_version {version}")
        return ModelConfig.from_dict(json.loads(field_value(reader, "nanoternary.config", path)))
    keys = {field: key.format(arch=arch) for field, key in BITNET_KEYS.items()}
    missing_keys(reader, list(keys.values()), path)
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise ValueError(f"GGUF file {path} has no token_embd.weight tensor")
    hparams = {field: field_value(reader, key, path) for field, key in keys.items()}
    hparams = {k: float(v) if k in ("norm_eps", "rope_theta") else int(v) for k, v in hparams.items()}
    return ModelConfig(vocab_size=int(embed.shape[1]), quantize=True, group_size=0, sub_norms=True, **hparams)


def read_tokenizer(reader: gguf.GGUFReader, path: Path) -> TextTokenizer:
    missing_keys(reader, [K.Tokenizer.MODEL, *TOKENIZER_KEYS], path)
    model = field_value(reader, K.Tokenizer.MODEL, path)
    if model != "gpt2":
        raise ValueError(
            f"GGUF file {path}: tokenizer.ggml.model is {model!r}; only byte-level BPE 'gpt2' is supported"
        )
    return tokenizer_from_vocab(*(field_value(reader, k, path) for k in TOKENIZER_KEYS))


def tensor_array(t: Any) -> np.ndarray:
    """A GGUF tensor as float32 in PyTorch (out, in) order."""
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))


def read_gguf(path: str | Path) -> ModelTensors:
    """Read a GGUF written by `write_gguf` (either arch) back into exactly the tensors that were written."""
    path = Path(path)
    reader = open_reader(path)
    arch = field_value(reader, K.General.ARCHITECTURE, path)
    if arch not in ARCHS:
        raise ValueError(f"GGUF file {path} has architecture {arch!r}; expected one of {ARCHS}")
    cfg = read_config(reader, arch, path)
    tokenizer = read_tokenizer(reader, path)
    rename = from_bitnet_name if arch == "bitnet" else (lambda n: n)
    arrays = {t.name: t for t in reader.tensors}
    dense: dict[str, torch.Tensor] = {}
    ternary: dict[str, TernaryTensor] = {}
    for gname, t in arrays.items():
        if gname.endswith(SCALE_SUFFIX):
            continue
        name, values = rename(gname), tensor_array(t)
        if scale_name(gname) not in arrays:
            dense[name] = torch.from_numpy(values.copy())
            continue
        if not np.isin(values, (-1.0, 0.0, 1.0)).all():
            raise ValueError(
                f"GGUF file {path}: {gname} holds values outside {{-1, 0, +1}}: not ternary codes"
            )
        scales = torch.from_numpy(tensor_array(arrays[scale_name(gname)]).copy())
        codes = torch.from_numpy(values.astype(np.int8))
        ternary[name] = TernaryTensor(codes, scales.reshape(1, 1) if scales.numel() == 1 else scales)
    meta = (
        json.loads(field_value(reader, "nanoternary.meta", path))
        if "nanoternary.meta" in reader.fields
        else {}
    )
    return ModelTensors(cfg, dense, ternary, tokenizer, {**meta, "gguf_arch": arch})


# ---- export = write + verify + rename ---------------------------------------------------------------
def verify_gguf(path: Path, expected: ModelTensors, embed_type: str) -> None:
    """Read the file back and check names, shapes, dtypes-rounded values and every ternary code."""
    got = read_gguf(path)
    if set(got.ternary) != set(expected.ternary) or set(got.dense) != set(expected.dense):
        raise ValueError(f"GGUF check failed for {path}: tensor names differ from the model's")
    for key, t in expected.ternary.items():
        g = got.ternary[key]
        if not (torch.equal(g.codes, t.codes) and torch.equal(g.scales, t.scales.float())):
            raise ValueError(f"GGUF check failed for {path}: ternary codes or scales of {key} differ")
    for key, v in expected.dense.items():
        kind = EMBED_TYPES[embed_type] if key == EMBED else Q.F32
        want = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(v.float().numpy(), kind), kind))
        if got.dense[key].shape != want.shape or not torch.equal(got.dense[key], want):
            raise ValueError(
                f"GGUF check failed for {path}: {key} differs (shape {tuple(got.dense[key].shape)})"
            )


def export_gguf(
    path: str | Path,
    tensors: ModelTensors,
    arch: str = "nanoternary",
    qtype: str = "tq2_0",
    embed_type: str = "f16",
    name: str = "nanoternary",
    progress: Progress | None = None,
) -> Path:
    """Write to a temp file, verify it by reading it back, then rename it into place atomically."""
    path = Path(path)
    with atomic_file(path) as tmp:
        write_gguf(tmp, tensors, arch, qtype, embed_type, name, progress)
        verify_gguf(tmp, tensors, embed_type)
    return path


def write_model_gguf(
    path: Path,
    tensors: ModelTensors,
    arch: str = "auto",
    qtype: str = "tq2_0",
    embed_type: str = "f16",
    name: str = "nanoternary",
    progress: bool = False,
) -> Path:
    """export_gguf with a progress bar and a log line; arch `auto` picks bitnet when the model fits it."""
    arch = choose_arch(arch, tensors.cfg)
    total = len(tensors.dense) + len(tensors.ternary)
    with tqdm(
        total=total, desc=f"GGUF {path.name} ({arch}, {qtype})", disable=not progress, leave=False
    ) as bar:
        export_gguf(
            path,
            tensors,
            arch,
            qtype,
            embed_type,
            name,
            progress=lambda done, _total, _name: bar.update(done - bar.n),
        )
    log.info("wrote %s (arch %s, %s, %.2f MB)", path, arch, qtype, path.stat().st_size / 1e6)
    return path


def folder_to_gguf(
    folder: Path, arch: str = "auto", qtype: str = "tq2_0", embed_type: str = "f16", progress: bool = False
) -> Path:
    """Convert one model folder into <folder>/model.gguf (atomic, verified)."""
    return write_model_gguf(
        folder / GGUF_NAME,
        ModelTensors.from_folder(folder),
        arch,
        qtype,
        embed_type,
        display_name(folder),
        progress,
    )

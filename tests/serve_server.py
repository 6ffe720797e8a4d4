"""A tiny model folder for the server tests (tests/integration/conftest.py serves it).

The model is freshly initialized (no training: the tests check the server, not the model's skill) with a
512-token byte-level BPE trained in a second on a little stdlib source and some non-ASCII text, so that
sampled tokens often split UTF-8 characters and the streaming code must hold them back. Servers run with
one torch thread: on a busy machine a second one makes a model this small ten times slower.
"""

from __future__ import annotations

import inspect
import json
import re
import textwrap
from pathlib import Path

import torch

from nanoternary.data.tokenizer import TextTokenizer
from nanoternary.io.export_dir import save_export
from nanoternary.model.bitlinear import BitLinear
from nanoternary.model.config import ModelConfig
from nanoternary.model.transformer import TernaryLM

API_KEY = "test-key-123"
CHAT_TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>\n{% endfor %}<assistant>"
CHAT_STOP = ["</assistant>"]
TINY = ModelConfig(
    vocab_size=512, dim=64, n_layers=1, n_heads=2, ffn_dim=128, context_length=128, group_size=64
)


def build_tiny_model(path: Path, cfg: ModelConfig = TINY) -> Path:
    """An export folder with a random tiny model, its tokenizer, and a chat template in meta.json."""
    texts = [inspect.getsource(m) for m in (textwrap, json.decoder, re)]
    texts += ["héllo wörld — ünïcödé ✓ 日本語のテキスト ñandú café 🙂 ∑ π ≈ 3.14159"] * 20
    tokenizer = TextTokenizer.train(texts, cfg.vocab_size)
    torch.manual_seed(0)
    model = TernaryLM(cfg)
    with torch.no_grad():  # louder blocks: a fresh model's greedy output then varies instead of echoing
        for module in model.modules():  # its last token, and stop strings and UTF-8 splits get exercised
            if isinstance(module, BitLinear):
                module.weight.mul_(30)
    meta = {"step": 0, "chat_template": CHAT_TEMPLATE, "chat_stop": CHAT_STOP}
    return save_export(path, model, tokenizer, meta)

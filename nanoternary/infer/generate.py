"""Greedy text completion straight from a TernaryLM: the end-of-training sample."""

from __future__ import annotations

from nanoternary.data.tokenizer import TextTokenizer
from nanoternary.infer.engine import Engine
from nanoternary.io.tensors import ModelTensors
from nanoternary.model.transformer import TernaryLM


def greedy_complete(model: TernaryLM, tokenizer: TextTokenizer, prompt: str, max_new_tokens: int = 48) -> str:
    """Argmax decoding through the inference engine (as a user would run the exported model); stops at
    end-of-text, after max_new_tokens or at the context length."""
    device = next(model.parameters()).device
    engine = Engine(ModelTensors.from_model(model, tokenizer), device=str(device))
    return engine.generate([prompt], max_new_tokens)[0].text

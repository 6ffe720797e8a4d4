"""Greedy text completion straight from a TernaryLM: the end-of-training sample."""

from __future__ import annotations

from nanoternary.data.tokenizer import TextTokenizer
from nanoternary.infer.engine import Engine
from nanoternary.io.tensors import ModelTensors
from nanoternary.model.transformer import TernaryLM


def greedy_complete(model: TernaryLM, tokenizer: TextTokenizer, prompt: str, max_new_tokens: int = 48) -> str:
    """Argmax decoding through the inference engine (as a user would run the exported model); stops at
    end-of-text, after max_new_tokens or at the context length. Backend int8 on the CPU: a short sample
    is not worth compiling the C++ kernel for."""
    device = next(model.parameters()).device
    backend = "int8" if device.type == "cpu" else "fp32"
    engine = Engine(ModelTensors.from_model(model, tokenizer), device=str(device), backend=backend)
    return engine.generate([prompt], max_new_tokens)[0].text

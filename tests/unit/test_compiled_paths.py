"""The model's compile-only code paths (written-out causal attention on CPU, broadcast stream products)
compute what their eager counterparts compute. The functions are traced by Dynamo exactly as under
torch.compile, and the traced graph is run as is (no inductor: fast, and it is the math under test)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanoternary.model.config import ModelConfig
from nanoternary.model.mhc import mix_streams, read_streams
from nanoternary.model.transformer import TernaryLM, causal_attention, causal_bias


def attention_and_streams(q, k, v, pre, h_res, x):
    # a mask longer than the sequence, as the model's is: the attention uses its top-left T x T corner
    return causal_attention(q, k, v, causal_bias(20)), read_streams(pre, x), mix_streams(h_res, x)


def compiled_recording(fn):
    """fn compiled by Dynamo with a backend that keeps each traced graph and runs it as it is."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return torch.compile(fn, backend=record, dynamic=False), graphs


def called(graph: torch.fx.GraphModule) -> list[str]:
    return [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]


def outputs_and_grads(fn, tensors):
    leaves = [t.clone().requires_grad_() for t in tensors]
    outs = fn(*leaves)
    sum(o.square().sum() for o in outs).backward()
    return [*outs, *(t.grad for t in leaves)]


def test_compiled_paths_match_eager():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 16, 8, generator=g)
    k, v = torch.randn(2, 2, 16, 8, generator=g), torch.randn(2, 2, 16, 8, generator=g)  # grouped: 2 kv heads
    pre, h_res = torch.rand(2, 16, 3, generator=g), torch.rand(2, 16, 3, 3, generator=g)
    tensors = [q, k, v, pre, h_res, torch.randn(2, 16, 3, 5, generator=g)]
    compiled, graphs = compiled_recording(attention_and_streams)
    traced = outputs_and_grads(compiled, tensors)
    (graph,) = graphs
    assert not any("scaled_dot_product_attention" in c or "einsum" in c for c in called(graph)), called(graph)
    eager = outputs_and_grads(attention_and_streams, tensors)
    for a, b in zip(traced, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(eager[0], expected)  # the eager path is PyTorch's causal SDPA


def test_causal_bias_is_zero_on_and_below_the_diagonal_and_minus_inf_above():
    inf = float("inf")
    expected = torch.tensor([[0.0, -inf, -inf], [0.0, 0.0, -inf], [0.0, 0.0, 0.0]])
    assert torch.equal(causal_bias(3), expected)


def test_without_a_bias_the_compiled_attention_is_sdpa():
    q = torch.randn(1, 2, 8, 4)
    compiled, graphs = compiled_recording(causal_attention)
    compiled(q, q, q)
    (graph,) = graphs
    assert any("scaled_dot_product_attention" in c for c in called(graph)), called(graph)


def test_the_compiled_model_writes_out_its_attention_with_its_mask_and_matches_eager():
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=64, dim=32, n_layers=2, n_heads=2, ffn_dim=64, context_length=24, quantize=False
    )
    model = TernaryLM(cfg)
    assert model.causal_bias.shape == (24, 24)
    idx = torch.randint(0, 64, (2, 20))
    compiled, graphs = compiled_recording(model)
    traced = compiled(idx)
    (graph,) = graphs
    assert not any("scaled_dot_product_attention" in c for c in called(graph)), called(graph)
    torch.testing.assert_close(traced, model(idx), rtol=1e-5, atol=1e-5)

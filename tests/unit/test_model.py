import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nanoternary.model.config import ModelConfig
from nanoternary.model.transformer import TernaryLM, apply_rope, rope_tables
from tests.conftest import REPO_ROOT


def test_tiny_shape_and_parameter_count():
    model = TernaryLM(ModelConfig())
    # embedding 1,048,576 + 4 x (attention 262,144 + FFN 393,216 + 2 norms 512) + final norm 256
    assert model.num_parameters() == 1_048_576 + 4 * (262_144 + 393_216 + 512) + 256 == 3_672_320
    logits = model(torch.randint(0, 4096, (2, 17)))
    assert logits.shape == (2, 17, 4096)


@pytest.mark.parametrize("quantize", [True, False])
def test_initial_loss_is_ln_vocab_within_5_percent(quantize):
    torch.manual_seed(0)
    model = TernaryLM(ModelConfig(quantize=quantize))
    x = torch.randint(0, 4096, (4, 128))
    y = torch.randint(0, 4096, (4, 128))
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    assert abs(loss - math.log(4096)) / math.log(4096) < 0.05


def test_gqa_and_sub_norms_shapes():
    cfg = ModelConfig(n_heads=4, n_kv_heads=2, sub_norms=True)
    model = TernaryLM(cfg)
    attn = model.blocks[0].attn
    assert attn.k_proj.weight.shape == (128, 256) and attn.v_proj.weight.shape == (128, 256)
    assert attn.sub_norm.weight.shape == (256,)
    assert model.blocks[0].ffn.sub_norm.weight.shape == (512,)
    assert model(torch.randint(0, 4096, (1, 8))).shape == (1, 8, 4096)


def test_causality_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    model = TernaryLM(ModelConfig(n_layers=2)).eval()
    x = torch.randint(0, 4096, (1, 12))
    y = x.clone()
    y[0, 8:] = torch.randint(0, 4096, (4,))
    assert torch.allclose(model(x)[0, :8], model(y)[0, :8], atol=1e-5)


def test_rope_rotate_half_preserves_norm_and_is_relative():
    cos, sin = rope_tables(8, 16, 10000.0)
    q = torch.randn(1, 1, 16, 8)
    assert torch.allclose(apply_rope(q, cos, sin).norm(dim=-1), q.norm(dim=-1), atol=1e-5)
    k = torch.randn(1, 1, 1, 8)
    a = apply_rope(q[:, :, 3:4], cos[5:6], sin[5:6]) @ apply_rope(k, cos[2:3], sin[2:3]).transpose(-1, -2)
    b = apply_rope(q[:, :, 3:4], cos[9:10], sin[9:10]) @ apply_rope(k, cos[6:7], sin[6:7]).transpose(-1, -2)
    assert torch.allclose(a, b, atol=1e-5)


def libm_rope(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables from Python's math module, one float64 angle at a time, rounded to fp32."""
    inv_freq = [1.0 / theta ** (i / head_dim) for i in range(0, head_dim, 2)]
    angles = [[pos * f for f in inv_freq * 2] for pos in range(length)]
    return tuple(
        torch.tensor([[fn(a) for a in row] for row in angles], dtype=torch.float64).float()
        for fn in (math.cos, math.sin)
    )


def test_rope_tables_are_libm_cos_sin_rounded_to_fp32_in_every_process():
    """Bit for bit, and also when the tables are the first math a process does: torch's own cos/sin got half
    of such a first table wrong in about one fresh process in ten (MKL VML's threads), which made
    otherwise identical runs, and a run and its resume, differ."""
    for shape in ((64, 64, 10000.0), (64, 256, 10000.0), (32, 96, 500000.0)):
        cos, sin = rope_tables(*shape)
        ref_cos, ref_sin = libm_rope(*shape)
        assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (shape[1], shape[0])
        assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin), shape
    expected = rope_tables(64, 256, 10000.0)[0].numpy().tobytes().hex()
    code = "from nanoternary.model.transformer import rope_tables; print(rope_tables(64, 256, 10000.0)[0].numpy().tobytes().hex())"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    for _ in range(6):  # one after another, as runs start: processes started together hit it less often
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True
        )
        assert out.stdout.strip() == expected, out.stderr[-2000:]


def test_too_long_sequence_and_bad_configs_are_rejected():
    model = TernaryLM(ModelConfig(context_length=8, n_layers=1))
    with pytest.raises(ValueError, match="sequence length 9 exceeds context_length 8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="not divisible by model.n_heads"):
        ModelConfig(dim=250, n_heads=4)
    with pytest.raises(ValueError, match="not a multiple of model.group_size=256"):
        ModelConfig(ffn_dim=600)
    with pytest.raises(ValueError, match=r"unknown model config keys: \['widht'\]"):
        ModelConfig.from_dict({"widht": 3})

import torch

from nanoternary.model.bitlinear import BitLinear
from nanoternary.model.quant import (
    expand_scales,
    quantize_activation,
    quantize_weight,
    ternarize,
    weight_scales,
)


def test_absmean_ternary_codes_and_scales_by_hand():
    w = torch.tensor([[0.5, -0.1, 1.0, -2.0], [0.0, 0.0, 0.3, -0.3]])
    codes, scales = ternarize(w, group_size=2, fp16_scales=False)
    # group means of |w|: row0 (0.3, 1.5), row1 (0.0 -> eps, 0.3)
    assert torch.allclose(scales, torch.tensor([[0.3, 1.5], [1e-8, 0.3]]))
    assert codes.tolist() == [[1, 0, 1, -1], [0, 0, 1, -1]]
    assert codes.dtype == torch.int8


def test_per_tensor_scale_and_fp16_rounding():
    w = torch.tensor([[0.1, -0.2], [0.3, -0.4]])
    s = weight_scales(w, group_size=0, fp16_scales=True)
    assert s.shape == (1, 1)
    assert s.item() == torch.tensor(0.25).half().float().item()
    s16 = weight_scales(torch.full((2, 4), 0.1234567), group_size=4, fp16_scales=True)
    assert torch.equal(s16, s16.half().float())


def test_quantized_weight_is_codes_times_scales_with_identity_gradient():
    torch.manual_seed(0)
    w = torch.randn(8, 16, requires_grad=True)
    q = quantize_weight(w, group_size=8)
    codes, scales = ternarize(w, group_size=8)
    assert torch.allclose(q, codes.float() * expand_scales(scales, w.shape))
    (q * torch.arange(q.numel()).reshape_as(q)).sum().backward()
    assert torch.equal(w.grad, torch.arange(w.numel()).reshape_as(w).float())


def test_activation_8bit_absmax_per_token():
    x = torch.tensor([[1.0, -0.5, 0.25, 0.004], [10.0, 3.3, -10.0, 0.0]], requires_grad=True)
    q = quantize_activation(x)
    levels = q.detach() / (x.detach().abs().amax(-1, keepdim=True) / 127)
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert torch.allclose(q[0], torch.tensor([1.0, -64 / 127, 32 / 127, 1 / 127]), atol=1e-6)
    assert len(torch.unique(q.detach()[1])) == 4
    q.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_bitlinear_equals_float_matmul_on_dequantized_weights():
    torch.manual_seed(1)
    layer = BitLinear(512, 64, group_size=256)
    x = torch.randn(3, 5, 512)
    codes, scales = layer.ternary()
    dequant = codes.float() * expand_scales(scales, layer.weight.shape)
    expected = quantize_activation(x) @ dequant.T
    assert torch.allclose(layer(x), expected, atol=1e-5)
    fp = BitLinear(512, 64, quantize=False)
    fp.weight.data.copy_(layer.weight.data)
    assert torch.allclose(fp(x), x @ layer.weight.T, atol=1e-5)

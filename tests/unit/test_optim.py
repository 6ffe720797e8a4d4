import pytest
import torch

from nanoternary.model.bitlinear import BitLinear
from nanoternary.model.config import ModelConfig
from nanoternary.model.transformer import TernaryLM
from nanoternary.optim.grouping import split_params
from nanoternary.optim.lion import Lion


@pytest.mark.parametrize(
    "cfg", [ModelConfig(), ModelConfig(sub_norms=True, n_kv_heads=2), ModelConfig(quantize=False)]
)
def test_every_parameter_in_exactly_one_group(cfg):
    model = TernaryLM(cfg)
    muon, lion = split_params(model)
    ids = [id(p) for p in muon + lion]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    bitlinear_weights = {id(m.weight) for m in model.modules() if isinstance(m, BitLinear)}
    assert {id(p) for p in muon} == bitlinear_weights
    assert all(p.ndim == 2 for p in muon)
    assert id(model.embed.weight) in {id(p) for p in lion}
    assert len(muon) == 7 * cfg.n_layers


def test_lion_update_matches_the_paper_formula():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 3.0]))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    m = torch.tensor([0.0, 0.0, 0.0, 0.0])
    expected = p.detach().clone()
    for g in (torch.tensor([0.2, -0.1, 0.0, 1.0]), torch.tensor([-0.3, -0.1, 0.0, 0.5])):
        p.grad = g.clone()
        opt.step()
        c = 0.9 * m + 0.1 * g
        expected = expected * (1 - 0.1 * 0.5) - 0.1 * torch.sign(c)
        m = 0.99 * m + 0.01 * g
        assert torch.allclose(p.detach(), expected, atol=1e-6)
    assert torch.allclose(opt.state[p]["exp_avg"], m)


def test_lion_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="Lion lr must be > 0"):
        Lion([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    with pytest.raises(ValueError, match=r"Lion betas must be in \[0, 1\)"):
        Lion([torch.nn.Parameter(torch.zeros(1))], betas=(0.9, 1.0))

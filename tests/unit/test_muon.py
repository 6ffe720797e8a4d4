"""BatchedMuon against torch.optim.Muon: the same updates, states and validation, for every option."""

from __future__ import annotations

import pytest
import torch

from nanoternary.model.config import ModelConfig
from nanoternary.model.transformer import TernaryLM
from nanoternary.optim.factory import make_optimizers
from nanoternary.optim.muon import BatchedMuon, newton_schulz
from nanoternary.optim.muon import adjusted_lr as our_adjusted_lr

SHAPES = [(64, 64), (64, 64), (128, 64), (64, 128), (128, 64), (32, 96)]  # square, tall, wide, mixed


def twin_params(seed: int = 0) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    g = torch.Generator().manual_seed(seed)
    base = [torch.randn(shape, generator=g) * 0.02 for shape in SHAPES]
    return [torch.nn.Parameter(t.clone()) for t in base], [torch.nn.Parameter(t.clone()) for t in base]


@pytest.mark.parametrize(
    "options",
    [
        dict(nesterov=True, weight_decay=0.0, adjust_lr_fn="original", ns_steps=3),
        dict(nesterov=False, weight_decay=0.1, adjust_lr_fn="match_rms_adamw", ns_steps=5),
        dict(nesterov=True, weight_decay=0.01, adjust_lr_fn=None, ns_steps=1, momentum=0.9),
    ],
)
def test_updates_and_states_equal_torch_muon(options):
    ours, theirs = twin_params()
    opts = [BatchedMuon(ours, lr=0.02, **options), torch.optim.Muon(theirs, lr=0.02, **options)]
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        grads = [torch.randn(shape, generator=g) for shape in SHAPES]
        for params in (ours, theirs):
            for p, grad in zip(params, grads, strict=True):
                p.grad = None if step == 2 and p is params[0] else grad.clone()  # one parameter skips a step
        for opt in opts:
            opt.step()
        for a, b in zip(ours, theirs, strict=True):
            # bf16 Newton-Schulz: equal up to bf16 rounding of the orthogonalized update (lr x 2^-8)
            torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0.02 * 2**-8 * 2)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(opts[0].state[a]["momentum_buffer"], opts[1].state[b]["momentum_buffer"])
    assert opts[0].state_dict()["param_groups"] == opts[1].state_dict()["param_groups"]


def test_state_dicts_are_interchangeable():
    ours, theirs = twin_params()
    a, b = BatchedMuon(ours, lr=0.02), torch.optim.Muon(theirs, lr=0.02)
    for p in ours:
        p.grad = torch.ones_like(p)
    a.step()
    b.load_state_dict(a.state_dict())
    assert [s["momentum_buffer"].sum().item() for s in b.state.values()] == pytest.approx(
        [0.05 * p.numel() for p in ours]
    )


def test_newton_schulz_of_a_stack_is_the_per_matrix_result():
    g = torch.Generator().manual_seed(2)
    stack = torch.randn(5, 32, 48, generator=g)
    batched = newton_schulz(stack, (3.4445, -4.775, 2.0315), 3, 1e-7)
    single = torch.stack([newton_schulz(m.unsqueeze(0), (3.4445, -4.775, 2.0315), 3, 1e-7)[0] for m in stack])
    assert batched.dtype == torch.bfloat16 and batched.shape == (5, 32, 48)
    torch.testing.assert_close(batched, single, rtol=0, atol=2**-7)
    # what it approximates: singular values pulled towards 1 (the polynomial maps them into ~[0.7, 1.2])
    s = torch.linalg.svdvals(batched.float())
    assert s.min() > 0.5 and s.max() < 1.3


@pytest.mark.parametrize("fn", [None, "original", "match_rms_adamw"])
@pytest.mark.parametrize("shape", [(256, 512), (512, 256), (64, 64)])
def test_adjusted_lr_is_torchs(fn, shape):
    from torch.optim._muon import _adjust_lr

    assert our_adjusted_lr(0.02, fn, torch.Size(shape)) == _adjust_lr(0.02, fn, torch.Size(shape))


def test_validation_is_torchs():
    with pytest.raises(ValueError, match="Muon only supports 2D parameters"):
        BatchedMuon([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="Adjust learning rate function"):
        BatchedMuon([torch.nn.Parameter(torch.zeros(2, 2))], adjust_lr_fn="bogus")


def test_the_trainer_gets_batched_muon_and_the_reference_torchs():
    model = TernaryLM(ModelConfig(dim=64, n_heads=2, ffn_dim=128, n_layers=1, group_size=64, vocab_size=128))
    optim = {
        "name": "muon_lion",
        "muon": dict(
            lr=0.02, momentum=0.95, nesterov=True, ns_steps=3, weight_decay=0.0, adjust_lr_fn="original"
        ),
        "lion": dict(lr=1e-3, betas=[0.9, 0.99], weight_decay=0.0),
    }
    assert type(make_optimizers(model, optim)[0]) is BatchedMuon
    assert type(make_optimizers(model, optim, muon_cls=torch.optim.Muon)[0]) is torch.optim.Muon
    with pytest.raises(ValueError, match="unknown optim.name 'sgd'"):
        make_optimizers(model, {**optim, "name": "sgd"})

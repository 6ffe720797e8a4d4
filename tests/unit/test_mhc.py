import csv
import math

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from nanoternary.cli.train import CONF_DIR
from nanoternary.lit.module import LitTernaryLM
from nanoternary.model.config import MHCConfig, ModelConfig
from nanoternary.model.mhc import (
    MHCLiteResidual,
    MHCProbe,
    SeedResidual,
    StreamIO,
    StreamResidual,
    combine_permutations,
    permutation_table,
)
from nanoternary.model.transformer import TernaryLM
from nanoternary.optim.grouping import split_params
from nanoternary.optim.lion import Lion
from tests.conftest import REPO_ROOT
from tests.tiny_run import TINY_MODEL, tiny_datamodule, tiny_trainer

TOL = 1e-6


def preset(name: str) -> ModelConfig:
    """A model preset exactly as `python train.py model=<name>` composes it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"model={name}"])
    return ModelConfig.from_dict(dict(cfg.model))


def small(n_streams: int, mode: str = "dynamic", n_layers: int = 2) -> ModelConfig:
    return ModelConfig(n_layers=n_layers, context_length=64, mhc=MHCConfig(n_streams, mode))


def mhc_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {
        f"{name}.{p_name}": p
        for name, m in model.named_modules()
        if isinstance(m, StreamResidual)
        for p_name, p in m.named_parameters()
    }


def mixture(logits: torch.Tensor) -> torch.Tensor:
    """H_res of (..., n!) fp32 logits."""
    n = {math.factorial(k): k for k in range(1, 6)}[logits.shape[-1]]
    return combine_permutations(torch.softmax(logits, dim=-1), permutation_table(n))


def assert_doubly_stochastic(h: torch.Tensor, tol: float = TOL) -> None:
    assert h.dtype == torch.float32
    assert bool((h >= 0).all())
    assert (h.sum(-1) - 1).abs().max().item() <= tol
    assert (h.sum(-2) - 1).abs().max().item() <= tol


def train_steps(model: TernaryLM, steps: int, seed: int = 0) -> None:
    """Real Muon + Lion steps (the default optimizer routing) on random tokens; leaves the last gradients."""
    muon, lion = split_params(model)
    opts = [
        torch.optim.Muon(muon, lr=0.02, weight_decay=0.0, ns_steps=3, adjust_lr_fn="original"),
        Lion(lion, lr=1e-4),
    ]
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(seed))
    for step in range(steps):
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
        if step < steps - 1:
            for opt in opts:
                opt.step()


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_permutation_table_is_complete_and_unique(n):
    table = permutation_table(n)
    assert table.shape == (math.factorial(n), n, n)
    assert torch.equal(table[0], torch.eye(n))
    assert set(table.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(table.sum(-1), torch.ones(len(table), n)) and torch.equal(
        table.sum(-2), torch.ones(len(table), n)
    )
    assert len({tuple(p.flatten().tolist()) for p in table}) == math.factorial(n)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_h_res_is_doubly_stochastic_for_random_inputs_and_extreme_logits(n, autocast):
    """The residual's own path: static logits of ±1e4 and a dynamic part pushed to |logits| ~ 1e4."""
    torch.manual_seed(n)
    res = MHCLiteResidual(n, dim=32, favoured=1, dynamic=True, gate_init=0.01, eps=1e-6)
    with torch.no_grad():
        res.res_bias.copy_(torch.randint(-1, 2, res.res_bias.shape) * 1e4)
        res.proj.normal_(std=50.0)
        res.gates.fill_(100.0)
    x = torch.randn(3, 7, n, 32) * torch.logspace(-3, 3, 7).view(1, 7, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        h = combine_permutations(res.res_weights(x.bfloat16() if autocast else x), res.perms)
        out = res(x, lambda v: v)
    assert h.shape == (3, 7, n, n) and out.dtype == torch.float32
    assert_doubly_stochastic(h)
    assert (h - h[0, 0]).abs().max() > 0.5  # really input-dependent
    # saturated logits give exactly a permutation matrix
    assert torch.equal(mixture(torch.tensor([0.0] + [-1e4] * (math.factorial(n) - 1))), torch.eye(n))


def test_products_over_64_layers_stay_doubly_stochastic():
    gen = torch.Generator().manual_seed(0)
    layers = mixture(torch.randn(64, 256, 24, generator=gen) * 5)
    product = layers[0]
    for h in layers[1:]:
        product = h @ product
    assert_doubly_stochastic(product, tol=1e-5)  # 64 fp32 products: rounding grows to ~2e-6
    assert product.abs().sum(-1).max() <= 1 + 1e-5 and product.abs().sum(-2).max() <= 1 + 1e-5


def test_n_streams_1_reproduces_the_plain_residual_forward_exactly():
    torch.manual_seed(0)
    model = TernaryLM(small(1)).eval()
    assert not mhc_params(model)
    idx = torch.randint(0, 4096, (2, 16))
    cos, sin = model.rope_cos[:16], model.rope_sin[:16]
    x = model.embed(idx)
    for block in model.blocks:
        x = x + block.attn(block.attn_norm(x), cos, sin)
        x = x + block.ffn(block.ffn_norm(x))
    expected = F.linear(model.norm(x), model.embed.weight)
    assert torch.equal(model(idx), expected)


def test_bad_mhc_configs_are_rejected_with_clear_messages():
    with pytest.raises(
        ValueError, match=r"model.mhc.n_streams must be in 1..5 \(n! permutation matrices\), got 6"
    ):
        MHCConfig(n_streams=6)
    with pytest.raises(
        ValueError, match=r"model.mhc.mode must be one of \('dynamic', 'static', 'seed'\), got 'bogus'"
    ):
        ModelConfig.from_dict({"mhc": {"n_streams": 4, "mode": "bogus"}})
    with pytest.raises(ValueError, match="2-stream variant: set n_streams=2"):
        MHCConfig(n_streams=4, mode="seed")
    with pytest.raises(ValueError, match="gate_init must be non-zero in dynamic mode"):
        MHCConfig(n_streams=4, gate_init=0.0)


def test_seed_tiny_is_the_original_architecture():
    cfg = preset("seed_tiny")
    assert (cfg.group_size, cfg.fp16_scales, cfg.mhc.n_streams, cfg.mhc.mode) == (128, False, 2, "seed")
    model = TernaryLM(cfg)
    assert model.num_parameters() == 3_672_392
    residuals = [m for m in model.modules() if isinstance(m, SeedResidual)]
    assert len(residuals) == 8 and all(sum(p.numel() for p in r.parameters()) == 9 for r in residuals)
    assert isinstance(model.streams, StreamIO) and model.streams.reduce_mean


def test_tiny_preset_uses_four_dynamic_streams():
    cfg = preset("tiny")
    assert (cfg.mhc.n_streams, cfg.mhc.mode, cfg.mhc.gate_init) == (4, "dynamic", 0.01)


def test_seed_variant_streams_stay_identical_and_alpha_gets_exactly_zero_gradient():
    torch.manual_seed(0)
    model = TernaryLM(small(2, "seed"))
    train_steps(model, steps=3)
    for m in model.modules():
        if isinstance(m, SeedResidual):
            assert m.alpha_logit.grad is not None and m.alpha_logit.grad.item() == 0.0
            assert m.post_logits.grad.abs().min() > 0  # the other parameters do learn...
            for p in (m.pre_logits, m.pre_bias, m.post_logits, m.post_bias):  # ...but symmetrically
                assert p[0].item() == p[1].item()
                assert p.grad[0].item() == pytest.approx(p.grad[1].item(), rel=0.05)  # equal up to rounding
    with MHCProbe(model) as probe:
        model(torch.randint(0, 4096, (2, 16)))
    assert probe.summary()["mhc/stream_distance"] == 0.0


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_default_init_streams_diverge_and_every_mhc_parameter_learns(mode):
    torch.manual_seed(0)
    model = TernaryLM(small(4, mode))
    params = mhc_params(model)
    assert params
    train_steps(model, steps=3)
    for name, p in params.items():
        assert p.grad is not None, name
        # every element of the small tensors, and the projection as a whole
        nonzero = p.grad.abs().sum() > 0 if p.ndim == 2 else bool((p.grad != 0).all())
        assert nonzero, f"{name} has a zero gradient"
    with MHCProbe(model) as probe:
        model(torch.randint(0, 4096, (2, 16)))
    assert probe.summary()["mhc/stream_distance"] > 0.1


def test_first_and_last_sublayers_do_not_mix_because_it_would_be_inert():
    model = TernaryLM(small(4))
    residuals = [r for b in model.blocks for r in (b.attn_residual, b.ffn_residual)]
    for i, res in enumerate(residuals):
        mixes = 0 < i < len(residuals) - 1
        assert hasattr(res, "res_bias") == mixes
        assert res.proj.shape == ((32 if mixes else 8), 4 * 256) and res.gates.shape == ((3 if mixes else 2),)
    h = mixture(torch.randn(5, 24) * 3)
    # first: every doubly stochastic matrix maps n identical streams (the expanded embedding) to themselves
    same = model.streams.expand(torch.randn(5, 12))
    assert same.shape == (5, 4, 12)
    assert torch.allclose(h @ same, same, atol=1e-6)
    # last: the streams are summed next, and the columns of H_res sum to 1
    x = torch.randn(5, 4, 12)
    assert torch.allclose(model.streams.reduce(h @ x), model.streams.reduce(x), atol=1e-5)


def test_static_init_favours_stream_layer_mod_n_and_is_identity_heavy():
    model = TernaryLM(small(4, "static", n_layers=5))
    for layer, block in enumerate(model.blocks):
        for res in (block.attn_residual, block.ffn_residual):
            expected = torch.full((4,), -1.0)
            expected[layer % 4] = 1.0
            assert torch.equal(res.pre_bias, expected) and torch.equal(res.post_bias, expected)
            assert not hasattr(res, "proj")
    res = model.blocks[1].attn_residual
    assert res.res_bias[0] == 0 and bool((res.res_bias[1:] == -8).all())


def test_mhc_parameters_go_to_lion_only():
    for cfg in (small(4), small(4, "static"), preset("seed_tiny")):
        model = TernaryLM(cfg)
        muon, lion = split_params(model)
        lion_ids, muon_ids = {id(p) for p in lion}, {id(p) for p in muon}
        params = mhc_params(model)
        assert params and all(id(p) in lion_ids and id(p) not in muon_ids for p in params.values())
        assert len(muon) + len(lion) == len(list(model.parameters()))


@pytest.mark.parametrize("n", [2, 4])
def test_validation_metrics_on_a_fresh_model(n):
    torch.manual_seed(0)
    model = TernaryLM(small(n)).eval()
    with torch.no_grad(), MHCProbe(model) as probe:
        model(torch.randint(0, 4096, (2, 16)))
        model(torch.randint(0, 4096, (3, 8)))
    stats = probe.summary()
    identity = 1 / (1 + (math.factorial(n) - 1) * math.exp(-8))  # the -8 init, dynamic part still zero
    assert stats["mhc/res_identity_weight"] == pytest.approx(identity, abs=1e-6)
    assert 1 - 1e-5 <= stats["mhc/composite_gain"] <= 1 + 1e-5
    assert stats["mhc/stream_distance"] > 0.1
    assert not probe.handles and all(not m._forward_hooks for m in probe.residuals)  # hooks removed
    seed = TernaryLM(small(2, "seed")).eval()
    with torch.no_grad(), MHCProbe(seed) as probe:
        seed(torch.randint(0, 4096, (2, 16)))
    assert probe.summary()["mhc/res_identity_weight"] == pytest.approx(1 / (1 + math.exp(-5)), abs=1e-6)
    assert MHCProbe(TernaryLM(small(1))).summary() == {}


def test_streams_keep_fp32_under_bf16_autocast_and_match_fp32_closely():
    torch.manual_seed(0)
    model = TernaryLM(small(4)).eval()
    idx = torch.randint(0, 4096, (2, 16))
    res = model.blocks[1].ffn_residual
    seen = []
    res.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(idx)
    assert seen == [(torch.float32, torch.float32)]
    assert (low.float() - model(idx)).abs().max() < 0.1


def test_dynamic_logits_are_the_projection_of_the_rms_normed_streams():
    """The norm is applied after the product (no normalized copy of the streams): the same value, fp32 even
    under bf16 autocast like the rest of the coefficients."""
    torch.manual_seed(0)
    res = MHCLiteResidual(4, dim=32, favoured=1, dynamic=True, gate_init=0.01, eps=1e-6)
    with torch.no_grad():
        res.proj.normal_(std=0.5)
    x = torch.randn(2, 5, 4, 32) * torch.logspace(-2, 2, 5).view(1, 5, 1, 1)
    flat = x.flatten(-2)
    expected = F.linear(F.rms_norm(flat, (flat.shape[-1],), eps=1e-6), res.proj)
    assert res.dynamic_logits(x).shape == (2, 5, 32)
    torch.testing.assert_close(res.dynamic_logits(x), expected, rtol=1e-5, atol=1e-5)
    # with an identity branch nothing is left for autocast to round: a bf16 projection would show here
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = res(x, lambda h: h)
    with torch.no_grad():
        assert torch.equal(low, res(x, lambda h: h))


@pytest.mark.slow
def test_compiled_training_loss_matches_eager():
    torch.manual_seed(0)
    model = TernaryLM(small(4))
    idx = torch.randint(0, 4096, (2, 33))

    def loss_fn(m: TernaryLM, batch: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(m(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())

    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=False)  # fullgraph: no graph breaks in mHC
    # rel 5e-5 (~4e-4 nats here): Inductor's fused kernels sum fp32 in another order, which now and then
    # flips one 8-bit activation rounding (measured: 1.0e-4 apart); a wrong graph moves the loss by far more
    assert compiled(model, idx).item() == pytest.approx(loss_fn(model, idx).item(), rel=5e-5)


def test_lightning_validation_logs_the_mhc_metrics(tmp_path, cache_dir):
    dm = tiny_datamodule(cache_dir)
    corpus = dm.prepare()
    optim = OmegaConf.to_container(OmegaConf.load(REPO_ROOT / "conf" / "optim" / "muon_lion.yaml"))
    model = {**TINY_MODEL, "n_layers": 2, "mhc": {"n_streams": 4, "mode": "dynamic", "gate_init": 0.01}}
    module = LitTernaryLM(model=model, optim=optim, token_bytes=corpus.token_bytes(), eot_id=corpus.eot_id)
    tiny_trainer(tmp_path, max_steps=2, callbacks=[]).fit(module, datamodule=dm)
    rows = [r for r in csv.DictReader((tmp_path / "metrics.csv").open()) if r.get("mhc/composite_gain")]
    assert len(rows) == 1
    assert 0.98 < float(rows[0]["mhc/res_identity_weight"]) < 1.0
    assert 1 - 1e-5 <= float(rows[0]["mhc/composite_gain"]) <= 1 + 1e-5
    assert float(rows[0]["mhc/stream_distance"]) > 0.1

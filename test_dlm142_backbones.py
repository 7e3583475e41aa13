"""DLM142's attention backbones (issue 20): the rotary transformer and the conv-attention hybrid.

The exact checks reuse test_models.py's enumeration of a tiny model (vocabulary PAD, <bos>, UNK, one
character (+ MASK), 2 slots, T = 4): for every backbone, sum_x p(x) = 1, -ELBO >= -log p(x) for every
caption, and the sampler draws captions with the probabilities p gives. Then what attention is for:
rotary scores depend on slot offsets only, and a change at slot 0 reaches the last slot (the CNN's
receptive field does not).
"""
import math

import pytest
import torch

import common
import data
import dlm142_diffusion as dlm
from test_models import (CPU, L, T, V, call_ok, exact_bound_terms, exact_diffusion_p,
                         tiny_args, tiny_data)  # noqa: F401 (tiny_data: a fixture)

BACKBONES = {  # name: Config overrides
    "x0-rope-transformer": dict(param="x0", backbone="transformer"),
    "x0-hybrid": dict(param="x0", backbone="hybrid"),
    "x0-hybrid-dilated-nomlp": dict(param="x0", backbone="hybrid", dilation="1,2", mlp_ratio=0, time_cond=True),
    "gate-uniform-hybrid": dict(param="gate", noise="uniform", backbone="hybrid", time_cond=True),
}
count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731


def tiny_diffusion(kind):
    """As test_models.tiny_diffusion: E = 8, D = 2, k = 3, 2 heads (Dh = 4), randomised far from uniform."""
    torch.manual_seed(0)
    model = dlm.Model(V, dlm.Config(embed=8, depth=2, kernel=3, heads=2, diffusion_steps=T, **BACKBONES[kind]))
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("kind", BACKBONES)
def test_p_sums_to_one_over_captions_and_the_elbo_bounds_it(kind):
    model = tiny_diffusion(kind)
    states, p = exact_diffusion_p(model)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-6)
    is_data = ~model.corruption.not_data[states].any(-1)
    assert p[is_data].sum().item() == pytest.approx(1.0, abs=1e-6)  # never a MASK or a <bos> at the end
    for x0, px in zip(states[is_data], p[is_data]):
        terms = exact_bound_terms(model, x0)
        bound = terms.sum().item() + model.corruption.prior_kl(x0[None]).item()
        assert -math.log(px.item()) - 1e-6 <= bound < math.inf
        assert (terms > -1e-9).all()


@pytest.mark.parametrize("kind", BACKBONES)
def test_sampler_draws_from_the_exact_model_distribution(kind):
    model = tiny_diffusion(kind)
    states, p = exact_diffusion_p(model)
    n = 4000
    draws = dlm.sample(model, n, 1.0, CPU, torch.Generator().manual_seed(0), slots=L)  # (n, L)
    assert not model.corruption.not_data[draws].any()  # no MASK, no <bos>
    counts = torch.bincount(draws[:, 0] * model.corruption.states + draws[:, 1], minlength=len(states)).double()
    expected = n * p
    seen = expected > 0
    assert counts[~seen].sum() == 0
    chi2 = ((counts[seen] - expected[seen]) ** 2 / expected[seen]).sum().item()
    assert chi2 < 40, chi2  # df <= 8: P(chi2 > 40) < 1e-5 if the sampler is right


def test_rotary_scores_depend_on_the_offset_only_and_keep_lengths():
    torch.manual_seed(0)
    attention = dlm.RotaryAttention(16, heads=2)
    q, k = torch.randn(2, 8), torch.randn(2, 8)                             # one query and one key, 2 heads
    cos, sin = attention.cos, attention.sin                                  # (L, Dh/2)

    def at(x, i):                                                            # x rotated to slot i
        return dlm.rotate(x[None, :, None], cos[i:i + 1], sin[i:i + 1])[0, :, 0]

    score = lambda i, j: (at(q, i) * at(k, j)).sum(-1)  # noqa: E731       # (2,) per head
    for i, j, shift in [(3, 1, 10), (0, 7, 50), (5, 5, 94)]:
        torch.testing.assert_close(score(i, j), score(i + shift, j + shift))
    assert not torch.allclose(score(3, 1), score(3, 2))                      # but the offset matters
    torch.testing.assert_close(at(q, 40).norm(dim=-1), q.norm(dim=-1))      # a rotation
    torch.testing.assert_close(at(q, 0), q)


@pytest.mark.parametrize("backbone", ["transformer", "hybrid"])
def test_attention_backbones_see_every_slot_and_the_cnn_does_not(backbone):
    t = torch.ones(1, dtype=torch.long)
    x = torch.randint(3, 92, (1, data.SLOTS))
    y = x.clone()
    y[0, 0] = 3 if x[0, 0] != 3 else 4                                       # a change at slot 0 ...
    for name, reaches in [(backbone, True), ("cnn", False)]:  # the CNN E96 D6 k5 reaches 12 slots each way
        torch.manual_seed(0)
        model = dlm.Model(92, dlm.Config(backbone=name, embed=32, depth=2 if name != "cnn" else 6))
        with torch.no_grad():
            changed = model.logits(x, t)[0] != model.logits(y, t)[0]        # (1, L, S)
        assert changed[0, -1].any() == reaches                               # ... at the last slot
        reached = changed[0].any(-1)                                         # (L,)
        if name == "cnn":
            assert reached[:13].all() and not reached[13:].any()
        else:
            assert reached.all()


def test_parameter_counts_and_flags():
    cnn = dlm.Model(92, dlm.Config())
    tf = dlm.Model(92, dlm.Config(backbone="transformer", embed=80, depth=3))
    hybrid = dlm.Model(92, dlm.Config(backbone="hybrid", embed=80, depth=3))
    assert 0.8 < count(tf) / count(cnn) < 1.25
    # a hybrid block is a transformer block plus the CNN's conv (E^2 k weights + E biases)
    assert count(hybrid) - count(tf) == 3 * (80 * 80 * 5 + 80)
    no_mlp = dlm.Model(92, dlm.Config(backbone="hybrid", embed=80, depth=3, mlp_ratio=0))
    assert count(hybrid) - count(no_mlp) == 3 * (2 * 80 + 80 * 320 + 320 + 320 * 80 + 80)
    assert not any("cos" in k or "sin" in k for k in hybrid.state_dict())  # the fixed angles stay out of checkpoints
    with pytest.raises(dlm.RunError, match="--heads"):
        dlm.Model(V, dlm.Config(backbone="hybrid", embed=10, heads=4))
    with pytest.raises(dlm.RunError, match="even"):
        dlm.Model(V, dlm.Config(backbone="transformer", embed=12, heads=4))  # Dh = 3: no pairs to rotate
    cfg, _ = common.parse_flags(dlm.Config, "", ["--backbone", "hybrid", "--mlp-ratio", "0"])
    assert (cfg.backbone, cfg.mlp_ratio) == ("hybrid", 0)


@pytest.mark.parametrize("backbone", ["transformer", "hybrid"])
def test_a_tiny_run_trains_evaluates_and_samples(backbone, tiny_data, tmp_path):  # noqa: F811
    call_ok("dlm142_diffusion", tiny_args("dlm142_diffusion", tiny_data, tmp_path, "--epochs", "1",
                                          "--backbone", backbone, "--heads", "2"))
    test = [r for r in dlm.read_metrics(tmp_path / "dlm142_diffusion" / "default") if r["kind"] == "test"][-1]
    assert test["bound"] == "-elbo" and len(test["per_step"]) == 8 and math.isfinite(test["nlpps"])

"""Tests of dlm142_diffusion.py: --param x0|gate, --backbone cnn|transformer, --dilation, the per-step split
of the bound and the sampler. Exact checks enumerate a tiny model: vocabulary PAD, <bos>, UNK, one character
(+ MASK), 2 slots, T = 4. (To be merged into test_models.py; the DLM142 tests there that assumed --eval-seed,
an "elbo" label or the gate as the only kernel are replaced by the ones below.)"""
from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
import data
import dlm142_diffusion as dlm
from test_models import tiny_data  # noqa: F401 (a fixture: 200/30/31 tiny captions, not the published files)

V, L, T = 4, 2, 4
TINY = ["--embed", "12", "--depth", "2", "--steps", "8", "--val-steps", "3", "--batch-size", "50", "--eval-batch-size",
        "256", "--num-samples", "2", "--log-every", "1", "--time-cond", "--custom-data"]
RUN_FILES = ["args.json", "log.txt", "metrics.jsonl", "ckpt_last.pt", "ckpt_best.pt", "samples.txt", "curves.png",
             "test_nlpps.txt", "noise_levels.png"]
CPU = torch.device("cpu")
KINDS = {  # name: Config overrides
    "x0": dict(param="x0"),
    "x0-dilated": dict(param="x0", dilation="1,2", time_cond=True),
    "x0-transformer": dict(param="x0", backbone="transformer"),
    "gate": dict(param="gate", time_cond=True),
    "gate-nocopy": dict(param="gate", copy=False),
    "gate-uniform-dilated": dict(param="gate", noise="uniform", dilation="2,1", time_cond=True),
    "gate-uniform-transformer": dict(param="gate", noise="uniform", backbone="transformer", time_cond=True),
}


def tiny_model(kind, steps=T):
    torch.manual_seed(0)
    cfg = dlm.Config(embed=8, depth=2, kernel=3, heads=2, steps=steps, **KINDS[kind])
    model = dlm.Model(V, cfg).double()
    with torch.no_grad():  # random, far-from-uniform outputs make the checks bite
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def all_states(S):
    return torch.tensor(list(itertools.product(range(S), repeat=L)))                # (S^L, L)


def data_captions():
    return torch.tensor([x for x in itertools.product(range(V), repeat=L) if data.BOS not in x])


def read_records(run_dir, kind):
    return [(r["step"], round(r["nlpps"], 4)) for r in common.read_metrics(run_dir) if r["kind"] == kind]


def exact_p(model):
    """p(x_0) for every 2-slot state, by summing over every reverse trajectory -> (S^L,)."""
    c = model.corruption
    states = all_states(c.states)
    with torch.no_grad():
        p = c.noise.double()[states].prod(-1)                                       # p(x_T)
        for t in range(c.T, 0, -1):
            lp = model.reverse_log_probs(states, torch.full((len(states),), t))     # (S^L, L, S)
            p = p @ sum(lp[:, i, states[:, i]] for i in range(L)).exp()            # [a, b] = p(x_{t-1}=b | x_t=a)
    return states, p


def exact_bound_terms(model, x0):
    """E_q of every step's term by enumerating x_t ~ q(x_t | x_0) -> (T, 3) for one caption x0 (L,)."""
    c = model.corruption
    states = all_states(c.states)
    rows = []
    with torch.no_grad():
        for t in range(1, c.T + 1):
            q = c.marginal(x0[None], torch.tensor([t]))[0]                          # (L, S)
            w = q[0, states[:, 0]] * q[1, states[:, 1]]                             # q(x_t | x_0), (S^L,)
            possible = w > 0
            terms = model.step_terms(x0.expand(int(possible.sum()), L), states[possible],
                                     torch.full((int(possible.sum()),), t))
            rows.append((w[possible, None] * terms).sum(0))
    return torch.stack(rows)


@pytest.mark.parametrize("kind", KINDS)
def test_p_sums_to_one_over_captions_and_the_elbo_bounds_it(kind):
    model = tiny_model(kind)
    states, p = exact_p(model)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-6)
    is_data = ~model.corruption.not_data[states].any(-1)
    assert p[is_data].sum().item() == pytest.approx(1.0, abs=1e-6)  # never a MASK or a <bos> at the end
    for x0, px in zip(states[is_data], p[is_data]):
        terms = exact_bound_terms(model, x0)
        bound = terms.sum().item() + model.corruption.prior_kl(x0[None]).item()
        assert -math.log(px.item()) - 1e-6 <= bound < math.inf
        assert (terms > -1e-9).all()  # each part is a KL (or a KL's chain-rule piece): never negative
        if model.param == "x0":  # the x0 kernel matches q except for the token: the other parts vanish
            assert terms[:, [0, 2]].abs().max().item() < 1e-12
        if model.corruption.kind == "uniform":
            assert terms[:, 0].abs().max().item() == 0


@pytest.mark.parametrize("kind", ["x0", "x0-transformer"])
def test_x0_kernel_is_the_posterior_with_p_theta_in_place_of_x0(kind):
    model = tiny_model(kind)
    c = model.corruption
    xt = all_states(c.states)
    xt = xt[~(xt == data.BOS).any(-1)]                                              # x_t never holds <bos>
    for t in range(1, T + 1):
        if t == T:  # a_T = 0: only the all-MASK x_T is possible
            xt = xt[(xt == c.mask).all(-1)]
        tt = torch.full((len(xt),), t)
        with torch.no_grad():
            kernel = model.reverse_log_probs(xt, tt).exp()                          # (N, L, S)
            p_x0 = model.x0_log_probs(xt, tt).exp()                                 # (N, L, S)
        bayes = torch.zeros_like(kernel)
        for j in range(V):  # sum_j p_th(x_0 = j | x_t) q(x_{t-1} | x_t, x_0 = j) at masked slots
            bayes += p_x0[..., j:j + 1] * c.posterior(torch.full_like(xt, j), xt, tt).double()
        bayes = torch.where((xt == c.mask)[..., None], bayes, c.posterior(xt, xt, tt).double())  # kept: x_0 = x_t
        torch.testing.assert_close(kernel, bayes, rtol=1e-6, atol=1e-6)  # the posterior is float32
        assert (p_x0[..., c.not_data] == 0).all()


@pytest.mark.parametrize("kind", ["x0", "gate", "gate-uniform-transformer"])
def test_training_and_evaluation_estimates_are_unbiased_for_the_exact_bound(kind):
    model = tiny_model(kind)
    x = data_captions()                                                             # (9, L)
    exact = torch.stack([exact_bound_terms(model, x0).sum() for x0 in x]) + model.corruption.prior_kl(x)
    copies = 800
    with torch.no_grad():
        torch.manual_seed(0)
        train = torch.cat([model.loss(x.repeat(8, 1)).view(8, -1) for _ in range(copies // 8)])  # (copies, 9)
        full = dlm.evaluate(model, x.repeat(copies, 1), dlm.Config(eval_batch_size=500), CPU)
        few = dlm.evaluate(model, x.repeat(copies, 1), dlm.Config(eval_batch_size=500), CPU, steps_per_caption=2)
    assert full.bound == "-elbo" and few.bound.startswith("-elbo, estimated from 2 of 4 steps")
    for draws in (train, full.nll.view(copies, -1), few.nll.view(copies, -1)):  # each row: independent draws
        error = (draws.mean(0) - exact).abs()
        assert (error < 4.5 * draws.std(0) / copies ** 0.5 + 1e-6).all(), (error, draws.std(0))
    # the per-step terms (total and split) add up to the bound; one draw for all: same numbers every time
    per_step = torch.tensor(full.extra["per_step"])
    assert per_step.sum().item() == pytest.approx(full.nll.mean().item(), rel=1e-6)
    split = sum(torch.tensor(full.extra[f"per_step_{name}"]) for name in dlm.TERMS)
    torch.testing.assert_close(split, per_step)
    again = dlm.evaluate(model, x.repeat(copies, 1), dlm.Config(eval_batch_size=77), CPU)
    torch.testing.assert_close(again.nll, full.nll)


@pytest.mark.parametrize("kind", ["x0", "gate-uniform-dilated"])
def test_sampler_draws_from_the_exact_model_distribution(kind):
    model = tiny_model(kind)
    states, p = exact_p(model)
    n = 4000
    draws = dlm.sample(model, n, 1.0, CPU, torch.Generator().manual_seed(0), slots=L)  # (n, L)
    assert not model.corruption.not_data[draws].any()  # no MASK, no <bos>
    index = (draws[:, 0] * model.corruption.states + draws[:, 1])
    counts = torch.bincount(index, minlength=len(states)).double()
    expected = n * p
    seen = expected > 0
    assert counts[~seen].sum() == 0
    chi2 = ((counts[seen] - expected[seen]) ** 2 / expected[seen]).sum().item()
    assert chi2 < 40, chi2  # df <= 8: P(chi2 > 40) < 1e-5 if the sampler is right


def test_dilation_cycle_and_flag_errors():
    assert dlm.dilation_cycle("1,2,4,8", 6) == [1, 2, 4, 8, 1, 2]
    assert dlm.dilation_cycle("1", 3) == [1, 1, 1]
    conv = tiny_model("x0-dilated").backbone.convs
    assert [c.dilation[0] for c in conv] == [1, 2] and [c.padding[0] for c in conv] == [1, 2]
    for bad in ("", "1,x", "0", "2,-1"):
        with pytest.raises(common.UserError, match="--dilation"):
            dlm.dilation_cycle(bad, 3)
    with pytest.raises(common.UserError, match="--heads"):
        dlm.Model(V, dlm.Config(backbone="transformer", embed=10, heads=4))
    with pytest.raises(common.UserError, match="odd"):
        dlm.Model(V, dlm.Config(kernel=4))
    with pytest.raises(common.UserError, match="--param gate"):
        dlm.Model(V, dlm.Config(noise="uniform"))
    with pytest.raises(common.UserError, match="--no-copy"):
        dlm.Model(V, dlm.Config(copy=False))


def test_transformer_has_about_the_cnns_parameters_and_sees_every_slot():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    cnn = dlm.Model(92, dlm.Config())
    tf = dlm.Model(92, dlm.Config(backbone="transformer", embed=64, depth=3))
    assert 0.8 < count(tf) / count(cnn) < 1.25
    x = torch.randint(3, 92, (1, data.SLOTS))
    y = x.clone()
    y[0, -1] = 3 if x[0, -1] != 3 else 4
    with torch.no_grad():
        changed = (tf.logits(x, torch.ones(1, dtype=torch.long))[0] != tf.logits(y, torch.ones(1, dtype=torch.long))[0])
    assert changed[0].any()  # the first slot sees the last


def test_headline_command_is_the_notes_network():
    cfg, given = common.parse_config(dlm.Config, "", ["--depth", "11", "--lr", "1e-4"])
    assert (cfg.backbone, cfg.depth, cfg.embed, cfg.kernel, cfg.lr) == ("cnn", 11, 50, 5, 1e-4)
    assert given == {"depth", "lr"}
    cfg, _ = common.parse_config(dlm.Config, "", ["--param", "gate", "--no-copy", "--noise", "uniform", "--time-cond"])
    assert (cfg.param, cfg.copy, cfg.noise, cfg.time_cond) == ("gate", False, "uniform", True)
    with pytest.raises(SystemExit):
        common.parse_config(dlm.Config, "", ["--depth", "0"])
    assert "eval_seed" not in {f.name for f in dlm.dataclasses.fields(dlm.Config)} and "eval_seed" not in dlm.RUN_FLAGS


def test_run_trains_resumes_exactly_evaluates_and_samples(tiny_data, tmp_path, capsys):
    """In-process (a subprocess per run costs seconds of imports): straight, and stopped mid-epoch 2 then resumed."""
    base = TINY + ["--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--epochs", "3", "--lr", "3e-3",
                   "--dilation", "1,2"]
    dlm.run(base + ["--run-name", "straight"])
    dlm.run(base + ["--run-name", "split", "--max-steps", "6"])
    dlm.run(base + ["--run-name", "split", "--resume"])
    straight, split = tmp_path / "dlm142_diffusion" / "straight", tmp_path / "dlm142_diffusion" / "split"
    for name in RUN_FILES:
        assert (straight / name).exists(), name
    assert read_records(straight, "train") == read_records(split, "train")
    assert read_records(straight, "test") == read_records(split, "test")[-1:]
    train = [v for _, v in read_records(straight, "train")]
    assert sum(train[-4:]) < sum(train[:4])
    test = [r for r in common.read_metrics(straight) if r["kind"] == "test"][-1]
    assert test["bound"] == "-elbo" and len(test["per_step"]) == 8
    assert test["nlpps"] == pytest.approx(sum(test["per_step"]), rel=1e-4)  # prior term is 0: a_T = 0
    assert sum(test["per_step_reveal"]) == 0 == sum(test["per_step_copy"])  # x0: only the token costs
    assert test["per_step_token"] == pytest.approx(test["per_step"])
    capsys.readouterr()
    dlm.run(base + ["--run-name", "straight", "--eval-only"])
    assert f"nlpps {test['nlpps']:.2f}" in capsys.readouterr().out
    dlm.run(base + ["--run-name", "straight", "--sample-only"])
    out = capsys.readouterr().out
    assert out.count("[SAMPLE]") == 2 and "<bos>" not in out


def test_one_run_as_a_user_runs_it(tiny_data, tmp_path):
    script = Path(dlm.__file__).resolve()
    proc = subprocess.run([sys.executable, str(script), *TINY, "--data-dir", str(tiny_data), "--out-dir", str(tmp_path),
                           "--epochs", "1"], capture_output=True, text=True, cwd=script.parent, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and "eval test" in proc.stdout, proc.stderr


def test_gate_run_with_uniform_noise_and_the_x0_uniform_refusal(tiny_data, tmp_path, capsys):
    base = TINY + ["--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--epochs", "1"]
    dlm.run(base + ["--param", "gate", "--noise", "uniform", "--backbone", "transformer", "--heads", "3"])
    test = [r for r in common.read_metrics(tmp_path / "dlm142_diffusion" / "default") if r["kind"] == "test"][-1]
    assert sum(test["per_step_reveal"]) == 0 and sum(test["per_step_copy"]) > 0
    assert "<bos>" not in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--param x0 .* --param gate"):
        dlm.main(base + ["--noise", "uniform", "--run-name", "bad"])

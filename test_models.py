"""Tests for data.py, common.py and the model scripts. Run: python -m pytest -q

Tiny data is made in the test itself (a few hundred made-up captions), so the whole suite needs
no network and runs in minutes on 2 CPU cores. One test also reads the real files in
../shared/data/multi30k (or $DLM_DATA_DIR) to check the loader and the published checksums.
"""
import dataclasses
import gzip
import itertools
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
import compare
import data
import dlm100_rnn
import dlm107_vae_seg as seg
import dlm123_gmmvae
import dlm142_diffusion

HERE = Path(__file__).resolve().parent
REAL_DATA = Path(os.environ.get(data.ENV_VAR) or HERE.parent / "shared" / "data" / "multi30k")


# ----------------------------------------------------------------------------- fixtures
def make_captions(n, seed):
    rng = random.Random(seed)
    who = ["A man", "A woman", "Two dogs", "A child", "The girl", "Some people"]
    does = ["is running", "sits", "plays", "walks", "is eating", "jumps"]
    where = ["in the park.", "on a bench.", "near the water.", "at the beach.", "outside."]
    return [f"{rng.choice(who)} {rng.choice(does)} {rng.choice(where)}" for _ in range(n)]


def write_split(folder, name, lines):
    with gzip.open(folder / name, "wt", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_multi30k")
    write_split(folder, "train.en.gz", make_captions(200, 0))
    write_split(folder, "val.en.gz", make_captions(30, 1))
    write_split(folder, "test_2016_flickr.en.gz", make_captions(30, 2) + ["Zebra X!"])  # Z, X, ! unseen
    return folder


TINY = ["--embed", "16", "--components", "8", "--batch-size", "50", "--eval-batch-size", "64",
        "--num-samples", "2", "--log-every", "1"]


def run_script(script, args, check=True):
    """Run a model script as a user would, in a subprocess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True, text=True,
                          env=env, cwd=HERE, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def assert_one_line_error(proc, *words):
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err


# ----------------------------------------------------------------------------- data.py
def test_vocab_is_built_from_train_only_and_unseen_chars_are_unk(tiny_data):
    vocab, splits = data.load(str(tiny_data))
    train_chars = set("".join(make_captions(200, 0)))
    assert vocab.itos[:3] == data.SPECIALS and set(vocab.itos[3:]) == train_chars
    assert vocab.itos[3:] == sorted(train_chars)
    assert "Z" not in vocab.stoi and "!" not in vocab.stoi
    last = splits["test"][-1]
    assert vocab.decode(last) == "<unk>ebra <unk><unk>"
    assert (last[[0, 6, 7]] == data.UNK).all() and last[8] == data.PAD


def test_encoding_is_100_slots_with_at_least_one_pad_and_round_trips():
    vocab = data.Vocab(list("abc ."))
    for text in ["", "a b.", "abc" * 40]:
        ids = vocab.encode(text)
        assert len(ids) == data.SLOTS and ids[-1] == data.PAD
        assert vocab.decode(ids) == text[: data.SLOTS - 1]
    x = torch.tensor([vocab.encode("ab"), vocab.encode("c" * 120)])
    assert data.num_chars(x).tolist() == [2, 99]


def test_batches_shuffle_reproducibly_and_evaluation_covers_the_split_in_order():
    x = torch.arange(10).unsqueeze(1)
    in_order = torch.cat(list(data.batches(x, 3)))
    assert in_order.squeeze(1).tolist() == list(range(10))
    a = [b.squeeze(1).tolist() for b in data.batches(x, 4, torch.Generator().manual_seed(1))]
    b = [b.squeeze(1).tolist() for b in data.batches(x, 4, torch.Generator().manual_seed(1))]
    assert a == b and sorted(sum(a, [])) == list(range(10)) and sum(a, []) != list(range(10))
    skipped = [b.squeeze(1).tolist() for b in data.batches(x, 4, torch.Generator().manual_seed(1), skip=1)]
    assert skipped == a[1:]


def test_missing_local_data_is_a_clear_error(tmp_path):
    with pytest.raises(common.UserError, match="train.en.gz not found .*--data-dir"):
        data.load(str(tmp_path))


def test_failed_download_names_file_url_and_flag(tmp_path, monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(data, "URL", "http://127.0.0.1:9/")  # nothing listens there: refused at once
    with pytest.raises(common.UserError, match=r"train.en.gz .*http://127.0.0.1:9/train.en.gz.*--data-dir"):
        data.load()
    assert list(tmp_path.iterdir()) == []


def test_download_with_wrong_checksum_is_deleted(tmp_path, monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(data.urllib.request, "urlretrieve", lambda url, path: Path(path).write_bytes(b"evil"))
    with pytest.raises(common.UserError, match="checksum"):
        data.load()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not (REAL_DATA / "train.en.gz").exists(), reason="no local copy of Multi30k")
def test_real_multi30k_files_match_checksums_and_sizes():
    for name, digest in data.SHA256.items():
        assert data._sha256(REAL_DATA / name) == digest
    vocab, splits = data.load(str(REAL_DATA))
    assert {k: len(v) for k, v in splits.items()} == {"train": 29000, "val": 1014, "test": 1000}
    assert len(vocab) == 83  # 80 characters in train.en + PAD, BOS, UNK


# ----------------------------------------------------------------------------- common.py
def test_gaussian_helpers_match_torch_distributions():
    torch.manual_seed(0)
    D = torch.distributions
    x, m, ls = torch.randn(5, 4), torch.randn(5, 4), torch.randn(5, 4) * 0.3
    m2, ls2 = torch.randn(5, 4), torch.randn(5, 4) * 0.3
    q, p = D.Normal(m, ls.exp()), D.Normal(m2, ls2.exp())
    torch.testing.assert_close(common.gaussian_log_prob(x, m, ls), q.log_prob(x).sum(-1))
    torch.testing.assert_close(common.gaussian_entropy(ls), q.entropy().sum(-1))
    torch.testing.assert_close(common.gaussian_kl(m, ls, m2, ls2), D.kl_divergence(q, p).sum(-1))


def test_mixture_log_prob_matches_torch_mixture():
    torch.manual_seed(0)
    D = torch.distributions
    K, dim = 6, 3
    means, log_stds, logits = torch.randn(K, dim), torch.randn(K, dim) * 0.3, torch.randn(K)
    x = torch.randn(7, 2, dim)
    ref = D.MixtureSameFamily(D.Categorical(logits=logits), D.Independent(D.Normal(means, log_stds.exp()), 1))
    torch.testing.assert_close(common.mixture_log_prob(x, means, log_stds, logits.log_softmax(0)), ref.log_prob(x))
    uniform = D.MixtureSameFamily(D.Categorical(logits=torch.zeros(K)), D.Independent(D.Normal(means, log_stds[0].exp()), 1))
    torch.testing.assert_close(common.mixture_log_prob(x, means, log_stds[0]), uniform.log_prob(x))


def test_logmeanexp_and_bits_per_char():
    x = torch.tensor([[0.0, 1.0], [2.0, -3.0], [-1.0, 0.5]])
    torch.testing.assert_close(common.logmeanexp(x, dim=0), x.exp().mean(0).log())
    assert common.bits_per_char(math.log(2) * 11, 10) == pytest.approx(1.0)


def test_reinforce_surrogate_is_unbiased_with_leave_one_out_baseline():
    # q(z) = Bernoulli(sigmoid(theta)), K=3 samples; E over all 2^3 sample sets of the surrogate's
    # gradient must equal the exact gradient of E_q[f(z)].
    theta = torch.tensor(0.3, requires_grad=True)
    f = {0: 2.0, 1: -1.5}
    p1 = torch.sigmoid(theta)
    exact = torch.autograd.grad(p1 * f[1] + (1 - p1) * f[0], theta)[0]
    expected = torch.tensor(0.0)
    for zs in itertools.product([0, 1], repeat=3):
        z = torch.tensor(zs, dtype=torch.float)
        p1 = torch.sigmoid(theta)
        log_q = z * p1.log() + (1 - z) * (1 - p1).log()
        weight = log_q.sum().exp().detach()
        reward = torch.tensor([f[v] for v in zs])
        expected = expected + weight * torch.autograd.grad(common.reinforce_surrogate(log_q, reward), theta)[0]
    torch.testing.assert_close(expected, exact)
    with pytest.raises(ValueError):
        common.reinforce_surrogate(torch.zeros(1, 2), torch.zeros(1, 2))


# ----------------------------------------------------------------------------- flags, checkpoints
def test_out_of_range_flags_are_argparse_errors():
    for bad in (["--lr", "-1"], ["--embed", "0"], ["--epochs", "0"], ["--head", "lstm"], ["--lr", "abc"]):
        with pytest.raises(SystemExit) as e:
            common.parse_config(dlm100_rnn.Config, "", bad)
        assert e.value.code == 2
    cfg, given = common.parse_config(dlm100_rnn.Config, "", ["--lr", "1e-4", "--no-compile"])
    assert cfg.lr == 1e-4 and given == {"lr", "compile"}


def test_help_documents_every_flag():
    out = run_script("dlm100_rnn.py", ["-h"]).stdout
    for f in dlm100_rnn.Config.__dataclass_fields__:
        assert "--" + f.replace("_", "-") in out


def test_checkpoint_is_atomic_and_foreign_or_corrupt_ones_are_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    common.save_checkpoint({"script": "dlm100_rnn", "w": torch.ones(2)}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    assert common.load_checkpoint(path, "dlm100_rnn")["w"].sum() == 2
    with pytest.raises(common.UserError, match="not a dlm142_diffusion checkpoint"):
        common.load_checkpoint(path, "dlm142_diffusion")
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(common.UserError, match="cannot read checkpoint"):
        common.load_checkpoint(path, "dlm100_rnn")
    with pytest.raises(common.UserError, match="no checkpoint"):
        common.load_checkpoint(tmp_path / "missing.pt", "dlm100_rnn")


# ----------------------------------------------------------------------------- DLM100
@pytest.mark.parametrize("head", ["mos", "softmax"])
def test_dlm100_probabilities_of_all_sequences_sum_to_one(head):
    torch.manual_seed(0)
    cfg = dlm100_rnn.Config(embed=8, components=5, head=head)
    model = dlm100_rnn.Model(3, cfg).double()
    x = torch.tensor(list(itertools.product(range(3), repeat=3)))  # all 27 sequences of 3 slots
    total = torch.exp(-model.nll(x)).sum().item()
    assert total == pytest.approx(1.0, abs=1e-5)
    # the sampler's one-step distribution is the one the loss scores
    y, _ = model.features(torch.tensor([[1, 2]]))
    torch.testing.assert_close(model.all_log_probs(y).gather(-1, torch.tensor([[[0], [1]]])).squeeze(-1),
                               model.log_probs_of(y, torch.tensor([[0, 1]])))


def test_dlm100_sampler_stops_at_pad():
    torch.manual_seed(0)
    model = dlm100_rnn.Model(5, dlm100_rnn.Config(embed=8, components=4))
    with torch.no_grad():  # make PAD likely so captions end early
        model.embed.weight[data.PAD] *= 3
    x = dlm100_rnn.sample(model, 16, 1.0, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert x.shape == (16, data.SLOTS) and (data.num_chars(x) < data.SLOTS).any()
    for row in x:
        n = data.num_chars(row[None])[0]
        assert (row[n:] == data.PAD).all()


def test_dlm100_loss_falls_on_a_tiny_set(tiny_data):
    _, splits = data.load(str(tiny_data))
    torch.manual_seed(0)
    model = dlm100_rnn.Model(40, dlm100_rnn.Config(embed=32, components=16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = splits["train"][:32]
    first = model.nll(x).mean().item()
    for _ in range(30):
        loss = model.nll(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def read_records(run_dir, kind):
    return [(r["step"], round(r["nlpps"], 4)) for r in common.read_metrics(run_dir) if r["kind"] == kind]


RUN_FILES = ["args.json", "log.txt", "metrics.jsonl", "ckpt_last.pt", "ckpt_best.pt", "samples.txt", "curves.png",
             "test_nlpps.txt"]


def train_straight_and_resumed(script, base, extra_files=()):
    """Train `base` straight, and again stopped by --max-steps 6 (mid-epoch 2) then --resume'd; check the
    run folder is complete and both runs logged the same training losses. Returns the two run folders."""
    run_script(script, base + ["--run-name", "straight"])
    run_script(script, base + ["--run-name", "split", "--max-steps", "6"])
    run_script(script, base + ["--run-name", "split", "--resume"])
    root = Path(base[base.index("--out-dir") + 1]) / Path(script).stem
    straight, split = root / "straight", root / "split"
    for name in RUN_FILES + list(extra_files):
        assert (straight / name).exists(), name
    assert read_records(straight, "train") == read_records(split, "train")
    return straight, split


def test_dlm100_run_writes_everything_and_resume_is_exact(tiny_data, tmp_path):
    base = TINY + ["--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--epochs", "4"]
    straight, split = train_straight_and_resumed("dlm100_rnn.py", base)
    assert len((straight / "test_nlpps.txt").read_text().split()) == 31
    val_straight = read_records(straight, "val")
    assert len(val_straight) == 4 and set(val_straight) <= set(read_records(split, "val"))
    assert read_records(straight, "test") == read_records(split, "test")[-1:]
    train = read_records(straight, "train")
    assert train[-1][1] < train[0][1]
    # the checkpoint holds only plain data, so weights_only loading works
    ckpt = torch.load(straight / "ckpt_last.pt", weights_only=True)
    assert ckpt["step"] == 16 and json.loads((straight / "args.json").read_text())["epochs"] == 4


def test_dlm100_eval_only_sample_only_and_bad_checkpoints(tiny_data, tmp_path):
    base = TINY + ["--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--epochs", "1"]
    run_script("dlm100_rnn.py", base)
    run_dir = tmp_path / "dlm100_rnn" / "default"
    test_line = [l for l in (run_dir / "log.txt").read_text().splitlines() if l.startswith("eval test")][-1]
    out = run_script("dlm100_rnn.py", base + ["--eval-only"]).stdout
    assert test_line.split("| nlpps")[1] in out  # same number from the saved best checkpoint
    out = run_script("dlm100_rnn.py", base + ["--sample-only", "--num-samples", "3"]).stdout
    assert out.count("[SAMPLE]") == 3

    (run_dir / "ckpt_best.pt").write_bytes(b"not a checkpoint")
    assert_one_line_error(run_script("dlm100_rnn.py", base + ["--eval-only"], check=False), "cannot read checkpoint")
    common.save_checkpoint({"script": "dlm142_diffusion"}, run_dir / "ckpt_last.pt")
    assert_one_line_error(run_script("dlm100_rnn.py", base + ["--resume"], check=False), "not a dlm100_rnn checkpoint")
    assert_one_line_error(run_script("dlm100_rnn.py", base + ["--run-name", "nothing", "--resume"], check=False),
                          "no checkpoint")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run_script("dlm100_rnn.py", ["--data-dir", str(empty), "--out-dir", str(tmp_path)],
                                     check=False), "train.en.gz not found", "--data-dir")
    proc = run_script("dlm100_rnn.py", ["--lr", "-1"], check=False)
    assert proc.returncode == 2 and "--lr: must be > 0" in proc.stderr


def test_dlm100_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    base = TINY + ["--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--epochs", "3"]
    calls = {"n": 0}
    real_nll = dlm100_rnn.Model.nll

    def nll_that_blows_up(self, x):
        calls["n"] += 1 if self.training else 0
        out = real_nll(self, x)
        return out * float("nan") if calls["n"] > 6 else out  # step 7: inside epoch 2

    monkeypatch.setattr(dlm100_rnn.Model, "nll", nll_that_blows_up)
    with pytest.raises(common.UserError, match="non-finite loss at step 6.*ckpt_last.pt"):
        dlm100_rnn.run(base)
    ckpt = common.load_checkpoint(tmp_path / "dlm100_rnn" / "default" / "ckpt_last.pt", "dlm100_rnn")
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


# ----------------------------------------------------------------------------- DLM142


def tiny_diffusion(noise, copy=True, time_cond=True, V=3, T=4):
    torch.manual_seed(0)
    cfg = dlm142_diffusion.Config(embed=8, depth=2, kernel=3, steps=T, noise=noise, copy=copy, time_cond=time_cond)
    return dlm142_diffusion.Model(V, cfg).double()


@pytest.mark.parametrize("noise", ["uniform", "absorb"])
def test_dlm142_posterior_matches_bayes_rule_and_ends_at_noise(noise):
    c = tiny_diffusion(noise).corruption
    S, T = c.states, c.T
    a = c.alpha_bar(torch.arange(T + 1))
    # one-step matrices straight from the definition q(x_t | x_{t-1}) = (1 - b_t) I + b_t n
    Q = [None] + [(1 - (1 - a[t] / a[t - 1])) * torch.eye(S) + (1 - a[t] / a[t - 1]) * c.noise.expand(S, S)
                  for t in range(1, T + 1)]
    x0 = torch.tensor([[0, 2, 1]])
    marg = torch.nn.functional.one_hot(x0[0], S).float()  # (L, S) q(x_0 | x_0)
    for t in range(1, T + 1):
        prev, marg = marg, marg @ Q[t]
        torch.testing.assert_close(c.marginal(x0, torch.tensor([t]))[0], marg)
        for xt_state in itertools.product(range(S), repeat=3):
            xt = torch.tensor([xt_state])
            if (marg[torch.arange(3), xt[0]] == 0).any():
                continue  # impossible x_t
            bayes = Q[t][:, xt[0]].t() * prev                                   # (L, S)
            torch.testing.assert_close(c.posterior(x0, xt, torch.tensor([t]))[0], bayes / bayes.sum(-1, keepdim=True))
    torch.testing.assert_close(marg, c.noise.expand(3, S))  # a_T = 0: x_T is pure noise
    assert c.prior_kl(x0).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("noise", ["uniform", "absorb"])
@pytest.mark.parametrize("copy", [True, False])
def test_dlm142_exact_likelihood_sums_to_one_and_elbo_is_below_it(noise, copy):
    model = tiny_diffusion(noise, copy)
    c, V, L = model.corruption, 3, 2
    S, T = c.states, c.T
    states = torch.tensor(list(itertools.product(range(S), repeat=L)))             # (S^L, L)
    with torch.no_grad():
        p = c.noise.double()[states].prod(-1)                                    # p(x_T)
        for t in range(T, 0, -1):
            lp = model.reverse_log_probs(states, torch.full((len(states),), t))    # (S^L, L, S)
            trans = sum(lp[:, i, states[:, i]] for i in range(L)).exp()           # [a, b] = p(x_{t-1}=b | x_t=a)
            p = p @ trans
        assert p.sum().item() == pytest.approx(1.0, abs=1e-6)
        is_data = (states < V).all(-1)
        assert p[is_data].sum().item() == pytest.approx(1.0, abs=1e-6)  # x_0 is never a MASK
        for x0, px in zip(states[is_data], p[is_data]):
            x0 = x0[None]
            bound = c.prior_kl(x0).item()
            for t in range(1, T + 1):
                q = c.marginal(x0, torch.tensor([t]))[0]                           # (L, S)
                w = q[0, states[:, 0]] * q[1, states[:, 1]]                        # q(x_t | x_0) for every state
                terms = model.step_loss(x0.expand(len(states), L), states, torch.full((len(states),), t))
                bound += (w * torch.nan_to_num(terms, posinf=0.0)).sum().item()  # w = 0 where x_t impossible
            assert bound >= -math.log(px.item()) - 1e-6
            assert bound < -math.log(px.item()) + 10  # a bound, not a runaway number


def test_dlm142_training_estimate_is_unbiased_for_the_evaluated_bound():
    model = tiny_diffusion("absorb")
    x = torch.randint(0, 3, (4, 2))
    cfg = dlm142_diffusion.Config(eval_batch_size=7)
    with torch.no_grad():
        exact = sum(dlm142_diffusion.evaluate(model, x, cfg, torch.device("cpu"))[0]
                    for cfg.eval_seed in range(200)) / 200
        torch.manual_seed(0)
        estimate = torch.stack([model.loss(x) for _ in range(4000)]).mean(0)
    torch.testing.assert_close(estimate.float(), exact, rtol=0.05, atol=0.05)


def test_dlm142_val_estimate_from_a_few_steps_is_unbiased():
    model = tiny_diffusion("uniform", T=6)
    x = torch.randint(0, 3, (3, 2))
    cfg = dlm142_diffusion.Config(eval_batch_size=64)
    with torch.no_grad():
        full = [dlm142_diffusion.evaluate(model, x, cfg, torch.device("cpu"))[0] for cfg.eval_seed in range(300)]
        few = [dlm142_diffusion.evaluate(model, x, cfg, torch.device("cpu"), 2)[0] for cfg.eval_seed in range(300)]
    torch.testing.assert_close(torch.stack(few).mean(0), torch.stack(full).mean(0), rtol=0.05, atol=0.05)


def test_dlm142_headline_command_parses():
    cfg, given = common.parse_config(dlm142_diffusion.Config, "", ["--depth", "11", "--lr", "1e-4"])
    assert (cfg.depth, cfg.lr, cfg.embed, cfg.copy) == (11, 1e-4, 50, True) and given == {"depth", "lr"}
    cfg, _ = common.parse_config(dlm142_diffusion.Config, "", ["--no-copy", "--noise", "uniform", "--time-cond"])
    assert (cfg.copy, cfg.noise, cfg.time_cond) == (False, "uniform", True)
    with pytest.raises(SystemExit):
        common.parse_config(dlm142_diffusion.Config, "", ["--depth", "0"])


TINY_DIFFUSION = ["--embed", "12", "--depth", "2", "--steps", "8", "--val-steps", "3", "--batch-size", "50",
                  "--eval-batch-size", "256", "--num-samples", "2", "--log-every", "1", "--time-cond"]


def test_dlm142_run_trains_resumes_exactly_evaluates_and_samples(tiny_data, tmp_path):
    base = TINY_DIFFUSION + ["--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--epochs", "4", "--lr", "3e-3"]
    straight, split = train_straight_and_resumed("dlm142_diffusion.py", base, ["noise_levels.png"])
    assert read_records(straight, "test") == read_records(split, "test")[-1:]
    train = [v for _, v in read_records(straight, "train")]
    assert sum(train[-4:]) < sum(train[:4])
    test = [r for r in common.read_metrics(straight) if r["kind"] == "test"][-1]
    assert test["bound"] == "elbo" and len(test["per_step"]) == 8
    assert test["nlpps"] == pytest.approx(sum(test["per_step"]), rel=1e-4)  # prior term is 0: a_T = 0
    out = run_script("dlm142_diffusion.py", base + ["--run-name", "straight", "--eval-only"]).stdout
    assert f"nlpps {test['nlpps']:.2f}" in out
    out = run_script("dlm142_diffusion.py", base + ["--run-name", "straight", "--sample-only"]).stdout
    assert out.count("[SAMPLE]") == 2


# ----------------------------------------------------------------------------- compare.py


def fake_run(root, script, name, values, vocab=("<pad>", "a"), epochs=20, bound="exact", **args):
    run_dir = root / script / name
    run_dir.mkdir(parents=True)
    (run_dir / "args.json").write_text(json.dumps({"epochs": epochs, "lr": 0.5, "run_name": name, **args}))
    records = [dict(kind="train", step=1, epoch=0.5, nlpps=99.0, seq_per_s=123.0),
               dict(kind="val", step=2, epoch=1.0, nlpps=90.0, bpc=1.0, bound=bound),
               dict(kind="test", step=2, epoch=epochs, nlpps=sum(values) / len(values), bpc=1.5, bound=bound)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "test_nlpps.txt").write_text("".join(f"{v}\n" for v in values))
    common.save_checkpoint(dict(script=script, model={"w": torch.zeros(7)}, vocab=list(vocab)), run_dir / "ckpt_best.pt")
    return str(run_dir)


def test_compare_table_winners_and_refusals(tiny_data, tmp_path):
    n = 31
    a = fake_run(tmp_path, "dlm100_rnn", "a", [50.0] + [10.0 + 0.01 * i for i in range(1, n)])
    b = fake_run(tmp_path, "dlm142_diffusion", "b", [20.0] * 3 + [1.0] + [20.0] * (n - 4), bound="elbo",
                 epochs=40, eval_seed=7, max_steps=5)  # run-control flags are not hyper-parameters, but epochs is
    out = tmp_path / "cmp"
    text = compare.compare([a, b, "--data-dir", str(tiny_data), "--out", str(out), "--top", "1"])
    assert "| dlm100_rnn/a | lr=0.5 | 7 | 20 | 11.44 | 1.5000 | exact | 123 |" in text
    assert "| dlm142_diffusion/b | epochs=40 lr=0.5 | 7 | 40 |" in text
    assert "dlm100_rnn/a wins on 93.5% of the captions, dlm142_diffusion/b on 6.5%" in text
    captions = data.read_captions(tiny_data / "test_2016_flickr.en.gz")
    assert f"- 10.0 / 20.0  `{captions[1]}`" in text   # the largest difference in a's favour
    assert f"- 20.0 / 50.0  `{captions[0]}`" in text   # ... and in b's
    assert (out / "comparison.md").read_text() == text and (out / "comparison.png").stat().st_size > 0

    short = fake_run(tmp_path, "dlm100_rnn", "short", [1.0] * (n - 1))
    with pytest.raises(common.UserError, match="do not line up"):
        compare.compare([a, short, "--data-dir", str(tiny_data), "--out", str(out)])
    other = fake_run(tmp_path, "dlm100_rnn", "other", [1.0] * n, vocab=("<pad>", "b"))
    with pytest.raises(common.UserError, match="different vocabularies"):
        compare.compare([a, other, "--data-dir", str(tiny_data), "--out", str(out)])
    proc = subprocess.run([sys.executable, str(HERE / "compare.py"), a, str(tmp_path / "nothing")],
                          capture_output=True, text=True, cwd=HERE)
    assert_one_line_error(proc, "no args.json")


# ----------------------------------------------------------------------------- DLM123

GMMVAE_TINY = ["--embed", "8", "--components", "4", "--depth", "1", "--batch-size", "50", "--eval-batch-size", "64",
               "--iw-samples", "4", "--num-samples", "2", "--log-every", "1"]
CPU = torch.device("cpu")


def tiny_gmmvae(vocab_size=5, **overrides):
    torch.manual_seed(0)
    cfg = dlm123_gmmvae.Config(**{"embed": 3, "components": 4, "depth": 1, **overrides})
    return dlm123_gmmvae.Model(vocab_size, cfg).double(), cfg


def test_dlm123_elbo_terms_match_torch_distributions():
    D = torch.distributions
    model, _ = tiny_gmmvae()
    x = torch.tensor([[3, 4, 0, 0], [1, 2, 3, 0]])
    mean, log_sigma = model.encode(x)
    assert mean.shape == (2, 4, 3) and log_sigma.shape == (3,)
    q = D.Independent(D.Normal(mean, log_sigma.exp()), 2)  # over (slot, dim)
    torch.testing.assert_close(model.entropy(mean, log_sigma), q.entropy())
    z = model.draw(mean, log_sigma, 6, torch.Generator().manual_seed(0))  # (6, 2, 4, 3)
    log_px_z, log_pz = model.log_joint(x, z)
    prior = D.MixtureSameFamily(D.Categorical(logits=torch.zeros(4)),
                                D.Independent(D.Normal(model.prior_means, model.prior_log_std.exp()), 1))
    torch.testing.assert_close(log_pz, prior.log_prob(z).sum(-1))  # every slot scored, BOS-free and PAD included
    decoder = D.Categorical(logits=model.decoder_log_probs(z))
    torch.testing.assert_close(log_px_z, decoder.log_prob(x).sum(-1))
    # the training loss is exactly -mean_s [log p(x|z_s) + log p(z_s)] - H[q] for the same draws
    loss = model.loss(x, 6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss, -(log_px_z + log_pz).mean(0) - q.entropy())
    reinforce = model.loss(x, 6, "reinforce", torch.Generator().manual_seed(0))
    torch.testing.assert_close(reinforce, loss)  # same value; only the gradient differs


def test_dlm123_posterior_scale_is_capped_and_starts_at_one():
    for scale in ("dim", "slot"):
        model, cfg = tiny_gmmvae(posterior_scale=scale, sigma_max=2.5)
        x = torch.tensor([[3, 4, 0]])
        assert torch.allclose(model.encode(x)[1].exp(), torch.ones(1, dtype=torch.double))
        with torch.no_grad():
            (model.scale if scale == "dim" else model.scale.bias).add_(50.0)
        sigma = model.encode(x)[1].exp()
        assert (sigma <= 2.5).all() and (sigma > 2.49).all()


def test_dlm123_iw_bound_tightens_with_samples_and_equals_the_elbo_for_one():
    model, cfg = tiny_gmmvae()
    x = torch.tensor([[3, 4, 2, 0, 0, 0], [1, 2, 3, 4, 3, 0]]).repeat(500, 1)
    bounds = {}
    for m in (1, 4, 64):
        result = dlm123_gmmvae.evaluate(model, x, dataclasses.replace(cfg, iw_samples=m), CPU)
        bounds[m] = result["neg_iw"].mean().item(), result["neg_elbo"].mean().item()
        assert (result["kl"] > 0).all()
    assert bounds[64][0] < bounds[4][0] - 0.5 < bounds[1][0] - 1.0
    assert bounds[4][0] < bounds[4][1] and bounds[64][0] < bounds[64][1]  # -IW_M <= -ELBO
    # one draw: -IW_1 = -log p(x, z) + log q(z|x), whose mean is the -ELBO (there with closed-form entropy)
    assert bounds[1][0] == pytest.approx(bounds[1][1], abs=0.3)
    assert bounds[64][1] == pytest.approx(bounds[1][1], abs=0.3)  # the ELBO does not depend on M


def test_dlm123_importance_weights_give_probabilities_that_sum_to_one():
    # mean_m p(x, z_m) / q(z_m|x) is an unbiased estimate of p(x); over all 3^2 sequences of 2 slots the model's
    # probabilities sum to 1 only if every latent the decoder reads is scored by the prior. A posterior scale of
    # 1.5 (wider than the initial encoder's) keeps the importance weights light-tailed.
    model, cfg = tiny_gmmvae(vocab_size=3, embed=2, components=3, sigma_max=4.0)
    with torch.no_grad():
        model.scale.fill_(-math.log(4.0 / 1.5 - 1))
    x = torch.tensor(list(itertools.product(range(3), repeat=2)))
    result = dlm123_gmmvae.evaluate(model, x, dataclasses.replace(cfg, iw_samples=2000, eval_batch_size=9), CPU)
    assert torch.exp(-result["neg_iw"]).sum().item() == pytest.approx(1.0, abs=0.04)
    assert torch.exp(-result["neg_elbo"]).sum().item() < 0.5  # the ELBO is a much looser bound


def test_dlm123_reinforce_and_reparam_gradients_agree_in_expectation():
    model, cfg = tiny_gmmvae()
    x = torch.tensor([[3, 4, 1, 0], [1, 2, 3, 0]])
    grads = {}
    for estimator in ("reparam", "reinforce"):
        loss = model.loss(x, 40000, estimator, torch.Generator().manual_seed(1)).mean()
        grads[estimator] = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])
    error = (grads["reinforce"] - grads["reparam"]).norm() / grads["reparam"].norm()
    assert error < 0.05, error
    # ... but one draw of REINFORCE is far noisier: the reason reparameterisation is the default
    variance = dlm123_gmmvae.gradient_variance(model, x, cfg)
    assert variance["reinforce"] > 10 * variance["reparam"] > 0


def test_dlm123_evaluation_is_seeded_and_leaves_the_training_rng_alone():
    model, cfg = tiny_gmmvae()
    x = torch.tensor([[3, 4, 1, 0], [1, 2, 3, 0]])
    torch.manual_seed(5)
    state = torch.get_rng_state()
    a = dlm123_gmmvae.evaluate(model, x, dataclasses.replace(cfg, iw_samples=3), CPU)
    dlm123_gmmvae.gradient_variance(model, x, cfg)
    dlm123_gmmvae.sample(model, 2, 1.0, CPU, torch.Generator().manual_seed(0))
    b = dlm123_gmmvae.evaluate(model, x, dataclasses.replace(cfg, iw_samples=3), CPU)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dlm123_sampler_draws_from_the_model_the_loss_scores():
    # symbol frequencies of the sampler at the interior slots == E_{z ~ prior}[p(x_t | z)], the prior sampled by
    # torch.distributions (a sampler that ignored the mixture means would be ~0.05 off)
    D = torch.distributions
    model, _ = tiny_gmmvae()
    with torch.no_grad():
        model.embed.weight.mul_(3)  # sharper decoder: the frequencies then depend on where z falls
    x = dlm123_gmmvae.sample(model, 2000, 1.0, CPU, torch.Generator().manual_seed(0))
    assert x.shape == (2000, data.SLOTS) and x.dtype == torch.long
    freq = torch.bincount(x[:, 10:90].flatten(), minlength=5).double() / x[:, 10:90].numel()
    prior = D.MixtureSameFamily(D.Categorical(logits=torch.zeros(4, dtype=torch.double)),
                                D.Independent(D.Normal(model.prior_means, model.prior_log_std.exp()), 1))
    with torch.no_grad():
        expected = model.decoder_log_probs(prior.sample((2000, data.SLOTS))).exp()[:, 10:90].mean((0, 1))
    torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)


def test_dlm123_run_writes_everything_and_resume_is_exact(tiny_data, tmp_path):
    base = GMMVAE_TINY + ["--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--epochs", "3"]
    straight, split = train_straight_and_resumed("dlm123_gmmvae.py", base, ["latents.png"])
    assert len((straight / "test_nlpps.txt").read_text().split()) == 31
    val_straight = read_records(straight, "val")
    assert len(val_straight) == 3 and set(val_straight) <= set(read_records(split, "val"))
    assert read_records(straight, "test") == read_records(split, "test")[-1:]
    train = read_records(straight, "train")
    assert train[-1][1] < 0.8 * train[0][1]
    records = [r for r in common.read_metrics(straight) if r["kind"] in ("val", "test")]
    for r in records:
        assert r["bound"] == "iw-4" and r["nlpps"] <= r["elbo"] and r["kl"] > 0 and 0 <= r["active_dims"] <= 8
    assert all(r["grad_var_reinforce"] > r["grad_var_reparam"] for r in records if r["kind"] == "val")
    test_values = [float(v) for v in (straight / "test_nlpps.txt").read_text().split()]
    assert sum(test_values) / len(test_values) == pytest.approx(records[-1]["nlpps"], abs=1e-3)
    samples = (straight / "samples.txt").read_text()
    assert samples.count("[TARGET]") == samples.count("[RECONS]") == 6 and samples.count("[RANDOM]") == 6
    ckpt = torch.load(straight / "ckpt_last.pt", weights_only=True)
    assert ckpt["step"] == 12 and json.loads((straight / "args.json").read_text())["epochs"] == 3


def test_dlm123_reinforce_run_eval_only_sample_only_and_bad_input(tiny_data, tmp_path):
    base = GMMVAE_TINY + ["--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--epochs", "1"]
    run_script("dlm123_gmmvae.py", base + ["--estimator", "reinforce", "--posterior-scale", "slot"])
    run_dir = tmp_path / "dlm123_gmmvae" / "default"
    test_line = [l for l in (run_dir / "log.txt").read_text().splitlines() if l.startswith("eval test")][-1]
    assert "(iw-4)" in test_line and "-elbo" in test_line and "active dims" in test_line
    out = run_script("dlm123_gmmvae.py", base + ["--eval-only"]).stdout  # settings come from the checkpoint
    assert test_line.split("| nlpps")[1] in out  # same number: fixed evaluation seed
    out = run_script("dlm123_gmmvae.py", base + ["--sample-only", "--num-samples", "3"]).stdout
    assert out.count("[RANDOM]") == 3 and out.count("[TARGET]") == out.count("[RECONS]") == 2

    with pytest.raises(common.UserError, match="--samples >= 2"):
        dlm123_gmmvae.run(base + ["--run-name", "r1", "--estimator", "reinforce", "--samples", "1"])
    common.save_checkpoint({"script": "dlm100_rnn"}, run_dir / "ckpt_last.pt")
    assert_one_line_error(run_script("dlm123_gmmvae.py", base + ["--resume"], check=False),
                          "not a dlm123_gmmvae checkpoint")
    for bad in (["--sigma-max", "0"], ["--posterior-scale", "pixel"], ["--samples", "0"]):
        with pytest.raises(SystemExit) as e:
            common.parse_config(dlm123_gmmvae.Config, "", bad)
        assert e.value.code == 2


def test_dlm123_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    base = GMMVAE_TINY + ["--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--epochs", "3"]
    calls = {"n": 0}
    real_loss = dlm123_gmmvae.Model.loss

    def loss_that_blows_up(self, x, *args, **kwargs):
        calls["n"] += 1 if self.training else 0
        out = real_loss(self, x, *args, **kwargs)
        return out * float("nan") if calls["n"] > 6 else out  # training step 7: inside epoch 2

    monkeypatch.setattr(dlm123_gmmvae.Model, "loss", loss_that_blows_up)
    monkeypatch.setattr(dlm123_gmmvae, "gradient_variance", lambda *a: {"reparam": 0.0, "reinforce": 0.0})
    with pytest.raises(common.UserError, match="non-finite loss at step 6.*ckpt_last.pt"):
        dlm123_gmmvae.run(base)
    ckpt = common.load_checkpoint(tmp_path / "dlm123_gmmvae" / "default" / "ckpt_last.pt", "dlm123_gmmvae")
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


# ----------------------------------------------------------------------------- DLM107
# The exact checks use a tiny model in float64: the characters UNK, 3 and 4 (3 plays the space), captions of
# at most 3 characters (4 slots), pieces of at most 2 characters, so every caption and every segmentation can
# be enumerated.

SPACE, CHARS = 3, (data.UNK, 3, 4)
SEG_TINY = ["--embed", "16", "--batch-size", "50", "--eval-batch-size", "64", "--num-samples", "2", "--log-every", "1",
        "--iw-samples", "8"]


def tiny_model(parser="causal", max_piece=2, **kw):
    torch.manual_seed(0)
    model = seg.Model(len(CHARS) + 2, SPACE, seg.Config(embed=8, max_piece=max_piece, parser=parser, **kw)).double()
    with torch.no_grad():  # sharper distributions than the initial ones, so the checks are not near-uniform
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model


def caption(chars, slots):
    return torch.tensor([list(chars) + [data.PAD] * (slots - len(chars))])


def segmentations(n, slots, max_piece):
    """Every segmentation of an n-character caption into pieces of 1..max_piece characters: (Z, slots) bool,
    z_t = a piece ends after character t. Built independently of the script's force_cuts."""
    out = []
    for inner in itertools.product([False, True], repeat=max(n - 1, 0)):
        z = list(inner) + [True] * (n > 0)
        ends = [t for t, c in enumerate(z) if c]
        if all(b - a <= max_piece for a, b in zip([-1] + ends, ends)):
            out.append(z + [False] * (slots - n))
    return torch.tensor(out)


def exact_terms(model, x, max_piece):
    """log p(x, z) and log q(z|x) of every segmentation z of x."""
    Z = segmentations(int(data.num_chars(x)), x.shape[1], max_piece)
    log_p, log_q, cuts, _, _ = model.elbo_terms(x, len(Z), drawn=Z.unsqueeze(1))
    assert torch.equal(cuts[:, 0], Z)  # a valid segmentation needs no forced cut added
    return log_p[:, 0], log_q[:, 0]


# ----------------------------------------------------------------------------- segmentations, pieces
def test_dlm107_pieces_concatenate_back_to_the_caption_for_random_and_forced_cuts():
    gen = torch.Generator().manual_seed(0)
    n = torch.tensor([0, 1, 5, 21, 22, 40, 99, 99])
    x = torch.where(torch.arange(data.SLOTS) < n.unsqueeze(1), torch.randint(3, 83, (len(n), data.SLOTS), generator=gen),
                    data.PAD)
    for rate in (0.0, 0.05, 0.5, 1.0):
        drawn = torch.rand(x.shape, generator=gen) < rate
        cuts, free = seg.force_cuts(drawn, n, 21)
        pieces = seg.make_pieces(x, cuts, 22)
        assert pieces.shape[1] == cuts.sum(1).max() + 1  # the prior runs over the most pieces + the end piece
        for i in range(len(n)):
            chars = [[c for c in p.tolist() if c != data.PAD] for p in pieces[i]]
            k = int(cuts[i].sum())
            assert sum(chars[:k], []) == x[i, :n[i]].tolist()
            assert all(1 <= len(c) <= 21 for c in chars[:k]) and all(len(c) == 0 for c in chars[k:])
            for p, c in zip(pieces[i], chars):  # characters first, then PAD (STOP) in every later slot
                assert p[:len(c)].tolist() == c and (p[len(c):] == data.PAD).all()
            assert not cuts[i, n[i]:].any() and (n[i] == 0 or cuts[i, n[i] - 1])
            assert not (free[i] & ~drawn[i] & cuts[i]).any()  # every cut that was not drawn was forced
    no_cuts = seg.force_cuts(torch.zeros(1, data.SLOTS, dtype=torch.bool), torch.tensor([99]), 21)
    lengths = [len([c for c in p.tolist() if c]) for p in seg.make_pieces(x[6:7], no_cuts[0], 22)[0]]
    assert lengths == [21, 21, 21, 21, 15, 0] and no_cuts[1].sum() == 99 - 5  # 4 forced cuts + the end: no cost


# ----------------------------------------------------------------------------- the bound, exactly
@pytest.mark.parametrize("parser", ["causal", "bi"])
def test_dlm107_p_sums_to_one_and_elbo_is_below_log_p_for_every_caption(parser):
    model, slots, total = tiny_model(parser), 4, 0.0
    for n in range(slots):
        for chars in itertools.product(CHARS, repeat=n):
            log_p, log_q = exact_terms(model, caption(chars, slots), max_piece=2)
            assert log_q.exp().sum().item() == pytest.approx(1.0, abs=1e-12)  # q: a distribution over them
            log_px = torch.logsumexp(log_p, 0)
            elbo = (log_q.exp() * (log_p - log_q)).sum()
            assert elbo <= log_px + 1e-12
            if len(log_p) > 1:
                assert elbo < log_px - 1e-3  # a real gap: q is not the posterior
            total += log_px.exp().item()
    # <= 1 as any model must; = 1 because the forced STOPs leave no mass to longer captions
    assert total <= 1 + 1e-12 and total == pytest.approx(1.0, abs=1e-12)


def test_dlm107_importance_weighted_bound_approaches_log_p_with_many_samples():
    model, x = tiny_model(), caption((4, 3, 4), 4)
    log_p, log_q = exact_terms(model, x, max_piece=2)
    log_px, elbo = torch.logsumexp(log_p, 0).item(), (log_q.exp() * (log_p - log_q)).sum().item()
    with torch.no_grad():
        lp, lq, _, _, _ = model.elbo_terms(x, 20000, torch.Generator().manual_seed(0))
    f = (lp - lq)[:, 0]
    assert f.mean().item() == pytest.approx(elbo, abs=0.03)
    iw = common.logmeanexp(f, 0).item()
    assert abs(iw - log_px) < 0.02 and iw - elbo > 0.2  # the gap here is ~0.5 nats


def test_dlm107_sampler_draws_pieces_with_the_probabilities_the_loss_scores():
    model, slots, n = tiny_model(), 4, 20000
    x, cuts = seg.sample(model, n, 1.0, torch.device("cpu"), torch.Generator().manual_seed(0), slots=slots)
    outcomes = torch.cat([x, cuts.long()], 1)
    unique, counts = outcomes.unique(dim=0, return_counts=True)
    with torch.no_grad():
        log_p = model.log_joint(unique[:, :slots], unique[:, slots:].bool())
    assert log_p.exp().sum() > 0.98  # the drawn outcomes hold almost all of p's mass
    torch.testing.assert_close(counts / n, log_p.exp(), atol=0.01, rtol=0, check_dtype=False)


# ----------------------------------------------------------------------------- the estimator
@pytest.mark.parametrize("baseline,k", [("loo", 2), ("running", 1)])
def test_dlm107_reinforce_gradient_matches_the_exact_elbo_gradient(baseline, k):
    # E over all sets of K segmentations of the estimator's gradient == the exact gradient of the ELBO,
    # for the segmenter's parameters (REINFORCE) and the generator's (pathwise) alike.
    model = tiny_model(max_piece=3, samples=k, baseline=baseline).eval()  # eval: the running mean stays put
    model.running.fill_(-1.7)
    x = caption((4, 3, 4, 4, 3), 6)
    params = [p for p in model.parameters()]
    log_p, log_q = exact_terms(model, x, max_piece=3)
    exact = torch.autograd.grad((log_q.exp() * (log_p - log_q)).sum(), params, allow_unused=True)
    Z = segmentations(5, 6, 3)
    expected = [torch.zeros_like(p) for p in params]
    for idx in itertools.product(range(len(Z)), repeat=k):
        drawn = Z[list(idx)].unsqueeze(1)  # (k, 1, slots)
        loss, _ = model.loss(x, drawn=drawn)
        weight = log_q[list(idx)].sum().exp().detach()
        for e, g in zip(expected, torch.autograd.grad(-loss.sum(), params, allow_unused=True)):
            e += weight * (g if g is not None else 0)
    assert sum(e.abs().sum() for e in expected) > 0.1
    for e, g in zip(expected, exact):
        torch.testing.assert_close(e, g if g is not None else torch.zeros_like(e))


def test_dlm107_loss_value_is_the_negative_elbo_estimate_and_spaces_is_exact():
    model, x = tiny_model(samples=3), caption((4, 3, 4, 4), 5)
    Z = segmentations(4, 5, 2)[:3].unsqueeze(1)
    loss, stats = model.loss(x, drawn=Z)
    lp, lq, _, _, _ = model.elbo_terms(x, 3, drawn=Z)
    assert loss.item() == pytest.approx(-(lp - lq).mean().item()) and stats["grad_var"] > 0
    spaces = seg.Model(5, SPACE, seg.Config(embed=8, max_piece=2, segmenter="spaces")).double()
    x = caption((4, 4, 4, 3, 4), 6)
    loss, stats = spaces.loss(x)
    z = torch.tensor([[False, True, False, True, True, False]])  # 44|43|4: a forced cut, one after the space
    assert loss.item() == pytest.approx(-spaces.log_joint(x, z).item()) and stats["cut_rate"] == 0.5


# ----------------------------------------------------------------------------- the script
def test_dlm107_run_writes_everything_resume_is_exact_eval_and_sample_only(tiny_data, tmp_path):
    base = SEG_TINY + ["--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--epochs", "4"]
    straight, split = train_straight_and_resumed("dlm107_vae_seg.py", base, ["segments.png"])
    val_straight = read_records(straight, "val")
    assert len(val_straight) == 4 and set(val_straight) <= set(read_records(split, "val"))
    assert read_records(straight, "test") == read_records(split, "test")[-2:]
    train = read_records(straight, "train")
    assert train[-1][1] < train[0][1]
    records = common.read_metrics(straight)
    assert all({"cut_rate", "grad_var"} <= set(r) for r in records if r["kind"] == "train")
    elbo, iw = [r for r in records if r["kind"] == "test"]
    assert (elbo["bound"], iw["bound"]) == ("elbo", "iw-8") and iw["nlpps"] < elbo["nlpps"]
    assert all(0 <= r[key] <= 1 for r in records if r["kind"] != "train" for key in ("cut_rate", "f1"))
    per_caption = [float(v) for v in (straight / "test_nlpps.txt").read_text().split()]
    assert len(per_caption) == 31 and sum(per_caption) / 31 == pytest.approx(iw["nlpps"], abs=1e-3)
    assert torch.load(straight / "ckpt_last.pt", weights_only=True)["step"] == 16

    log = (straight / "log.txt").read_text()
    test_lines = [l for l in log.splitlines() if l.startswith("eval test")]
    out = run_script("dlm107_vae_seg.py", base + ["--run-name", "straight", "--eval-only"]).stdout
    assert all(l.split("| nlpps")[1] in out for l in test_lines)  # the same numbers: a fixed evaluation seed
    out = run_script("dlm107_vae_seg.py", base + ["--run-name", "straight", "--sample-only", "--num-samples", "3"]).stdout
    assert out.count("[SAMPLE]") == 3 and out.count("[SEGMENT]") == seg.SHOWN
    shown = [l.split("] ", 1)[1] for l in out.splitlines() if l.startswith("[SEGMENT]")]
    assert [s.replace("|", "") for s in shown] == make_captions(30, 2)[:seg.SHOWN]  # the first test captions


def test_dlm107_spaces_segmenter_is_exact_with_f1_one_and_bad_flags_are_one_line_errors(tiny_data, tmp_path):
    base = SEG_TINY + ["--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--epochs", "1"]
    out = run_script("dlm107_vae_seg.py", base + ["--segmenter", "spaces", "--run-name", "spaces"]).stdout
    records = common.read_metrics(tmp_path / "dlm107_vae_seg" / "spaces")
    evals = [r for r in records if r["kind"] in ("val", "test")]
    assert [r["bound"] for r in evals] == ["exact", "exact"] and all(r["f1"] == 1.0 for r in evals)
    segmented = [l for l in out.splitlines() if l.startswith("[SEGMENT]")]
    assert all(" |" in l and "| " not in l for l in segmented)  # cut after every space, nowhere else
    proc = run_script("dlm107_vae_seg.py", base + ["--samples", "1"], check=False)
    assert_one_line_error(proc, "leave-one-out", "--samples")
    proc = run_script("dlm107_vae_seg.py", base + ["--max-piece", "0"], check=False)
    assert proc.returncode == 2 and "--max-piece: must be >= 1" in proc.stderr


def test_dlm107_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    base = SEG_TINY + ["--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--epochs", "3", "--num-samples", "0"]
    calls, real_loss = {"n": 0}, seg.Model.loss

    def loss_that_blows_up(self, x, drawn=None):
        calls["n"] += 1
        loss, stats = real_loss(self, x, drawn)
        return (loss * float("nan") if calls["n"] > 6 else loss), stats  # step 7: inside epoch 2

    monkeypatch.setattr(seg.Model, "loss", loss_that_blows_up)
    with pytest.raises(common.UserError, match="non-finite loss at step 6.*ckpt_last.pt"):
        seg.run(base)
    ckpt = common.load_checkpoint(tmp_path / "dlm107_vae_seg" / "default" / "ckpt_last.pt", "dlm107_vae_seg")
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())

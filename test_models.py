"""Tests for data.py, common.py and the model scripts. Run: python -m pytest -q

Tiny data is made in the test itself (a few hundred made-up captions), so the whole suite needs
no network and runs in minutes on 2 CPU cores. One test also reads the real files in
../shared/data/multi30k (or $DLM_DATA_DIR) to check the loader and the published checksums.
"""
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
import data
import dlm100_rnn

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


def test_dlm100_run_writes_everything_and_resume_is_exact(tiny_data, tmp_path):
    base = TINY + ["--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--epochs", "4"]
    run_script("dlm100_rnn.py", base + ["--run-name", "straight"])
    run_script("dlm100_rnn.py", base + ["--run-name", "split", "--max-steps", "6"])  # stops mid-epoch 2
    run_script("dlm100_rnn.py", base + ["--run-name", "split", "--resume"])
    straight, split = tmp_path / "dlm100_rnn" / "straight", tmp_path / "dlm100_rnn" / "split"
    for name in ["args.json", "log.txt", "metrics.jsonl", "ckpt_last.pt", "ckpt_best.pt", "samples.txt",
                 "curves.png", "test_nlpps.txt"]:
        assert (straight / name).exists(), name
    assert len((straight / "test_nlpps.txt").read_text().split()) == 31
    assert read_records(straight, "train") == read_records(split, "train")
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
import dlm142_diffusion  # noqa: E402


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
    marg = F_onehot = torch.nn.functional.one_hot(x0[0], S).float()  # (L, S) q(x_0 | x_0)
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
    run_script("dlm142_diffusion.py", base + ["--run-name", "straight"])
    run_script("dlm142_diffusion.py", base + ["--run-name", "split", "--max-steps", "6"])
    run_script("dlm142_diffusion.py", base + ["--run-name", "split", "--resume"])
    straight, split = tmp_path / "dlm142_diffusion" / "straight", tmp_path / "dlm142_diffusion" / "split"
    for name in ["args.json", "metrics.jsonl", "ckpt_best.pt", "samples.txt", "curves.png", "test_nlpps.txt",
                 "noise_levels.png"]:
        assert (straight / name).exists(), name
    assert read_records(straight, "train") == read_records(split, "train")
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
import compare  # noqa: E402


def fake_run(root, script, name, values, vocab=("<pad>", "a"), epochs=20, bound="exact"):
    run_dir = root / script / name
    run_dir.mkdir(parents=True)
    (run_dir / "args.json").write_text(json.dumps({"epochs": epochs, "lr": 0.5, "run_name": name}))
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
    b = fake_run(tmp_path, "dlm142_diffusion", "b", [20.0] * 3 + [1.0] + [20.0] * (n - 4), bound="elbo")
    out = tmp_path / "cmp"
    text = compare.compare([a, b, "--data-dir", str(tiny_data), "--out", str(out), "--top", "1"])
    assert "| dlm100_rnn/a | lr=0.5 | 7 | 20 | 11.44 | 1.5000 | exact | 123 |" in text
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

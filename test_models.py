"""Tests for the family: data.py, common.py, the four model scripts and compare.py. Run: python -m pytest -q

Layout: shared fixtures; then one section per file in the order a reader meets them (data, common, the
family contract that every script must keep, dlm100, dlm107, dlm123, dlm142, compare). Tiny data is made in
the test itself (a few hundred made-up captions, run with --custom-data), so the suite needs no network;
the checksum and real-file tests read ../shared/data/multi30k (or $DLM_DATA_DIR) and skip without it.
Most runs call a script's main() in this process (what a user types, minus the interpreter start-up);
the interrupt and lock tests use real subprocesses and signals. A new script is registered in TINY only.
"""
import ast
import builtins
import collections
import contextlib
import copy
import dataclasses
import difflib
import errno
import gzip
import importlib
import io
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import common
import compare
import data
import dlm100_rnn
import dlm107_vae_seg
import dlm123_gmmvae
import dlm142_diffusion

HERE = Path(__file__).resolve().parent
REAL_DATA = Path(os.environ.get(data.ENV_VAR) or HERE.parent / "shared" / "data" / "multi30k")
HAVE_REAL_DATA = (REAL_DATA / "train.en.gz").exists()
CPU = torch.device("cpu")
torch.set_num_threads(1)  # bit-for-bit repeatable runs (several threads may sum in another order)


# ============================================================================= shared fixtures
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


# The scripts of the family, each with its smallest sensible model (200 training captions at batch 50 =
# 4 steps an epoch). Register a new script here, and only here: every family test below then runs for it too.
TINY = {
    "dlm100_rnn": ["--embed", "16", "--components", "8"],
    "dlm107_vae_seg": ["--embed", "16", "--piece-embed", "16", "--max-piece", "4", "--lexicon", "50"],
    "dlm123_gmmvae": ["--embed", "8", "--components", "4", "--depth", "1", "--iw-samples", "4"],
    "dlm142_diffusion": ["--embed", "12", "--depth", "2", "--diffusion-steps", "8", "--val-steps", "3",
                         "--lr", "3e-3"],
}
MODULES = {name: importlib.import_module(name) for name in TINY}
FAMILY = ["--batch-size", "50", "--eval-batch-size", "64", "--show-samples", "2", "--log-every", "1",
          "--custom-data"]


def tiny_args(script, data_dir, out_dir, *more):
    return TINY[script] + FAMILY + ["--data-dir", str(data_dir), "--out-dir", str(out_dir), *more]


def call(script, args):
    """A script's main(args) in this process, as its user sees it: (exit status, stdout, stderr)."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            MODULES[script].main(args)
        except SystemExit as e:
            code = e.code
        finally:  # (main sets them as a process of its own would; this one is the test run's)
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
    if isinstance(code, str):  # sys.exit("message"): the interpreter prints it to stderr, status 1
        err.write(code + "\n")
        code = 1
    return code or 0, out.getvalue(), err.getvalue()


def call_ok(script, args):
    code, out, err = call(script, args)
    assert code == 0, f"{script} {' '.join(args)} failed:\n{out}\n{err}"
    return out


def assert_one_line_error(code, err, *words):
    assert code != 0
    err = err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err


def snapshot(folder):
    """Every file of a folder, byte for byte."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def read_metrics(run_dir):
    return dlm100_rnn.read_metrics(Path(run_dir))


def read_records(run_dir, kind):
    return [(r["step"], round(r["nlpps"], 4)) for r in read_metrics(run_dir) if r["kind"] == kind]


class FinishedRuns(dict):
    """finished[script]: the folder of a finished 2-epoch tiny run, trained on first use. Copy it to change
    it."""

    def __init__(self, tiny_data, root):
        super().__init__()
        self.tiny_data, self.root = tiny_data, root

    def __missing__(self, script):
        call_ok(script, tiny_args(script, self.tiny_data, self.root, "--epochs", "2"))
        self[script] = self.root / script / "default"
        return self[script]


@pytest.fixture(scope="session")
def finished(tiny_data, tmp_path_factory):
    return FinishedRuns(tiny_data, tmp_path_factory.mktemp("finished"))


def copy_run(finished_dir, tmp_path):
    """A copy of a finished run folder under tmp_path/out/SCRIPT/default; returns (out_dir, run folder)."""
    target = tmp_path / "out" / finished_dir.parent.name / "default"
    shutil.copytree(finished_dir, target)
    return tmp_path / "out", target



# ============================================================================= data.py
def test_vocab_is_built_from_train_only_and_unseen_chars_are_unk(tiny_data):
    vocab, splits, _, _ = data.load(str(tiny_data), custom=True)
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
    with pytest.raises(data.DataError, match="train.en.gz not found .*--data-dir"):
        data.load(str(tmp_path))


def test_failed_download_names_file_url_and_flag(tmp_path, monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(data, "URL", "http://127.0.0.1:9/")  # nothing listens there: refused at once
    with pytest.raises(data.DataError, match=r"train.en.gz .*http://127.0.0.1:9/train.en.gz.*--data-dir"):
        data.load()
    assert list(tmp_path.iterdir()) == []


def test_download_with_wrong_checksum_is_deleted(tmp_path, monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(data.urllib.request, "urlretrieve", lambda url, path: Path(path).write_bytes(b"evil"))
    with pytest.raises(data.DataError, match="checksum"):
        data.load()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not (REAL_DATA / "train.en.gz").exists(), reason="no local copy of Multi30k")
def test_real_multi30k_files_match_checksums_and_sizes():
    for name, digest in data.SHA256.items():
        assert data._sha256(REAL_DATA / name) == digest
    vocab, splits, sha256, _ = data.load(str(REAL_DATA))
    assert sha256 == data.SHA256
    assert {k: len(v) for k, v in splits.items()} == {"train": 29000, "val": 1014, "test": 1000}
    assert len(vocab) == 83  # 80 characters in train.en + PAD, BOS, UNK


def test_local_files_are_checked_against_the_published_checksums(tiny_data):
    with pytest.raises(data.DataError,
                       match=r"train.en.gz is not the published train.en.gz \(SHA-256.*--custom-data"):
        data.load(str(tiny_data))
    # on purpose: accepted, its checksums returned
    vocab, splits, sha256, _ = data.load(str(tiny_data), custom=True)
    assert sha256 == {name: data._sha256(tiny_data / name) for name in data.FILES.values()} != data.SHA256
    no_spaces_vocab, no_spaces, _, _ = data.load(str(tiny_data), custom=True, no_spaces=True)
    assert " " in vocab.stoi and " " not in no_spaces_vocab.stoi
    assert no_spaces_vocab.decode(no_spaces["train"][0]) == vocab.decode(splits["train"][0]).replace(" ", "")


# ----------------------------------------------------------------------------- data.py: a plain-text corpus
def write_text_split(folder, name, lines):
    """gzipped if the name ends in .gz, else plain UTF-8; one line each."""
    text = "".join(line + "\n" for line in lines)
    if name.endswith(".gz"):
        with gzip.open(folder / name, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        (folder / name).write_text(text, encoding="utf-8")


def plain_text_folder(folder, train, valid, test, gz=False):
    for name, lines in (("train.txt", train), ("valid.txt", valid), ("test.txt", test)):
        write_text_split(folder, name + ".gz" * gz, lines)
    return folder


UNSEEN = "val/test characters unseen in train (<unk>)"
TRAIN = ["the cat sat", "", "a dog ran", "   ", "cats and dogs"]  # two blank lines: not sequences
VALID = ["a cat", ""]
TEST = ["the dog", "a rat"]


@pytest.mark.parametrize("gz", [False, True])
def test_plain_text_layout_loads_skips_blank_lines_and_is_custom(tmp_path, gz):
    plain_text_folder(tmp_path, TRAIN, VALID, TEST, gz)
    vocab, splits, sha256, info = data.load(str(tmp_path))
    assert {split: len(x) for split, x in splits.items()} == {"train": 3, "val": 1, "test": 2}
    assert [vocab.decode(x) for x in splits["train"]] == ["the cat sat", "a dog ran", "cats and dogs"]
    assert vocab.itos[3:] == sorted(set("the cat sat a dog ran cats and dogs"))
    assert vocab.decode(splits["test"][1]) == "a rat"
    names = [n + ".gz" * gz for n in ("train.txt", "valid.txt", "test.txt")]
    assert sha256 == {name: data._sha256(tmp_path / name) for name in names}
    assert info["layout"] == "plain text" and info["custom"] is True
    assert info["summary"].startswith(f"data: plain text in {tmp_path} | train 3 / val 1 / test 2 lines | ")


def test_plain_text_vocabulary_comes_from_train_only(tmp_path):
    plain_text_folder(tmp_path, ["ab ab"], ["abx"], ["yab"])
    vocab, splits, _, _ = data.load(str(tmp_path))
    assert vocab.itos == data.SPECIALS + [" ", "a", "b"]
    assert vocab.decode(splits["val"][0]) == "ab<unk>" and vocab.decode(splits["test"][0]) == "<unk>ab"


def test_summary_counts_cut_lines_and_names_unseen_characters(tmp_path):
    plain_text_folder(tmp_path, ["x" * 120, "abc", "a b"], ["Qa", "x" * 99, "a" * 100], ["Z!", "Zb"])
    vocab, splits, _, info = data.load(str(tmp_path))
    assert vocab.decode(splits["train"][0]) == "x" * 99  # cut at 99 characters, one PAD after
    assert info["summary"] == (f"data: plain text in {tmp_path} | train 3 / val 3 / test 2 lines | "
                               f"2 lines cut at 99 characters | 3 {UNSEEN}: '!', 'Q', 'Z'")


def test_summary_names_at_most_ten_unseen_characters(tmp_path):
    plain_text_folder(tmp_path, ["a"], ["ABCDEF"], ["GHIJKL"])
    summary = data.load(str(tmp_path))[3]["summary"]
    named = ", ".join(map(repr, "ABCDEFGHIJ")) + ", ..."
    assert summary.endswith(f"| 0 lines cut at 99 characters | 12 {UNSEEN}: {named}")


def test_summary_for_no_unseen_characters_and_no_spaces(tmp_path):
    plain_text_folder(tmp_path, ["a b", "ab c"], ["b a"], ["c"])
    vocab, splits, _, info = data.load(str(tmp_path), no_spaces=True)
    assert " " not in vocab.stoi and splits["train_spaces"][1, :2].tolist() == [False, True]
    assert info["summary"] == (f"data: plain text in {tmp_path}, spaces removed | train 2 / val 1 / test 1 "
                               f"lines | 0 lines cut at 99 characters | 0 {UNSEEN}")


def test_plain_text_txt_wins_over_txt_gz_and_the_two_can_mix(tmp_path):
    plain_text_folder(tmp_path, ["plain"], ["plain"], ["plain"])
    write_text_split(tmp_path, "train.txt.gz", ["gzipped"])
    write_text_split(tmp_path, "valid.txt.gz", ["gzipped"])
    (tmp_path / "valid.txt").unlink()
    vocab, splits, sha256, _ = data.load(str(tmp_path))
    assert sorted(sha256) == ["test.txt", "train.txt", "valid.txt.gz"]
    assert vocab.decode(splits["train"][0]) == "plain"


def test_a_plain_text_file_of_blank_lines_is_an_error(tmp_path):
    plain_text_folder(tmp_path, ["a"], ["", "  "], ["a"])
    with pytest.raises(data.DataError, match="valid.txt holds no sequences"):
        data.load(str(tmp_path))


@pytest.mark.parametrize("present", [[], ["train.txt", "valid.txt"],
                                     ["train.en.gz", "val.en.gz", "test.txt"]])
def test_a_folder_with_neither_full_layout_names_both(tmp_path, present):
    for name in present:
        write_text_split(tmp_path, name, ["a"])
    with pytest.raises(data.DataError) as e:
        data.load(str(tmp_path))
    message = str(e.value)
    assert "\n" not in message and str(tmp_path) in message and "--data-dir" in message
    for name in [*data.FILES.values(), "train.txt", "valid.txt", "test.txt"]:
        assert name in message


def test_env_var_folder_is_read_like_data_dir(tmp_path, monkeypatch):
    plain_text_folder(tmp_path, ["ab"], ["a"], ["b"])
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    assert data.load()[3]["layout"] == "plain text"
    (tmp_path / "test.txt").unlink()
    with pytest.raises(data.DataError, match=re.escape(f"not found in {tmp_path} (from {data.ENV_VAR})")):
        data.load()


def multi30k_folder(folder, lines=("A dog.", "", "A cat runs.")):
    for name in data.FILES.values():
        write_text_split(folder, name, list(lines))
    return folder


def test_multi30k_with_wrong_checksums_is_refused_even_beside_plain_text(tmp_path):
    multi30k_folder(tmp_path)
    plain_text_folder(tmp_path, ["ab"], ["a"], ["b"])  # Multi30k is complete, so it is the one read
    refused = r"train.en.gz is not the published train.en.gz \(SHA-256.*--custom-data"
    with pytest.raises(data.DataError, match=refused):
        data.load(str(tmp_path))
    vocab, splits, sha256, info = data.load(str(tmp_path), custom=True)
    assert sorted(sha256) == sorted(data.FILES.values())
    assert info["layout"] == "multi30k" and info["custom"] is True
    assert len(splits["train"]) == 3 and vocab.decode(splits["train"][1]) == ""  # blank line kept, as ever
    assert info["summary"].startswith(f"data: Multi30k (custom data) in {tmp_path} | train 3 / val 3 /")


@pytest.mark.skipif(not (REAL_DATA / "train.en.gz").exists(), reason="no local copy of Multi30k")
def test_real_multi30k_info_and_summary():
    vocab, splits, sha256, info = data.load(str(REAL_DATA))
    assert sha256 == data.SHA256 and info["layout"] == "multi30k" and info["custom"] is False
    cut = sum(len(line) > 99 for name in data.FILES.values() for line in data.read_captions(REAL_DATA / name))
    assert cut == 1443
    assert info["summary"] == (f"data: Multi30k in {REAL_DATA} | train 29,000 / val 1,014 / test 1,000 "
                               f"lines | 1,443 lines cut at 99 characters | 0 {UNSEEN}")


# ============================================================================= common.py
def test_gaussian_helpers_match_torch_distributions():
    torch.manual_seed(0)
    D = torch.distributions
    x, m, ls = torch.randn(5, 4), torch.randn(5, 4), torch.randn(5, 4) * 0.3
    q = D.Normal(m, ls.exp())
    torch.testing.assert_close(common.gaussian_log_prob(x, m, ls), q.log_prob(x).sum(-1))
    torch.testing.assert_close(common.gaussian_entropy(ls), q.entropy().sum(-1))


def test_mixture_log_prob_matches_torch_mixture():
    torch.manual_seed(0)
    D = torch.distributions
    K, dim = 6, 3
    means, log_std = torch.randn(K, dim), torch.randn(dim) * 0.3
    x = torch.randn(7, 2, dim)
    uniform = D.MixtureSameFamily(D.Categorical(logits=torch.zeros(K)),
                                  D.Independent(D.Normal(means, log_std.exp()), 1))
    torch.testing.assert_close(common.mixture_log_prob(x, means, log_std), uniform.log_prob(x))


def test_logmeanexp_and_bits_per_char():
    x = torch.tensor([[0.0, 1.0], [2.0, -3.0], [-1.0, 0.5]])
    torch.testing.assert_close(common.logmeanexp(x, dim=0), x.exp().mean(0).log())
    nlpps, bpc = common.nlpps_and_bpc(torch.tensor([math.log(2) * 10, math.log(2) * 12]),
                                      torch.tensor([9, 11]))
    assert nlpps == pytest.approx(math.log(2) * 11) and bpc == pytest.approx(1.0)


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
        expected = expected + weight * torch.autograd.grad(common.reinforce_surrogate(log_q, reward),
                                                           theta)[0]
    torch.testing.assert_close(expected, exact)
    with pytest.raises(ValueError):
        common.reinforce_surrogate(torch.zeros(1, 2), torch.zeros(1, 2))


def test_evaluation_noise_never_repeats_a_training_stream():
    """Torch seeds are 32-bit; the evaluation seed lies outside the --seed range, so no seed replays it."""
    first = torch.rand(8, generator=common.eval_generator())
    # the same at every evaluation
    assert torch.equal(first, torch.rand(8, generator=common.eval_generator()))
    for seed in (0, 1, 1234, 2**31 - 1):
        assert not torch.equal(first, torch.rand(8, generator=torch.Generator().manual_seed(seed)))
    with pytest.raises(SystemExit):
        with contextlib.redirect_stderr(io.StringIO()):
            common.parse_flags(dlm100_rnn.Config, "", ["--seed", str(2**31)])


def test_out_of_range_flags_are_one_line_argparse_errors():
    for bad in (["--lr", "-1"], ["--embed", "0"], ["--epochs", "0"], ["--head", "lstm"], ["--lr", "abc"],
                ["--lr", "inf"], ["--temperature", "0"]):
        err = io.StringIO()
        with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(err):
            common.parse_flags(dlm100_rnn.Config, "", bad)
        assert (e.value.code == 2 and len(err.getvalue().strip().splitlines()) == 1
                and bad[0] in err.getvalue())
    for module in (dlm123_gmmvae, dlm142_diffusion):  # a layer count that would fill the memory one layer
        with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):  # at a time: refused
            common.parse_flags(module.Config, "", ["--depth", "100000"])
    cfg, given = common.parse_flags(dlm100_rnn.Config, "", ["--lr", "1e-4", "--no-compile"])
    assert cfg.lr == 1e-4 and given == {"lr", "compile"}


# ============================================================================= the family contract
# Every script keeps these promises; each test runs over all of them.
SCRIPTS = list(MODULES)
RUN_MARKER = "# ============================================================================= the run"


def local_imports(path):
    names = {p.stem for p in HERE.glob("*.py")}
    tree = ast.parse(path.read_text())
    found = {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    found |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    return found & names


def test_data_and_common_import_no_project_file_and_scripts_only_them():
    assert local_imports(HERE / "data.py") == set() and local_imports(HERE / "common.py") == set()
    for script in SCRIPTS:
        assert local_imports(HERE / f"{script}.py") == {"common", "data"}, script


def test_every_line_of_the_code_fits_in_110_characters():
    long = [f"{path.name}:{n}" for path in sorted(HERE.glob("*.py"))
            for n, line in enumerate(path.read_text().splitlines(), 1) if len(line) > 110]
    assert not long, f"lines over 110 characters: {', '.join(long)}"


def test_the_run_is_the_same_text_in_every_script():
    """Below the run marker every script keeps dlm100_rnn.py's lines word for word, in order; a model may add
    lines (its extra figure, its evaluation's arguments) and change up to ten: a diff shows only those."""
    runs = {s: (HERE / f"{s}.py").read_text().split(RUN_MARKER) for s in SCRIPTS}
    assert all(len(parts) == 2 for parts in runs.values()), "each script has the run marker exactly once"
    base = runs["dlm100_rnn"][1].splitlines()
    for script in SCRIPTS:
        lines = runs[script][1].splitlines()
        blocks = difflib.SequenceMatcher(None, base, lines, autojunk=False).get_opcodes()
        changed = [line for tag, i1, i2, _, _ in blocks if tag in ("replace", "delete")
                   for line in base[i1:i2]]
        assert len(changed) <= 10, (f"{script} rewrites these lines of dlm100_rnn.py's run:\n"
                                    + "\n".join(changed))


@pytest.mark.parametrize("script", SCRIPTS)
def test_checkpoint_is_atomic_and_foreign_or_corrupt_ones_are_refused(script, tmp_path):
    module, path = MODULES[script], tmp_path / "ckpt.pt"
    whole = dict(script=script, args=dataclasses.asdict(module.Config()), vocab=[], data_sha256={},
                 run_id="0", step=0, best_val=math.inf, model={"w": torch.ones(2)}, optimizer={},
                 epoch_rng=torch.get_rng_state(), torch_rng=torch.get_rng_state(), train_seconds=0.0,
                 train_cpu_seconds=0.0, train_losses=[])
    module.save_checkpoint(whole, path)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    assert module.load_checkpoint(path)["model"]["w"].sum() == 2
    older = {k: v for k, v in whole["args"].items() if k != "batch_size"}  # a flag this version has added
    for garbled in (dict(whole, args=None), {k: v for k, v in whole.items() if k != "data_sha256"},
                    dict(whole, args=older), dict(whole, args=dict(whole["args"], lr=-1.0))):
        module.save_checkpoint(garbled, path)  # its own script's, but not whole: refused before it is read
        with pytest.raises(module.RunError, match=f"not a whole {script} checkpoint .*(args|data_sha256|"
                                                  "--batch-size|--lr)"):
            module.load_checkpoint(path)
    module.save_checkpoint(whole, path)
    other = next(s for s in SCRIPTS if s != script)
    with pytest.raises(MODULES[other].RunError, match=f"not a {other} checkpoint"):
        MODULES[other].load_checkpoint(path)
    for bad in (path.read_bytes()[:50], b""):
        path.write_bytes(bad)
        with pytest.raises(module.RunError, match="not a readable checkpoint"):
            module.load_checkpoint(path)
    with pytest.raises(module.RunError, match="no checkpoint at .*--out-dir"):
        module.load_checkpoint(tmp_path / "nowhere" / "missing.pt")


def test_a_failed_checkpoint_write_says_why_leaves_no_temp_file_and_keeps_the_old_one(tmp_path):
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full (a device whose every write fails as on a full disk)")
    path = tmp_path / "ckpt_last.pt"
    dlm100_rnn.save_checkpoint({"script": "dlm100_rnn", "step": 1}, path)
    for name in ("ckpt_last.pt.tmp", "ckpt_best.pt.tmp"):  # every temp file's write fails as on a full disk
        (tmp_path / name).symlink_to("/dev/full")
    with pytest.raises(dlm100_rnn.RunError, match="could not write .*ckpt_last.pt: No space left on device; "
                                                  "the previous ckpt_last.pt is kept"):
        dlm100_rnn.save_checkpoint({"script": "dlm100_rnn", "step": 2}, path)
    with pytest.raises(dlm100_rnn.RunError, match="No space left on device; no ckpt_best.pt was written"):
        # the first
        dlm100_rnn.save_checkpoint({"script": "dlm100_rnn", "step": 1}, tmp_path / "ckpt_best.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt_last.pt"]
    assert torch.load(path, weights_only=True)["step"] == 1


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_documents_every_flag_once_with_its_default(script):
    out = subprocess.run([sys.executable, str(HERE / f"{script}.py"), "-h"], capture_output=True, text=True,
                         cwd=HERE).stdout
    for f in dataclasses.fields(MODULES[script].Config):
        flag = "--" + f.name.replace("_", "-")
        assert out.count(flag + " ") + out.count(flag + "\n") >= 1, flag
    # the epochs default shown
    assert "%%" not in out and f"(default: {MODULES[script].Config().epochs})" in out
    assert "\nthe model" in out and "\noptimisation and data" in out and "\nrun control" in out  # in sections
    assert MODULES[script].RUN_FLAGS < {f.name for f in dataclasses.fields(MODULES[script].Config)}


@pytest.mark.parametrize("script", SCRIPTS)
def test_resumed_run_equals_a_straight_one_and_records_no_step_twice(script, tiny_data, tmp_path):
    """Train 3 epochs straight; and again stopped by --max-steps 6 (mid-epoch 2), then --resume'd without
    --epochs: the run keeps its 3 epochs (and its lr schedule), not the default."""
    base = tiny_args(script, tiny_data, tmp_path, "--epochs", "3")
    call_ok(script, base + ["--run-name", "straight"])
    call_ok(script, base + ["--run-name", "split", "--max-steps", "6"])
    with open(tmp_path / script / "split" / "metrics.jsonl", "a") as f:  # as if killed while logging step 8
        f.write(json.dumps(dict(kind="train", step=7, epoch=1.75, nlpps=1.0)) + '\n{"kind": "train", "st')
        f.write('\n{"kind": "val", "step": "a", "epoch": 1, "nlpps": 1}\n')  # and a hand-edited line: dropped
    last = tmp_path / script / "split" / "ckpt_last.pt"  # its clocks, as if the first 6 steps took 1000 s
    clocks = dict(train_seconds=1000.0, train_cpu_seconds=900.0)
    MODULES[script].save_checkpoint(torch.load(last, weights_only=True) | clocks, last)
    out = call_ok(script, tiny_args(script, tiny_data, tmp_path, "--run-name", "split", "--resume"))
    assert "resumed at step 6 | 3 epochs |" in out
    straight, split = tmp_path / script / "straight", tmp_path / script / "split"
    for name in ("args.json", "log.txt", "metrics.jsonl", "ckpt_last.pt", "ckpt_best.pt", "samples.txt",
                 "test_nlpps.txt", "curves.png"):
        assert (straight / name).exists(), name
    assert read_records(straight, "train") == read_records(split, "train")
    assert set(read_records(straight, "val")) <= set(read_records(split, "val"))
    assert read_records(straight, "test") == read_records(split, "test")[-1:]  # split also tested at step 6
    train = [v for _, v in read_records(straight, "train")]
    assert sum(train[-3:]) < sum(train[:3])  # it learns
    ckpt = torch.load(straight / "ckpt_last.pt", weights_only=True)  # plain data only
    assert ckpt["step"] == 12 and json.loads((straight / "args.json").read_text())["epochs"] == 3
    test = [r for r in read_metrics(straight) if r["kind"] == "test"][-1]
    values = [float(v) for v in (straight / "test_nlpps.txt").read_text().split()]
    assert len(values) == 31 and sum(values) / 31 == pytest.approx(test["nlpps"], abs=1e-3)
    assert test["data"] == "custom data" and "custom data" in (straight / "log.txt").read_text()
    assert 0 < test["train_cpu_seconds"] < 1000 and 0 < test["train_seconds"] < 1000
    resumed = [r for r in read_metrics(split) if r["kind"] == "test"][-1]  # the clocks go on from the ckpt
    assert 900 < resumed["train_cpu_seconds"] < 1900 and 1000 < resumed["train_seconds"] < 2000


def test_resume_keeps_the_runs_epochs_unless_given_anew(finished, tmp_path):
    out_dir, run_dir = copy_run(finished["dlm100_rnn"], tmp_path)
    saved = json.loads((run_dir / "args.json").read_text())["epochs"]
    for more, epochs in (([], saved), (["--epochs", str(saved + 5)], saved + 5)):
        out = call_ok("dlm100_rnn", tiny_args("dlm100_rnn", finished.tiny_data, out_dir, "--resume",
                                              "--max-steps", str(4 * saved), *more))
        assert f"resumed at step {4 * saved} | {epochs} epochs |" in out
    assert json.loads((run_dir / "args.json").read_text())["epochs"] == saved + 5
    before = snapshot(run_dir)  # fewer epochs than the run has trained: refused, the folder untouched
    code, _, err = call("dlm100_rnn", tiny_args("dlm100_rnn", finished.tiny_data, out_dir, "--resume",
                                                "--epochs", "1"))
    assert_one_line_error(code, err, f"--epochs 1 ends before step {4 * saved}", f"--epochs {saved}")
    code, _, err = call("dlm100_rnn", tiny_args("dlm100_rnn", finished.tiny_data, out_dir, "--resume",
                                                "--max-steps", "3"))  # a stop the run is past: refused too
    assert_one_line_error(code, err, f"--max-steps 3 is before step {4 * saved}, where the run is")
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("script", SCRIPTS)
def test_eval_only_repeats_the_test_number_and_sample_only_prints_samples(script, finished, tmp_path):
    out_dir, run_dir = copy_run(finished[script], tmp_path)
    data_dir = json.loads((run_dir / "args.json").read_text())["data_dir"]
    test_line = [l for l in (run_dir / "log.txt").read_text().splitlines() if l.startswith("eval test")][-1]
    out = call_ok(script, TINY[script] + ["--eval-only", "--out-dir", str(out_dir), "--data-dir", data_dir])
    assert test_line.split("| nlpps")[1].rsplit("|", 1)[0] in out  # same number: same checkpoint, same noise
    before = snapshot(run_dir)
    out = call_ok(script, ["--sample-only", "--show-samples", "3", "--out-dir", str(out_dir),
                           "--data-dir", data_dir])
    assert sum(line.startswith("[SAMPLE]") for line in out.splitlines()) == 3
    assert "<bos>" not in out
    assert snapshot(run_dir) == before  # printed only: no samples.txt block, no figure, no log line
    evaluations = [(r["kind"], r["step"]) for r in read_metrics(run_dir) if r["kind"] != "train"]
    assert len(evaluations) == len(set(evaluations)) and evaluations[-1][0] == "test"  # replaced, not added
    if "iw_samples" in MODULES[script].RUN_FLAGS:  # an evaluation setting, not the model's
        out = call_ok(script, ["--eval-only", "--iw-samples", "2", "--out-dir", str(out_dir),
                               "--data-dir", data_dir])
        assert "eval test" in out


def test_a_non_finite_val_stops_before_anything_is_saved(tiny_data, tmp_path, monkeypatch):
    real_evaluate, calls = dlm100_rnn.evaluate, []

    def nan_at_the_second_epoch(model, x, cfg, device, full=True):
        nll, extra = real_evaluate(model, x, cfg, device, full)
        calls.append(full)
        return nll * (float("nan") if len(calls) == 2 else 1), extra

    run_dir = tmp_path / "dlm100_rnn" / "default"
    monkeypatch.setattr(dlm100_rnn, "evaluate", nan_at_the_second_epoch)
    code, _, err = call("dlm100_rnn", tiny_args("dlm100_rnn", tiny_data, tmp_path, "--epochs", "3"))
    assert_one_line_error(code, err, "non-finite val NLPPS at step 8", "stopped before saving")
    last = dlm100_rnn.load_checkpoint(run_dir / "ckpt_last.pt")
    assert last["step"] == 4 and math.isfinite(last["best_val"])  # the good one: --resume can go on
    assert all(math.isfinite(r["nlpps"]) for r in read_metrics(run_dir))  # (the NaN: in the log only)


def test_a_max_steps_stop_mid_epoch_never_becomes_the_best(tiny_data, tmp_path, monkeypatch):
    """A straight run has no val mid-epoch, so a --max-steps stop's val may not compete for the best (else a
    resumed run tests another model than the straight one); before the first epoch's end it stands in."""
    real_evaluate, vals = dlm100_rnn.evaluate, []

    def mid_epoch_val_looks_best(model, x, cfg, device, full=True):
        nll, extra = real_evaluate(model, x, cfg, device, full)
        vals.append(full)
        return nll * (0.5 if not full and len(vals) == 2 else 1), extra  # the run's 2nd val: at step 6

    run_dir = tmp_path / "dlm100_rnn" / "default"
    call_ok("dlm100_rnn", tiny_args("dlm100_rnn", tiny_data, tmp_path, "--epochs", "3", "--max-steps", "2"))
    best, last = (torch.load(run_dir / name, weights_only=True) for name in ("ckpt_best.pt", "ckpt_last.pt"))
    assert best["step"] == 2 and last["best_val"] == math.inf  # a stand-in, not a best
    monkeypatch.setattr(dlm100_rnn, "evaluate", mid_epoch_val_looks_best)
    call_ok("dlm100_rnn", tiny_args("dlm100_rnn", tiny_data, tmp_path, "--resume", "--max-steps", "6"))
    best, last = (torch.load(run_dir / name, weights_only=True) for name in ("ckpt_best.pt", "ckpt_last.pt"))
    val_at_4 = [r["nlpps"] for r in read_metrics(run_dir) if r["kind"] == "val" and r["step"] == 4]
    assert best["step"] == 4 and last["step"] == 6 and last["best_val"] == best["best_val"] == val_at_4[-1]


def test_resumed_records_equal_straight_ones_at_any_log_every_and_a_finished_run_has_one_test(tiny_data,
                                                                                               tmp_path):
    base = tiny_args("dlm100_rnn", tiny_data, tmp_path, "--epochs", "3", "--log-every", "5")
    call_ok("dlm100_rnn", base + ["--run-name", "straight"])
    call_ok("dlm100_rnn", base + ["--run-name", "split", "--max-steps", "7"])
    call_ok("dlm100_rnn", base + ["--run-name", "split", "--resume"])
    call_ok("dlm100_rnn", base + ["--run-name", "split", "--resume"])  # finished: re-scored, recorded once
    straight, split = (tmp_path / "dlm100_rnn" / name for name in ("straight", "split"))
    assert read_records(straight, "train") == read_records(split, "train")
    assert read_records(straight, "test") == read_records(split, "test")


def test_run_control_answers_in_one_line(finished, tiny_data, tmp_path, monkeypatch):
    out_dir, run_dir = copy_run(finished["dlm100_rnn"], tmp_path)
    data_dir = json.loads((run_dir / "args.json").read_text())["data_dir"]
    code, _, err = call("dlm100_rnn", ["--sample-only", "--show-samples", "0", "--out-dir", str(out_dir)])
    assert_one_line_error(code, err, "would print nothing")
    for mode in ("--eval-only", "--sample-only"):
        code, _, err = call("dlm100_rnn", [mode, "--dtype", "bfloat16", "--out-dir", str(out_dir)])
        assert_one_line_error(code, err, "--dtype and --compile change training only")
    (run_dir / "ckpt_best.pt").unlink()  # a run stopped before its first val: --resume, not --overwrite
    code, _, err = call("dlm100_rnn", ["--eval-only", "--out-dir", str(out_dir), "--data-dir", data_dir])
    assert_one_line_error(code, err, "none written yet, or deleted: --resume trains on to the next val")
    code, _, err = call("dlm100_rnn", ["--resume", "--out-dir", str(out_dir), "--data-dir", data_dir])
    assert_one_line_error(code, err, "no ckpt_best.pt to test (deleted?): --resume --epochs 3 trains on")
    (run_dir / "ckpt_best.pt").mkdir()
    code, _, err = call("dlm100_rnn", ["--eval-only", "--out-dir", str(out_dir), "--data-dir", data_dir])
    assert_one_line_error(code, err, "ckpt_best.pt (it is not a file)")
    (run_dir / "ckpt_best.pt").rmdir()
    (run_dir / "ckpt_last.pt").rename(run_dir / "last")  # --resume never skips a ckpt_last.pt it cannot read
    (run_dir / "ckpt_last.pt").mkdir()
    shutil.copy(run_dir / "last", run_dir / "ckpt_best.pt")  # (for another checkpoint to pass to)
    code, _, err = call("dlm100_rnn", ["--resume", "--out-dir", str(out_dir), "--data-dir", data_dir])
    assert_one_line_error(code, err, "ckpt_last.pt (it is not a file)")
    (run_dir / "ckpt_last.pt").rmdir()
    (run_dir / "last").rename(run_dir / "ckpt_last.pt")
    (run_dir / "sub").mkdir()  # --overwrite empties a folder that holds a folder too
    call_ok("dlm100_rnn", tiny_args("dlm100_rnn", tiny_data, out_dir, "--overwrite", "--max-steps", "1"))
    assert not (run_dir / "sub").exists()
    with open(run_dir / "metrics.jsonl", "a") as f:  # a torn last line: --eval-only's records stay whole
        f.write('{"kind": "test"}\n5\n{"kind": "val", "st')  # (and JSON that is not a record is dropped)
    call_ok("dlm100_rnn", ["--eval-only", "--out-dir", str(out_dir), "--data-dir", data_dir])
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert all("step" in json.loads(line) for line in lines) and json.loads(lines[-1])["kind"] == "test"

    def too_big(*args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 120000000000 bytes.\nmore")
    monkeypatch.setattr(dlm100_rnn, "build_model", too_big)
    code, _, err = call("dlm100_rnn", tiny_args("dlm100_rnn", tiny_data, tmp_path, "--run-name", "big"))
    assert_one_line_error(code, err, "out of memory", "120000000000 bytes")
    code, _, err = call("dlm107_vae_seg", ["--dtype", "bfloat16", "--run-name", "bf16"])
    assert_one_line_error(code, err, "--dtype bfloat16 is not supported by dlm107")


@pytest.mark.parametrize("script", SCRIPTS)
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(script, tiny_data, tmp_path, monkeypatch):
    module, calls = MODULES[script], {"n": 0}
    real_loss = module.Model.loss

    def loss_that_blows_up(self, x, *args, **kwargs):
        calls["n"] += 1 if self.training else 0
        out = real_loss(self, x, *args, **kwargs)
        return out * float("nan") if calls["n"] > 6 else out  # training step 7: inside epoch 2

    monkeypatch.setattr(module.Model, "loss", loss_that_blows_up)
    code, _, err = call(script, tiny_args(script, tiny_data, tmp_path, "--epochs", "3"))
    assert_one_line_error(code, err, "non-finite loss at step 7", "ckpt_last.pt")  # the 7th step's loss
    ckpt = module.load_checkpoint(tmp_path / script / "default" / "ckpt_last.pt")
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values()
                                     if v.is_floating_point())
    calls["n"] = 6  # a new run, NaN from its first step: before any checkpoint, so none is claimed
    code, _, err = call(script, tiny_args(script, tiny_data, tmp_path, "--run-name", "early"))
    assert_one_line_error(code, err, "non-finite loss at step 1", "(none yet)")
    monkeypatch.undo()  # a NaN val at the first epoch's end: no checkpoint is claimed either
    real_evaluate = module.evaluate

    def nan_val(*args, **kwargs):
        nll, extra = real_evaluate(*args, **kwargs)
        return nll * math.nan, extra

    monkeypatch.setattr(module, "evaluate", nan_val)
    code, _, err = call(script, tiny_args(script, tiny_data, tmp_path, "--run-name", "nan_val"))
    assert_one_line_error(code, err, "non-finite val NLPPS at step 4", "(none yet)")


BAD_CHECKPOINTS = {
    "empty": lambda path: path.write_bytes(b""),
    "random": lambda path: path.write_bytes(random.Random(0).randbytes(3000)),
    "truncated": lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
    "foreign": lambda path: dlm100_rnn.save_checkpoint({"script": "someone_else", "model": {}}, path),
}


@pytest.mark.parametrize("kind", BAD_CHECKPOINTS)
@pytest.mark.parametrize("script", SCRIPTS)
def test_a_bad_checkpoint_is_one_line_and_the_folder_is_untouched(script, kind, finished, tmp_path):
    out_dir, run_dir = copy_run(finished[script], tmp_path)
    for name in ("ckpt_last.pt", "ckpt_best.pt"):
        BAD_CHECKPOINTS[kind](run_dir / name)
    before = snapshot(run_dir)
    for mode in ("--resume", "--eval-only", "--sample-only"):
        code, _, err = call(script, [mode, "--out-dir", str(out_dir)])
        assert_one_line_error(code, err, "ckpt_")
        assert "weights_only" not in err  # never the unsafe advice to unpickle it
    assert snapshot(run_dir) == before


EDITED_CHECKPOINTS = [  # a real checkpoint with one value edited by hand: each is refused
    lambda state: state["args"].update(embed="16"),
    lambda state: state["args"].pop("batch_size"),
    lambda state: state["args"].update(lr=-1.0),
    lambda state: state.update(step=-4),
    lambda state: state.update(step=True),
    lambda state: state.update(train_seconds="1"),
    lambda state: state.update(train_losses=[math.nan]),
    lambda state: state.update(train_cpu_seconds=math.nan),
    lambda state: state.update(best_val=math.nan),
    lambda state: state.update(best_val=1e-9),  # plausible, and the same in both files: a stale best
    lambda state: state.update(best_val=math.inf),  # (a real run past an epoch's end has a finite one)
    lambda state: state.update(torch_rng=state["torch_rng"].float()),
    lambda state: state["vocab"].append(7),
    lambda state: state["data_sha256"].update({"test.en.gz": "x"}),
    lambda state: state["model"].update({k: v * math.nan for k, v in state["model"].items()
                                         if v.is_floating_point()}),
    lambda state: state["optimizer"]["state"][0]["exp_avg_sq"].mul_(-1),
    lambda state: state["optimizer"]["state"][0]["exp_avg"].view(-1)[0].add_(1e-6),  # one number, by 1e-6
    lambda state: state["optimizer"]["state"][0].pop("step"),
    lambda state: state["optimizer"]["state"].pop(1),  # a parameter's entry: it would train on afresh
    lambda state: state["optimizer"].update(state={}),
    lambda state: state.pop("content_sha256"),  # (as a checkpoint of an older version of the script)
    lambda state: (state.pop("run_id"), state.pop("content_sha256")),
]


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_checkpoint_edited_by_hand_is_refused(script, finished, tmp_path):
    """Whatever value is changed, and even in both checkpoints alike: the checkpoint's content no longer
    matches the SHA-256 it records."""
    out_dir, run_dir = copy_run(finished[script], tmp_path)
    data_dir = json.loads((run_dir / "args.json").read_text())["data_dir"]
    real = torch.load(run_dir / "ckpt_last.pt", weights_only=True)
    for edit in EDITED_CHECKPOINTS:
        state = copy.deepcopy(real)
        edit(state)
        for name in ("ckpt_last.pt", "ckpt_best.pt"):
            torch.save(state, run_dir / name)
        before = snapshot(run_dir)
        for mode in ("--resume", "--eval-only"):
            code, _, err = call(script, [mode, "--out-dir", str(out_dir), "--data-dir", data_dir])
            assert_one_line_error(code, err, *(
                [f"was written by an older version of {script} (it has no content_sha256 or run_id): use "
                 "the commit that wrote it, or train the run again"] if "content_sha256" not in state else
                ["ckpt_", f"is not as {script} wrote it (its content does not match the SHA-256 it "
                          "records)"]))
        assert snapshot(run_dir) == before


def test_a_checkpoint_of_another_run_is_refused_and_one_alone_is_read(finished, tmp_path):
    """A genuine checkpoint copied in from another run of the script (its own run_id) would put that run's
    number in this run's records: refused, whichever file it replaces. A checkpoint alone in a folder (a
    colleague's, with no args.json) is read; so is one whose keys were saved in another order."""
    out_dir, run_dir = copy_run(finished["dlm100_rnn"], tmp_path)
    data_dir = json.loads((run_dir / "args.json").read_text())["data_dir"]
    real = {name: torch.load(run_dir / name, weights_only=True) for name in ("ckpt_last.pt", "ckpt_best.pt")}
    modes = [["--eval-only"], ["--sample-only"], ["--resume", "--epochs", "3"]]
    for copied in (["ckpt_best.pt"], ["ckpt_last.pt"], ["ckpt_last.pt", "ckpt_best.pt"]):
        for name in copied:  # (another run: another run_id, its own content_sha256)
            dlm100_rnn.save_checkpoint(real[name] | {"run_id": "another run"}, run_dir / name)
        before = snapshot(run_dir)
        for mode in modes:
            code, _, err = call("dlm100_rnn", mode + ["--out-dir", str(out_dir), "--data-dir", data_dir])
            assert_one_line_error(code, err, "are of different runs (run_id: ", "another run in "
                                  + copied[0], "): copied in, or edited? Put back this run's own, or read "
                                  "another run's checkpoint alone, in a new --run-name")
        assert snapshot(run_dir) == before
        for name in copied:
            shutil.copy(finished["dlm100_rnn"] / name, run_dir / name)
    older_best = real["ckpt_best.pt"] | {"step": 4, "best_val": real["ckpt_best.pt"]["best_val"] + 1}
    dlm100_rnn.save_checkpoint(older_best, run_dir / "ckpt_best.pt")  # of this run, but put back
    before = snapshot(run_dir)
    for mode in modes:
        code, _, err = call("dlm100_rnn", mode + ["--out-dir", str(out_dir), "--data-dir", data_dir])
        assert_one_line_error(code, err, "disagree about the best val NLPPS", "an older ckpt_best.pt put "
                                                                               "back? Put back the newest")
    assert snapshot(run_dir) == before
    shutil.copy(finished["dlm100_rnn"] / "ckpt_best.pt", run_dir / "ckpt_best.pt")
    (run_dir / "args.json").write_text('{"run_id": ')  # torn by hand: the check is not skipped
    for mode in modes:
        code, _, err = call("dlm100_rnn", mode + ["--out-dir", str(out_dir), "--data-dir", data_dir])
        assert_one_line_error(code, err, "args.json names no run_id (edited?): delete it (metrics.jsonl and "
                                         "the checkpoints name the run too)")
    (run_dir / "args.json").unlink()  # as that says; then another run's checkpoints: its records name the run
    for name in ("ckpt_last.pt", "ckpt_best.pt"):
        dlm100_rnn.save_checkpoint(real[name] | {"run_id": "another run"}, run_dir / name)
    before = snapshot(run_dir)
    for mode in modes:
        code, _, err = call("dlm100_rnn", mode + ["--out-dir", str(out_dir), "--data-dir", data_dir])
        assert_one_line_error(code, err, "another run in ckpt_last.pt, another run in ckpt_best.pt, "
                                         f"{real['ckpt_last.pt']['run_id']} in metrics.jsonl")
    assert snapshot(run_dir) == before
    for name in ("ckpt_last.pt", "ckpt_best.pt"):  # the run's own, with no args.json: read
        shutil.copy(finished["dlm100_rnn"] / name, run_dir / name)
    call_ok("dlm100_rnn", ["--eval-only", "--out-dir", str(out_dir), "--data-dir", data_dir])
    own_records = (run_dir / "metrics.jsonl").read_text()
    with open(run_dir / "metrics.jsonl", "a") as f:  # another run's records pasted in, before or after
        f.write(own_records.replace(real["ckpt_last.pt"]["run_id"], "another run"))
    code, _, err = call("dlm100_rnn", ["--eval-only", "--out-dir", str(out_dir), "--data-dir", data_dir])
    both = " and ".join(sorted(["another run", real["ckpt_last.pt"]["run_id"]]))
    assert_one_line_error(code, err, f"{both} in metrics.jsonl")
    alone = tmp_path / "shared" / "dlm100_rnn" / "default"
    alone.mkdir(parents=True)
    torch.save(dict(reversed(real["ckpt_best.pt"].items())), alone / "ckpt_best.pt")  # keys in another order
    out = call_ok("dlm100_rnn", ["--eval-only", "--out-dir", str(tmp_path / "shared"),
                                 "--data-dir", data_dir])
    test = [r for r in read_metrics(run_dir) if r["kind"] == "test"][-1]
    assert f"nlpps {test['nlpps']:.2f} |" in out  # the run's own number


def test_an_interrupted_eval_only_keeps_the_runs_records_and_bytes_that_are_not_utf8_are_no_record(
        finished, tmp_path, monkeypatch):
    out_dir, run_dir = copy_run(finished["dlm100_rnn"], tmp_path)
    data_dir = json.loads((run_dir / "args.json").read_text())["data_dir"]
    with open(run_dir / "metrics.jsonl", "ab") as f:
        f.write(b"\xff\xfe\x80 not UTF-8\n")
    before, real = read_metrics(run_dir), dlm100_rnn.evaluate_split

    def interrupted_at_test(model, splits, split, *args):
        if split == "test":
            raise KeyboardInterrupt
        return real(model, splits, split, *args)

    monkeypatch.setattr(dlm100_rnn, "evaluate_split", interrupted_at_test)
    code, _, err = call("dlm100_rnn", ["--eval-only", "--out-dir", str(out_dir), "--data-dir", data_dir])
    assert code != 0 and "interrupted" in err
    assert read_metrics(run_dir) == before  # the run's records, no more, no less


def test_a_signal_during_the_final_test_stops_at_once(tiny_data, tmp_path, monkeypatch):
    real = dlm100_rnn.evaluate_split

    def ctrl_c_at_test(model, splits, split, *args):
        if split == "test":
            os.kill(os.getpid(), signal.SIGINT)
        return real(model, splits, split, *args)

    monkeypatch.setattr(dlm100_rnn, "evaluate_split", ctrl_c_at_test)
    code, _, err = call("dlm100_rnn", tiny_args("dlm100_rnn", tiny_data, tmp_path, "--epochs", "1"))
    assert_one_line_error(code, err, "interrupted: stopped at once, saving nothing more")
    run_dir = tmp_path / "dlm100_rnn" / "default"
    assert dlm100_rnn.load_checkpoint(run_dir / "ckpt_best.pt")["step"] == 4
    assert not [r for r in read_metrics(run_dir) if r["kind"] == "test"]


def test_a_failed_write_names_the_file(finished, tmp_path):
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full (a device whose every write fails as on a full disk)")
    out_dir, run_dir = copy_run(finished["dlm100_rnn"], tmp_path)
    data_dir = json.loads((run_dir / "args.json").read_text())["data_dir"]
    (run_dir / "log.txt").unlink()
    (run_dir / "log.txt").symlink_to("/dev/full")
    code, _, err = call("dlm100_rnn", ["--eval-only", "--out-dir", str(out_dir), "--data-dir", data_dir])
    assert_one_line_error(code, err, f"could not write {run_dir / 'log.txt'}: No space left on device")
    with pytest.raises(dlm100_rnn.RunError, match="could not write .*gone/curves.png: No such file"):
        dlm100_rnn.save_figure(dlm100_rnn.plt.figure(), tmp_path / "gone" / "curves.png")  # and the others
    dlm100_rnn.save_figure(dlm100_rnn.plt.figure(figsize=(2, 1)), tmp_path / "curves.png")
    assert dlm100_rnn.plt.imread(tmp_path / "curves.png").shape[:2] == (100, 200)  # a PNG, at dpi 100


def test_a_resume_without_metrics_jsonl_says_what_is_lost_and_one_that_cannot_be_replaced_is_named(
        finished, tmp_path):
    out_dir, run_dir = copy_run(finished["dlm100_rnn"], tmp_path)
    data_dir = json.loads((run_dir / "args.json").read_text())["data_dir"]
    (run_dir / "metrics.jsonl").unlink()
    out = call_ok("dlm100_rnn", ["--resume", "--epochs", "3", "--log-every", "1", "--out-dir", str(out_dir),
                                 "--data-dir", data_dir])
    assert "note: no metrics.jsonl" in out and "the records up to step 8 are lost" in out
    assert min(r["step"] for r in read_metrics(run_dir)) == 9
    (run_dir / "metrics.jsonl").unlink()
    (run_dir / "metrics.jsonl").mkdir()
    code, _, err = call("dlm100_rnn", ["--eval-only", "--out-dir", str(out_dir), "--data-dir", data_dir])
    assert_one_line_error(code, err, f"could not write {run_dir / 'metrics.jsonl'}: Is a directory")
    assert not (run_dir / "metrics.jsonl.tmp").exists()


def test_a_run_name_in_another_script_draws_its_curves_without_warnings(tmp_path):
    code = ("import pathlib, dlm100_rnn as m; fig = m.plt.figure(); fig.suptitle('\u65e5\u672c'); "
            "fig.tight_layout(); m.save_figure(fig, pathlib.Path('curves.png'))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": str(HERE)}, timeout=120)
    assert done.returncode == 0 and "Glyph" not in done.stderr, done.stderr
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_a_run_whose_ckpt_best_was_deleted_trains_on_to_a_new_one_and_notes_a_changed_dtype(
        finished, tmp_path):
    out_dir, run_dir = copy_run(finished["dlm100_rnn"], tmp_path)
    data_dir = json.loads((run_dir / "args.json").read_text())["data_dir"]
    (run_dir / "ckpt_best.pt").unlink()
    out = call_ok("dlm100_rnn", ["--resume", "--epochs", "3", "--dtype", "bfloat16", "--out-dir",
                                 str(out_dir), "--data-dir", data_dir])
    assert "note: --dtype bfloat16, where the run had --dtype float32" in out
    assert dlm100_rnn.load_checkpoint(run_dir / "ckpt_best.pt")["step"] == 12  # whatever its val
    assert [r["step"] for r in read_metrics(run_dir) if r["kind"] == "test"] == [12]


def test_a_test_record_is_written_after_its_file_and_an_epochs_samples_even_at_a_stop(
        finished, tiny_data, tmp_path, monkeypatch):
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full (a device whose every write fails as on a full disk)")
    out_dir, run_dir = copy_run(finished["dlm100_rnn"], tmp_path)
    data_dir = json.loads((run_dir / "args.json").read_text())["data_dir"]
    (run_dir / "test_nlpps.txt.tmp").symlink_to("/dev/full")
    code, _, err = call("dlm100_rnn", ["--resume", "--epochs", "3", "--out-dir", str(out_dir),
                                       "--data-dir", data_dir])
    assert_one_line_error(code, err, "could not write", "test_nlpps.txt: No space left on device")
    assert [r["step"] for r in read_metrics(run_dir) if r["kind"] == "test"] == []  # not step 12's
    real_lr_at = dlm100_rnn.lr_at

    def ctrl_c_in_an_epochs_last_step(step, *args):
        if step == 3:  # (the 4th step of 4)
            os.kill(os.getpid(), signal.SIGINT)
        return real_lr_at(step, *args)

    monkeypatch.setattr(dlm100_rnn, "lr_at", ctrl_c_in_an_epochs_last_step)
    code, _, err = call("dlm100_rnn", tiny_args("dlm100_rnn", tiny_data, tmp_path, "--run-name", "stopped"))
    assert_one_line_error(code, err, "interrupted at step 4")
    samples = (tmp_path / "dlm100_rnn" / "stopped" / "samples.txt").read_text()
    assert "# step 4 (epoch 1), temperature 1.0" in samples


def bad_data(kind, tiny_data, folder):
    """A data folder with one bad test file; returns (folder, extra flags)."""
    folder.mkdir()
    for name in data.FILES.values():
        shutil.copy(tiny_data / name, folder / name)
    test = folder / data.FILES["test"]
    if kind == "edited":  # the real files with one caption changed: a checksum mismatch
        for name in data.FILES.values():
            shutil.copy(REAL_DATA / name, folder / name)
        lines = data.read_captions(test)
        write_split(folder, test.name, ["A dog."] + lines[1:])
        return folder, []
    if kind == "cut":  # the real files, the test split cut to 500 lines
        for name in data.FILES.values():
            shutil.copy(REAL_DATA / name, folder / name)
        write_split(folder, test.name, data.read_captions(test)[:500])
        return folder, []
    if kind == "truncated":
        test.write_bytes(test.read_bytes()[:-20])
    elif kind == "not gzip":
        test.write_text("A man.\nA dog.\n")
    elif kind == "empty":
        write_split(folder, test.name, [])
    elif kind == "not utf-8":
        with gzip.open(test, "wb") as f:
            f.write(b"A caf\xe9 in Paris.\n")
    return folder, ["--custom-data"]


DATA_ERRORS = {"edited": "SHA-256", "cut": "SHA-256", "truncated": "truncated", "not gzip": "not a gzip file",
               "empty": "holds no captions", "not utf-8": "not UTF-8"}


@pytest.mark.parametrize("kind", DATA_ERRORS)
@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_data_is_one_line_naming_the_file_before_any_training(script, kind, finished, tiny_data,
                                                                  tmp_path):
    if kind in ("edited", "cut") and not HAVE_REAL_DATA:
        pytest.skip("needs the real Multi30k files")
    folder, flags = bad_data(kind, tiny_data, tmp_path / "data")
    out_dir, run_dir = copy_run(finished[script], tmp_path)
    before = snapshot(run_dir)
    for args in (["--eval-only"], ["--run-name", "new"]):  # an existing run, and a new one
        code, _, err = call(script, TINY[script] + args
                            + ["--data-dir", str(folder), "--out-dir", str(out_dir)] + flags)
        assert_one_line_error(code, err, DATA_ERRORS[kind], "test_2016_flickr.en.gz")
    assert snapshot(run_dir) == before
    assert not (out_dir / script / "new" / "ckpt_last.pt").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_finished_run_is_never_mixed_with_a_new_one(script, finished, tiny_data, tmp_path):
    out_dir, run_dir = copy_run(finished[script], tmp_path)
    before = snapshot(run_dir)
    code, _, err = call(script, tiny_args(script, tiny_data, out_dir, "--max-steps", "1"))
    assert_one_line_error(code, err, "holds a run: add --resume", "--resume", "--overwrite")
    code, _, err = call(script, tiny_args(script, tiny_data, out_dir, "--eval-only", "--embed", "64"))
    assert_one_line_error(code, err, "--embed 64 contradicts the checkpoint")
    for bad in (["--run-name", "../../escape"], ["--run-name", " "], ["--run-name", "a "],
                ["--run-name", "a\nb"], ["--lr", "nan"], ["--temperature", "1e-45"], ["--seed", "-1"]):
        assert_one_line_error(*call(script, tiny_args(script, tiny_data, out_dir, *bad))[::2])
    assert snapshot(run_dir) == before and not (tmp_path / "escape").exists()
    # --overwrite starts afresh: only the new run's records remain
    call_ok(script, tiny_args(script, tiny_data, out_dir, "--max-steps", "1", "--overwrite"))
    assert [r["step"] for r in read_metrics(run_dir) if r["kind"] == "train"] == [1]


def test_unwritable_out_dir_is_one_line(tiny_data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, _, err = call("dlm100_rnn", tiny_args("dlm100_rnn", tiny_data, blocker))
    assert_one_line_error(code, err, "cannot use the run folder")


def start_training(script, tiny_data, out_dir, *more):
    """A real training process, stopped by nothing but a signal; returns it once it has logged a step."""
    args = tiny_args(script, tiny_data, out_dir, "--epochs", "1000", *more)
    proc = subprocess.Popen([sys.executable, str(HERE / f"{script}.py"), *args], cwd=HERE, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:
        if line.startswith("step "):
            return proc
    raise AssertionError(proc.stderr.read())


@pytest.mark.parametrize("script", SCRIPTS)
def test_ctrl_c_saves_a_checkpoint_says_so_in_one_line_and_resume_continues(script, tiny_data, tmp_path):
    proc = start_training(script, tiny_data, tmp_path)
    second = subprocess.run([sys.executable, str(HERE / f"{script}.py"),
                             *tiny_args(script, tiny_data, tmp_path, "--resume")],
                            capture_output=True, text=True, cwd=HERE)  # the same run name, while it trains
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert second.returncode != 0 and "Traceback" not in second.stderr
    assert_one_line_error(proc.returncode, err, "interrupted at step", "--resume")
    step = int(err.split("interrupted at step ")[1].split(":")[0])
    run_dir = tmp_path / script / "default"
    assert MODULES[script].load_checkpoint(run_dir / "ckpt_last.pt")["step"] == step
    call_ok(script, tiny_args(script, tiny_data, tmp_path, "--resume", "--max-steps", str(step + 1)))
    assert max(r["step"] for r in read_metrics(run_dir)) == step + 1


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_run_folder_is_held_by_one_process_and_freed_when_it_dies(script, finished, tiny_data, tmp_path):
    out_dir, run_dir = copy_run(finished[script], tmp_path)
    data_dir = json.loads((run_dir / "args.json").read_text())["data_dir"]
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(run_dir / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(run_dir)
        for args in (tiny_args(script, tiny_data, out_dir, "--resume"),
                     tiny_args(script, tiny_data, out_dir, "--overwrite", "--max-steps", "1"),
                     ["--eval-only", "--out-dir", str(out_dir), "--data-dir", data_dir]):
            code, _, err = call(script, args)
            assert_one_line_error(code, err, "in use by another process")
        out = call_ok(script, ["--sample-only", "--out-dir", str(out_dir), "--data-dir", data_dir])
        assert "[SAMPLE]" in out  # it writes nothing: it may run beside the process that holds the folder
        assert snapshot(run_dir) == before
    finally:
        holder.kill()
        holder.wait()
    # the OS released the dead process's lock: nothing stale to clean up
    call_ok(script, ["--sample-only", "--out-dir", str(out_dir), "--data-dir", data_dir])


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_refuses_other_data_than_the_run_was_trained_on(script, finished, tiny_data, tmp_path):
    out_dir, run_dir = copy_run(finished[script], tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    for name in data.FILES.values():
        shutil.copy(tiny_data / name, other / name)
    write_split(other, "val.en.gz", make_captions(30, 99))
    before = snapshot(run_dir)
    for more in (["--data-dir", str(other)], ["--data-dir", str(other), "--custom-data"]):
        code, _, err = call(script, ["--resume", "--out-dir", str(out_dir), *more])
        assert_one_line_error(code, err, "val.en.gz differs from the data", "--data-dir")
    if HAVE_REAL_DATA:  # the published files, which a run on custom data was not trained on
        code, _, err = call(script, ["--resume", "--out-dir", str(out_dir), "--data-dir", str(REAL_DATA)])
        assert_one_line_error(code, err, "differs from the data")
    assert snapshot(run_dir) == before
    state = torch.load(run_dir / "ckpt_last.pt", weights_only=True)
    MODULES[script].save_checkpoint(state | {"vocab": state["vocab"][::-1]}, run_dir / "ckpt_last.pt")
    code, _, err = call(script, ["--resume", "--out-dir", str(out_dir), "--data-dir", str(tiny_data),
                                 "--custom-data"])  # the run's data, but not the vocabulary data.py builds
    assert_one_line_error(code, err, "the data files are the run's, but data.py builds another vocabulary")
    (tmp_path / "plain").mkdir()
    plain = plain_text_folder(tmp_path / "plain", TRAIN, VALID, TEST)
    code, _, err = call(script, ["--eval-only", "--out-dir", str(out_dir), "--data-dir", str(plain)])
    assert_one_line_error(code, err, "was trained on test_2016_flickr.en.gz, train.en.gz, val.en.gz, not on "
                                     "test.txt, train.txt, valid.txt: pass the --data-dir it used")


def test_a_run_stopped_before_its_first_checkpoint_is_started_afresh_with_overwrite(tiny_data, tmp_path):
    run_dir = tmp_path / "dlm100_rnn" / "default"
    run_dir.mkdir(parents=True)
    # what a kill -9 before the first save leaves
    (run_dir / "log.txt").write_text("dlm100_rnn | new run | ...\n")
    code, _, err = call("dlm100_rnn", tiny_args("dlm100_rnn", tiny_data, tmp_path, "--max-steps", "1"))
    assert_one_line_error(code, err, "before its first checkpoint", "--overwrite")
    code, _, err = call("dlm100_rnn", tiny_args("dlm100_rnn", tiny_data, tmp_path, "--resume"))
    assert_one_line_error(code, err, "no checkpoint at", "--overwrite")
    call_ok("dlm100_rnn", tiny_args("dlm100_rnn", tiny_data, tmp_path, "--overwrite", "--max-steps", "1"))
    assert dlm100_rnn.load_checkpoint(run_dir / "ckpt_last.pt")["step"] == 1


def test_a_ctrl_c_while_python_shuts_down_is_ignored(monkeypatch):
    """After the one-line message, torch's exit handlers still run: a Ctrl-C then is ignored, neither a
    traceback from an atexit callback nor an end before the message is printed."""
    def interrupted(argv):
        raise KeyboardInterrupt("interrupted at step 3: saved ckpt_last.pt")

    monkeypatch.setattr(dlm100_rnn, "run", interrupted)
    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit, match="dlm100_rnn: interrupted at step 3"):
            dlm100_rnn.main([])
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_signal_stops_sample_only_at_once_and_offers_no_resume(finished, tmp_path):
    out_dir, run_dir = copy_run(finished["dlm100_rnn"], tmp_path)
    data_dir = json.loads((run_dir / "args.json").read_text())["data_dir"]
    for signum in (signal.SIGTERM, signal.SIGINT):
        proc = subprocess.Popen([sys.executable, str(HERE / "dlm100_rnn.py"), "--sample-only",
                                 "--show-samples", "300000", "--out-dir", str(out_dir),
                                 "--data-dir", data_dir],
                                cwd=HERE, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(5)  # past start-up, into the sampling loop
        proc.send_signal(signum)
        start = time.time()
        _, err = proc.communicate(timeout=30)
        assert (time.time() - start < 5 and proc.returncode == 1 and "--resume" not in err
                and "dlm100_rnn: interrupted" in err and "Traceback" not in err), (signum, err)


@pytest.mark.parametrize("script, bad", [
    ("dlm142_diffusion", ["--param", "x0", "--noise", "uniform"]),
    ("dlm142_diffusion", ["--kernel", "4"]),
    ("dlm107_vae_seg", ["--compile"]),
    ("dlm123_gmmvae", ["--estimator", "reinforce", "--train-samples", "1"]),
])
def test_a_refused_flag_combination_leaves_no_run_folder(script, bad, tiny_data, tmp_path):
    code, _, err = call(script, tiny_args(script, tiny_data, tmp_path, *bad))
    assert_one_line_error(code, err, " ".join(bad[:2]) if bad[0] != "--compile" else "--compile")
    assert not (tmp_path / script).exists()


# The strings each model spreads its probability over (by default every string of ids): a distribution that
# does not sum to one there is the first bug of a copied model.
SUPPORT = {"dlm107_vae_seg": "captions", "dlm142_diffusion": "no <bos>"}


def support_of(script, vocab_size, slots):
    strings = torch.tensor(list(itertools.product(range(vocab_size), repeat=slots)))
    if SUPPORT.get(script) == "captions":  # characters, then <pad> to the end
        strings = strings[(data.num_chars(strings) < slots) & (strings != data.BOS).all(1)]
        strings = strings[(strings[:, :-1] == data.PAD).le(strings[:, 1:] == data.PAD).all(1)]
    elif SUPPORT.get(script) == "no <bos>":
        strings = strings[(strings != data.BOS).all(1)]
    return strings


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_scores_a_distribution_that_sums_to_one_or_a_bound_below_it(script):
    """The script's own evaluate on every string of 4 slots over 2 characters (and <pad>, <bos>, <unk>):
    sum exp(-number) = 1 for an exact model; <= 1 for a bound, within the Monte-Carlo error of its
    estimate."""
    module, vocab = MODULES[script], data.Vocab(["a", "b"])
    cfg, _ = common.parse_flags(module.Config, "", TINY[script] + ["--eval-batch-size", "50"])
    if "iw_samples" in module.RUN_FLAGS:
        cfg = dataclasses.replace(cfg, iw_samples=100)  # importance weights: p(x) estimated unbiasedly
    x = support_of(script, len(vocab), 4)
    torch.manual_seed(0)
    model = module.build_model(vocab, x, cfg)
    with torch.no_grad():  # far from the initial near-uniform distributions, so the sum is a real check
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    nll, extra = module.evaluate(model, x, cfg, CPU)
    total = torch.exp(-nll.double()).sum().item()
    if extra["bound"] == "exact":
        assert total == pytest.approx(1.0, abs=1e-4)
    else:
        assert 0 < total <= 1.03, total  # (1.03: the Monte-Carlo error of an estimated bound)


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_test_number_does_not_depend_on_the_eval_batch_size(script, finished, tmp_path):
    out_dir, run_dir = copy_run(finished[script], tmp_path)
    data_dir = json.loads((run_dir / "args.json").read_text())["data_dir"]
    numbers, printed = [], []
    for size in ("64", "7"):
        out = call_ok(script, ["--eval-only", "--eval-batch-size", size, "--out-dir", str(out_dir),
                               "--data-dir", data_dir])
        numbers += [r["nlpps"] for r in read_metrics(run_dir) if r["kind"] == "test"]  # (one: replaced)
        printed += re.findall(r"eval test .*\| nlpps (\S+)", out)
    # each caption's noise is its own: the same number is printed, and the records differ by float rounding
    # at most (a CPU's matrix kernels may round a batch of 7 otherwise than one of 64; the noise of a batch
    # moved them by 0.04 to 0.3 nats)
    assert len(printed) == 2 and printed[0] == printed[1]
    assert len(numbers) == 2 and math.isclose(numbers[0], numbers[1], rel_tol=1e-7)


class Killed(BaseException):
    """kill -9, as far as the run can tell: nothing of it runs after."""


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_run_killed_between_its_two_checkpoint_writes_resumes_to_the_straight_runs_test(
        script, tiny_data, tmp_path, monkeypatch):
    """Killed after the first of the two checkpoints written at a step (ckpt_best.pt, when that step is the
    best): at the first epoch's end, before any ckpt_last.pt, and at the last step. --resume continues from
    the newer checkpoint, so the test scores the model the straight run scores."""
    module = MODULES[script]
    call_ok(script, tiny_args(script, tiny_data, tmp_path, "--epochs", "2", "--run-name", "straight"))
    real_save = module.save_checkpoint
    for kill_step, writes in ((4, 1), (8, 1), (8, 0)):  # (and before any write: the samples are written)
        def save_then_die(state, path):
            if state["step"] == kill_step and not writes:
                raise Killed
            real_save(state, path)
            if state["step"] == kill_step:
                raise Killed

        monkeypatch.setattr(module, "save_checkpoint", save_then_die)
        run_name = f"killed_at_{kill_step}_after_{writes}"
        with pytest.raises(Killed), contextlib.redirect_stdout(io.StringIO()):
            module.main(tiny_args(script, tiny_data, tmp_path, "--epochs", "2", "--run-name", run_name))
        monkeypatch.undo()
        assert (tmp_path / script / run_name / "ckpt_last.pt").exists() == (kill_step == 8)
        out = call_ok(script, tiny_args(script, tiny_data, tmp_path, "--run-name", run_name, "--resume"))
        assert f"resumed at step {kill_step if writes else 4} |" in out
        straight, killed = (tmp_path / script / name for name in ("straight", run_name))
        assert read_records(killed, "test") == read_records(straight, "test")
        assert (killed / "samples.txt").read_text() == (straight / "samples.txt").read_text()  # each once


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_script_runs_with_only_data_py_and_common_py_beside_it(script, tiny_data, tmp_path):
    for name in (f"{script}.py", "data.py", "common.py"):
        shutil.copy(HERE / name, tmp_path / name)
    proc = subprocess.run([sys.executable, f"{script}.py",
                           *tiny_args(script, tiny_data, "out", "--max-steps", "2")],
                          cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "eval test" in proc.stdout and (tmp_path / "out" / script / "default" / "ckpt_best.pt").exists()


# ============================================================================= dlm100_rnn.py
@pytest.mark.parametrize("head", ["mos", "softmax"])
def test_dlm100_probabilities_of_all_sequences_sum_to_one(head):
    torch.manual_seed(0)
    cfg = dlm100_rnn.Config(embed=8, components=5, head=head)
    model = dlm100_rnn.Model(3, cfg).double()
    x = torch.tensor(list(itertools.product(range(3), repeat=3)))  # all 27 sequences of 3 slots
    assert torch.exp(-model.loss(x)).sum().item() == pytest.approx(1.0, abs=1e-5)
    # the sampler's one-step distribution is the one the loss scores
    y, _ = model.features(torch.tensor([[1, 2]]))
    torch.testing.assert_close(model.all_log_probs(y).gather(-1, torch.tensor([[[0], [1]]])).squeeze(-1),
                               model.log_probs_of(y, torch.tensor([[0, 1]])))


def test_dlm100_sampler_draws_captions_with_the_probabilities_the_loss_gives():
    """Empirical frequencies of the first two symbols of 4000 samples against the exact p(x_1, x_2) of a tiny
    model: every cell within 4 standard errors (a sampler off by a shifted step or a wrong temperature
    fails)."""
    torch.manual_seed(0)
    model = dlm100_rnn.Model(4, dlm100_rnn.Config(embed=8, components=4))
    with torch.no_grad():
        model.embed.weight.mul_(2)
    x, extra = dlm100_rnn.sample(model, 4000, dlm100_rnn.Config(), CPU, torch.Generator().manual_seed(0))
    assert extra == {}
    assert x.shape == (4000, data.SLOTS)
    for row in x[:200]:  # once PAD is drawn the rest is PAD
        assert (row[data.num_chars(row[None])[0]:] == data.PAD).all()
    pairs = torch.tensor(list(itertools.product(range(4), repeat=2)))  # (16, 2)
    with torch.no_grad():  # p(x_1, x_2) with BOS ruled out at every step, as the sampler draws
        inputs = torch.cat([torch.full((16, 1), data.BOS), pairs[:, :1]], 1)
        log_p = data.emittable(model.all_log_probs(model.features(inputs)[0]))  # (16, 2, V)
        exact = (log_p[:, 0].gather(1, pairs[:, :1]) + log_p[:, 1].gather(1, pairs[:, 1:])).squeeze(1).exp()
        exact[pairs[:, 0] == data.PAD] = 0  # after PAD the sampler writes PAD, at no cost
        exact[0] = log_p[0, 0, data.PAD].exp()
    assert (x != data.BOS).all()
    counts = torch.tensor([((x[:, 0] == a) & (x[:, 1] == b)).sum().item() for a, b in pairs.tolist()]) / 4000
    assert exact.sum().item() == pytest.approx(1.0, abs=1e-5)
    se = (exact * (1 - exact) / 4000).sqrt()
    assert ((counts - exact).abs() <= 4 * se + 1e-3).all(), (counts, exact)


def test_dlm100_loss_falls_on_a_tiny_set(tiny_data):
    _, splits, _, _ = data.load(str(tiny_data), custom=True)
    torch.manual_seed(0)
    model = dlm100_rnn.Model(40, dlm100_rnn.Config(embed=32, components=16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = splits["train"][:32]
    first = model.loss(x).mean().item()
    for _ in range(30):
        loss = model.loss(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_dlm100_dropout_is_off_at_zero_and_in_evaluation_and_the_same_model_else():
    x = torch.randint(3, 30, (4, data.SLOTS))
    torch.manual_seed(0)
    plain = dlm100_rnn.Model(30, dlm100_rnn.Config(embed=16, components=4))
    torch.manual_seed(0)
    dropped = dlm100_rnn.Model(30, dlm100_rnn.Config(embed=16, components=4, dropout=0.5))
    # the same weights: a checkpoint fits both
    assert plain.state_dict().keys() == dropped.state_dict().keys()
    torch.manual_seed(1)
    before = torch.rand(1)
    torch.manual_seed(1)
    reference = plain.loss(x)
    assert torch.equal(torch.rand(1), before)  # p = 0 draws no noise: the model as without the flag
    assert not torch.equal(dropped.loss(x), reference)  # training: features dropped
    nll, _ = dlm100_rnn.evaluate(dropped, x, dlm100_rnn.Config(), CPU)
    torch.testing.assert_close(nll, reference.detach())  # evaluation: off, the model scored exactly


# ============================================================================= dlm107_vae_seg.py
# A tiny model in float64: the characters UNK, 3 and 4 (SEG_CHARS; 3 plays the space, SEG_SPACE), captions of
# at most 4 characters (SEG_SLOTS = 5 slots, not data.SLOTS), pieces of at most SEG_K = 3 characters, a
# 4-entry lexicon: every caption and segmentation is enumerable.


def seg_records(run_dir, kind):
    return [r for r in read_metrics(run_dir) if r["kind"] == kind]


SEG_SPACE, SEG_CHARS, SEG_SLOTS, SEG_K = 3, (data.UNK, 3, 4), 5, 3
ITOS = data.SPECIALS + [" ", "b"]  # the 5 symbols: 3 is the space
LEXICON = [(4, 4), (3, 4), (4, 3, 4), (2, 4, 4)]


def tiny_seg(lexicon=True, **kw):
    """The tiny model with its memory (key width 4); kw: Config fields (lex_factor, piece_context, ...). The
    expected-length regulariser is off unless asked for, so that the training loss is -log p(x)."""
    torch.manual_seed(0)
    cfg = dlm107_vae_seg.Config(embed=8, piece_embed=5, max_piece=SEG_K, lex_min=2, lex_max=3, lex_key=4,
                                **({"length_penalty": 0.0} | kw))
    lex = torch.tensor([list(e) + [data.PAD] * (3 - len(e)) for e in LEXICON] if lexicon else [],
                       dtype=torch.long)
    model = dlm107_vae_seg.Model(ITOS, lex.view(-1, 3), cfg).double()
    with torch.no_grad():  # sharper distributions than the initial ones, so the checks are not near-uniform
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.7)
    return model


MEMORIES = [dict(lex_factor=True), dict(lex_factor=False), dict(lex_factor=True, piece_context=True),
            dict(lex_factor=False, piece_context=True)]


def seg_caption(chars, slots=SEG_SLOTS):
    return torch.tensor([list(chars) + [data.PAD] * (slots - len(chars))])


def all_captions(slots=SEG_SLOTS):
    return [c for n in range(slots) for c in itertools.product(SEG_CHARS, repeat=n)]


def segmentations(n, slots=SEG_SLOTS, max_piece=SEG_K):
    """Every segmentation of n characters into pieces of 1..max_piece: (Z, slots) bool, a cut after
    character t."""
    out = []
    for inner in itertools.product([False, True], repeat=max(n - 1, 0)):
        z = list(inner) + [True] * (n > 0)
        ends = [t for t, c in enumerate(z) if c]
        if all(b - a <= max_piece for a, b in zip([-1] + ends, ends)):
            out.append(z + [False] * (slots - n))
    return torch.tensor(out).view(-1, slots)


def enumerated_log_joint(scores, closing, n, z):
    """log p(x, z) summed piece by piece from the (start, length) scores, independently of
    dlm107_vae_seg.log_joint."""
    total, start = closing[0, n].item(), 0
    for t in range(n):
        if z[t]:
            total += scores[0, start, t - start].item()
            start = t + 1
    return total


# ----------------------------------------------------------------------------- reinforce
def exact_elbo_terms(model, x):
    Z = segmentations(int(data.num_chars(x)), x.shape[1])
    scores, closing = model.piece_scores(x)
    cuts, log_q = model.draw_cuts(x, len(Z), drawn=Z.unsqueeze(1))
    assert torch.equal(cuts[:, 0], Z)  # a valid segmentation needs no forced cut added
    log_p = dlm107_vae_seg.log_joint(dlm107_vae_seg.by_end(scores), closing, data.num_chars(x), cuts)
    return Z, log_p[:, 0], log_q[:, 0]


@pytest.mark.parametrize("parser", ["causal", "bi"])
def test_dlm107_elbo_is_below_log_p_for_every_caption(parser):
    model, gaps = tiny_seg(estimator="reinforce", parser=parser), []
    for chars in all_captions():
        x = seg_caption(chars)
        _, log_p, log_q = exact_elbo_terms(model, x)
        assert log_q.exp().sum().item() == pytest.approx(1.0, abs=1e-12)  # q: a distribution over them
        elbo, log_px = (log_q.exp() * (log_p - log_q)).sum(), model.log_prob(x)[0][0]
        assert log_px.item() == pytest.approx(torch.logsumexp(log_p, 0).item(), abs=1e-10)
        assert elbo <= log_px + 1e-12
        gaps.append((log_px - elbo).item())
    assert max(gaps) > 0.1  # a real gap somewhere: q is not the posterior


def test_dlm107_reinforce_gradient_matches_the_exact_elbo_gradient():
    # E over all pairs of segmentations of the estimator's gradient == the exact gradient of the ELBO,
    # for q's parameters (REINFORCE) and p's (pathwise) alike.
    model, x = tiny_seg(estimator="reinforce", train_samples=2), seg_caption((4, 3, 4, 4))
    params = list(model.parameters())
    Z, log_p, log_q = exact_elbo_terms(model, x)
    exact = torch.autograd.grad((log_q.exp() * (log_p - log_q)).sum(), params, allow_unused=True)
    expected = [torch.zeros_like(p) for p in params]
    for idx in itertools.product(range(len(Z)), repeat=2):
        loss = model.loss(x, drawn=Z[list(idx)].unsqueeze(1))
        weight = log_q[list(idx)].sum().exp().detach()
        for e, g in zip(expected, torch.autograd.grad(-loss.sum(), params, allow_unused=True)):
            e += weight * (g if g is not None else 0)
    assert sum(e.abs().sum() for e in expected) > 0.1
    for e, g in zip(expected, exact):
        torch.testing.assert_close(e, g if g is not None else torch.zeros_like(e))


def test_dlm107_piece_cost_tilts_the_training_sum_only():
    model, x = tiny_seg(piece_cost=0.7), seg_caption((4, 3, 4, 4))
    with torch.no_grad():
        scores, closing = model.piece_scores(x)
        Z = segmentations(4)
        tilted = torch.tensor([enumerated_log_joint(scores, closing, 4, z) - 0.7 * z.sum().item() for z in Z],
                              dtype=torch.float64)
        assert model.loss(x).item() == pytest.approx(-torch.logsumexp(tilted, 0).item(), abs=1e-10)
        nll, _ = dlm107_vae_seg.evaluate(model, x, dlm107_vae_seg.Config(eval_batch_size=5), CPU, full=False)
        assert nll.item() == pytest.approx(-model.log_prob(x)[0].item(), abs=1e-12)  # untilted
        assert nll.item() < model.loss(x).item()


def test_dlm107_spaces_segmenter_loss_is_the_joint_of_the_cuts_after_the_spaces():
    model, x = tiny_seg(segmenter="spaces"), seg_caption((4, 4, 4, 3))
    z = torch.tensor([[False, False, True, True, False]])  # 444 (a forced cut at SEG_K = 3) | 3
    scores, closing = model.piece_scores(x)
    expected = enumerated_log_joint(scores, closing, 4, z[0])
    assert model.loss(x).item() == pytest.approx(-expected)


# ----------------------------------------------------------------------------- segmentation scores
def scores_of(text, cut_after, no_spaces_gold=None):
    """The scores of one caption cut after the given characters (and after its last), through evaluate's
    path."""
    vocab = data.Vocab(list("abc ."))
    x = torch.tensor([vocab.encode(text)])
    cuts = torch.zeros_like(x, dtype=torch.bool)
    cuts[0, list(cut_after) + [len(text) - 1]] = True
    gold = (None if no_spaces_gold is None
            else torch.zeros_like(cuts).index_fill(1, torch.tensor(no_spaces_gold), True))
    model = dlm107_vae_seg.Model(vocab.itos, torch.zeros(0, 2, dtype=torch.long),
                                 dlm107_vae_seg.Config(lexicon=0))
    return dlm107_vae_seg.segmentation_scores(*dlm107_vae_seg.caption_words(model, x, cuts, gold))


def test_dlm107_words_of_a_caption_are_cut_anywhere_in_a_run_of_spaces():
    # a |man |in
    assert dlm107_vae_seg.words_of("a man in", [0, 1, 0, 0, 1, 0, 0, 1]) == ["a", "man", "in"]
    # a| man| in
    assert dlm107_vae_seg.words_of("a man in", [1, 0, 0, 0, 0, 1, 0, 1]) == ["a", "man", "in"]
    # a |man in: no cut, one word
    assert dlm107_vae_seg.words_of("a man in", [0, 1, 0, 0, 0, 0, 0, 1]) == ["a", "manin"]
    # cuts around spaces: one
    assert dlm107_vae_seg.words_of("a  b", [1, 1, 1, 1]) == ["a", "b"]
    assert dlm107_vae_seg.words_of("ab", [1, 0]) == ["a", "b"] and dlm107_vae_seg.words_of("", []) == []


def test_dlm107_boundary_token_and_type_scores_on_hand_made_examples():
    text = "ab c abc."  # words ab | c | abc. ; inner boundaries (without spaces) at 2 and 3
    s = scores_of(text, [2, 4])        # cuts after both spaces: perfect
    assert all(s[f"{k}_{m}"] == 1 for k in ("boundary", "token", "type")
               for m in ("precision", "recall", "f1"))
    assert scores_of(text, [1, 3]) == s  # cuts before both spaces: the same words
    s = scores_of(text, [1, 2])        # both sides of the first space: one boundary; the second missed
    assert (s["boundary_precision"], s["boundary_recall"]) == (1, 0.5)
    assert (s["token_precision"], s["token_recall"]) == (0.5, 1 / 3)  # ab right; cabc. wrong
    s = scores_of(text, [0, 2, 6])     # a|b |c abc|.: words a, b, cabc, . : boundaries 1, 2, 6 (one right)
    assert (s["boundary_precision"], s["boundary_recall"], s["token_precision"]) == (1 / 3, 0.5, 0)
    s = scores_of("abcabc.", [1, 4], no_spaces_gold=[1, 2])  # --no-spaces: true words ab, c, abc.
    assert (s["boundary_precision"], s["boundary_recall"]) == (0.5, 0.5)
    assert (s["token_precision"], s["token_recall"]) == (1 / 3, 1 / 3)  # ab right; abc and . wrong


def test_dlm107_scores_exclude_the_edges_need_no_boundary_inside_a_token_and_count_types_once():
    # under-segmented: edges would give P 1, R 2/3
    s = dlm107_vae_seg.segmentation_scores([["yuwant"]], [["yu", "want"]])
    assert (s["boundary_precision"], s["boundary_recall"], s["token_recall"]) == (0, 0, 0)
    # ends right, a boundary inside
    s = dlm107_vae_seg.segmentation_scores([["thedog", "ran"]], [["the", "dog", "ran"]])
    assert ((s["token_precision"], s["token_recall"], s["boundary_precision"], s["boundary_recall"])
            == (0.5, 1 / 3, 1, 0.5))
    # no boundary at all: nothing divides by zero
    s = dlm107_vae_seg.segmentation_scores([["dog"]], [["dog"]])
    assert (s["boundary_f1"], s["token_f1"], s["type_f1"]) == (0, 1, 1)
    found, true = [["the", "dog"], ["thecat"], ["a", "dog"]], [["the", "dog"], ["the", "cat"], ["a", "dog"]]
    # types {the, dog, thecat, a} against {the, dog, cat, a}
    s = dlm107_vae_seg.segmentation_scores(found, true)
    assert (s["type_precision"], s["type_recall"]) == (0.75, 0.75)
    assert (s["token_precision"], s["token_recall"]) == (0.8, 4 / 6) and s["boundary_recall"] == 2 / 3


def test_dlm107_no_spaces_data_round_trips_with_the_removed_spaces(tiny_data):
    vocab, splits, _, _ = data.load(str(tiny_data), custom=True, no_spaces=True)
    assert sorted(splits) == ["test", "test_spaces", "train", "train_spaces", "val", "val_spaces"]
    lines = make_captions(30, 1)
    for ids, g, line in zip(splits["val"], splits["val_spaces"], lines):
        text = vocab.decode(ids)
        assert " " not in text and "".join(c + " " * bool(g[t]) for t, c in enumerate(text)) == line


SEG_TINY = ["--embed", "16", "--piece-embed", "8", "--max-piece", "6", "--lexicon", "50",
            "--batch-size", "50", "--eval-batch-size", "64",
            "--show-samples", "2", "--log-every", "1", "--iw-samples", "8", "--custom-data", "--lr", "1e-2"]


@pytest.mark.parametrize("mode", [[], ["--estimator", "reinforce"], ["--segmenter", "spaces"],
                                  ["--no-spaces", "--lex-rank", "variety"]])  # (last: README's Brent rules)
def test_dlm107_each_mode_trains_resumes_exactly_evaluates_and_samples(tiny_data, tmp_path, mode):
    base = SEG_TINY + mode + ["--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--epochs", "3"]
    for more in (["straight"], ["split", "--max-steps", "5"], ["split", "--resume"]):
        code, out, err = call("dlm107_vae_seg", base + ["--run-name", *more])
        assert code == 0, out + err
    root = tmp_path / dlm107_vae_seg.SCRIPT
    train = [(r["step"], r["nlpps"]) for r in seg_records(root / "straight", "train")]
    assert train == [(r["step"], r["nlpps"]) for r in seg_records(root / "split", "train")]
    assert train[-1][1] < train[0][1]  # the loss falls
    test, = seg_records(root / "straight", "test")
    assert test == {**seg_records(root / "split", "test")[-1], "seconds": test["seconds"],
                    "train_seconds": test["train_seconds"], "train_cpu_seconds": test["train_cpu_seconds"],
                    "run_id": test["run_id"]}  # (each run its own)
    assert test["bound"] == "exact" and test["data"] == ("custom data, spaces removed"
                                                         if "--no-spaces" in mode else "custom data")
    assert all(0 <= test[k] <= 1 for k in ("boundary_f1", "token_f1", "type_f1", "cut_rate"))
    # the file's lines: the input's
    lines = (root / "straight" / "segmentation_test.txt").read_text().splitlines()
    assert [l.replace(" ", "") for l in lines] == [c.replace(" ", "")
                                                   for c in make_captions(30, 2) + ["<unk>ebra<unk><unk>"]]
    if mode == ["--estimator", "reinforce"]:
        assert test["elbo_nlpps"] >= test["iw_nlpps"] >= test["nlpps"] - 1e-9 and test["kl_gap"] >= 0
    if mode == ["--segmenter", "spaces"]:
        assert test["joint_nlpps"] >= test["nlpps"]
    assert json.loads((root / "straight" / "args.json").read_text())["spaces"] == ("--no-spaces" not in mode)
    assert (root / "straight" / "segments.png").exists()
    lexicon = torch.load(root / "straight" / "ckpt_last.pt", weights_only=True)["model"]["memory.lexicon"]
    assert lexicon.shape[1] == 6
    code, out, err = call("dlm107_vae_seg", base + ["--run-name", "straight", "--sample-only",
                                                    "--show-samples", "3"])
    assert code == 0, err
    assert out.count("[SAMPLE]") == 3 and out.count("[SEGMENT]") == dlm107_vae_seg.SHOWN
    shown = [l.split("] ", 1)[1].replace("|", "") for l in out.splitlines() if l.startswith("[SEGMENT]")]
    expected = make_captions(30, 2)[:dlm107_vae_seg.SHOWN]
    assert shown == ([c.replace(" ", "") for c in expected] if "--no-spaces" in mode else expected)


def test_dlm107_segment_prints_the_words_of_each_line_of_a_file_and_names_unseen_characters(finished,
                                                                                            tmp_path):
    out_dir, _ = copy_run(finished["dlm107_vae_seg"], tmp_path)
    lines = make_captions(5, 7) + ["Quiet zebra!", ""]  # Q, z and ! never occur in the training captions
    (tmp_path / "in.txt").write_text("".join(line + "\n" for line in lines))
    code, out, err = call("dlm107_vae_seg", ["--segment", str(tmp_path / "in.txt"),
                                             "--out-dir", str(out_dir)])
    assert code == 0 and "3 characters unseen in training" in err and "'Q'" in err and "'!'" in err
    words = out.splitlines()
    assert len(words) == len(lines)  # one line each, in order: an empty line stays an empty line
    assert [w.replace(" ", "") for w in words] == [
        line.replace(" ", "").replace("Q", "<unk>").replace("z", "<unk>").replace("!", "<unk>")
        for line in lines]
    call_ok("dlm107_vae_seg", ["--segment", str(tmp_path / "in.txt"),
                               "--segment-out", str(tmp_path / "w.txt"), "--out-dir", str(out_dir)])
    assert (tmp_path / "w.txt").read_text() == out
    assert_one_line_error(*call("dlm107_vae_seg", ["--segment", str(tmp_path / "none.txt"),
                                                   "--out-dir", str(out_dir)])[::2], "cannot read --segment")
    assert_one_line_error(*call("dlm107_vae_seg", ["--segment-out", "x.txt"])[::2], "--segment FILE")


def test_dlm107_lexicon_chars_sizes_the_memory_by_the_corpus():
    train = torch.tensor([data.Vocab(list("ab")).encode("ab" * 10)] * 44)  # 880 characters
    cfg = dlm107_vae_seg.Config(lexicon_chars=88)
    assert dlm107_vae_seg.lexicon_size(train, cfg) == 10
    assert dlm107_vae_seg.lexicon_size(train, dlm107_vae_seg.Config(lexicon=7)) == 7  # 0: --lexicon as given
    if HAVE_REAL_DATA:  # 88 is Multi30k's own ratio: about its default 20,000 entries
        _, splits, _, _ = data.load(str(REAL_DATA))
        assert abs(dlm107_vae_seg.lexicon_size(splits["train"], cfg) - 20000) < 200


def test_dlm107_bad_flag_combinations_are_one_line_errors(tiny_data, tmp_path):
    base = SEG_TINY + ["--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--epochs", "1"]
    assert_one_line_error(*call("dlm107_vae_seg", base + ["--lex-max", "7"])[::2], "--max-piece")
    assert_one_line_error(*call("dlm107_vae_seg", base + ["--run-name", "b", "--segmenter", "spaces",
                                                          "--no-spaces"])[::2], "--no-spaces")


def test_dlm107_a_refused_setting_is_named_as_it_is_typed(finished, tmp_path):
    out_dir, _ = copy_run(finished["dlm107_vae_seg"], tmp_path)
    code, _, err = call("dlm107_vae_seg", ["--eval-only", "--no-spaces", "--out-dir", str(out_dir)])
    assert_one_line_error(code, err, "--no-spaces contradicts the checkpoint's --spaces")


# ----------------------------------------------------------------------------- the memory itself
@pytest.mark.parametrize("factor", [True, False])
def test_dlm107_memory_is_a_distribution_over_the_entries_that_fit_and_the_windows_read_it(factor):
    memory = tiny_seg(lex_factor=factor).memory
    h = torch.randn(4, 8, dtype=torch.float64)
    room = torch.tensor([3, 3, 2, 1])
    log_p = memory.all_log_probs(h, room)                                          # (4, M)
    fits = memory.entry_len[None, :] <= room[:, None]
    # room >= 2: sums to 1
    torch.testing.assert_close(log_p.exp().sum(1)[:3], torch.ones(3, dtype=torch.float64))
    assert (log_p[~fits] < -1e8).all()                                             # too long: no mass
    log_g, log_not_g = memory.gates(h, room)
    assert log_g[3] < -1e8 and log_not_g[3] == 0 and (log_g[:3] > -50).all()      # room 1: g = 0
    # every entry, read through a window that spells it, gets the probability all_log_probs gives it
    for e, ids in enumerate(memory.lexicon.tolist()):
        length = sum(c != data.PAD for c in ids)
        # the entry then an UNK
        windows = torch.tensor([ids[:length] + [SEG_CHARS[0]] * (SEG_K - length)] * 4)
        lex = memory.log_probs(h, room, windows)[0]
        for r in range(4):
            expected = log_p[r, e] if length <= room[r] else None
            if expected is not None:
                assert lex[r, length - 1].item() == pytest.approx(expected.item(), abs=1e-12)


def test_dlm107_the_factorised_memory_normalises_one_first_character_group_only():
    # the factorised p_lex(e | h) = p(a(e) | h) * softmax within G_a: the group totals are p(a | h)
    memory = tiny_seg(lex_factor=True).memory
    h, room = torch.randn(3, 8, dtype=torch.float64), torch.tensor([3, 2, 3])
    p = memory.all_log_probs(h, room).exp()
    first = memory.log_first(h, room).exp()                                        # (3, groups)
    for a, (lo, hi) in enumerate(memory.groups):
        torch.testing.assert_close(p[:, lo:hi].sum(1), first[:, a])
        assert (memory.lexicon[lo:hi, 0] == memory.firsts[a]).all()                # groups by first character
    assert first[1, memory.group_of_char[2]] == 0                                  # room 2: 244 does not fit


def test_dlm107_lexicon_list_trie_and_checkpoint():
    x = torch.stack([seg_caption((4, 3, 4, 4), 6)[0], seg_caption((4, 3, 4), 6)[0],
                     seg_caption((3, 4), 6)[0]])
    # counts: 34 x3, 43 x2, 434 x2, 344 x1, 44 x1: the top 3, stored shortest first
    lex = dlm107_vae_seg.LexicalMemory.top_substrings(x, 3, 2, 3)
    assert lex.tolist() == [[3, 4, 0], [4, 3, 0], [4, 3, 4]]
    memory = dlm107_vae_seg.LexicalMemory(lex, 5, 4, 2, True)
    ids = memory.entry_ids(torch.tensor([[4, 3, 4], [3, 4, 4], [4, 4, 3]]))
    assert [[memory.lexicon[i].tolist() if i >= 0 else None for i in row] for row in ids.tolist()] == [
        [None, [4, 3, 0], [4, 3, 4]], [None, [3, 4, 0], None], [None, None, None]]
    # a checkpoint's lexicon (and its grouping) is the one used after loading, not the constructor's
    model = tiny_seg()
    other = dlm107_vae_seg.Model(ITOS, torch.tensor([[4, 4, 4], [3, 3, 0], [4, 3, 0], [3, 4, 4]]),
                                 dataclasses.replace(dlm107_vae_seg.Config(), embed=8, piece_embed=5,
                                                     max_piece=SEG_K, lex_min=2, lex_max=3,
                                                     lex_key=4)).double()
    other.load_state_dict(model.state_dict())
    x = seg_caption((4, 3, 4, 4))
    torch.testing.assert_close(other.log_prob(x)[0], model.log_prob(x)[0])


def test_dlm107_lexicon_by_accessor_variety_ranks_words_above_their_inside():
    # "ab" occurs 3 times, always between s and t: variety 1. "cd" occurs twice, each time a whole caption:
    # the caption's edges count once per occurrence, so variety 2 (were an edge one neighbour, 1: a tie that
    # count would give to "ab"). By count "ab" comes first (with "sa" and "bt", also 3, after it by ids); by
    # variety "cd".
    a, b, c, d, s, t = range(3, 9)
    x = torch.tensor([[s, a, b, t, 0], [s, a, b, t, 0], [s, a, b, t, 0], [c, d, 0, 0, 0], [c, d, 0, 0, 0]])
    by_count = dlm107_vae_seg.LexicalMemory.top_substrings(x, 1, 2, 2)
    by_variety = dlm107_vae_seg.LexicalMemory.top_substrings(x, 1, 2, 2, rank="variety")
    assert by_count.tolist() == [[a, b]] and by_variety.tolist() == [[c, d]]


def test_dlm107_lexicon_by_accessor_variety_matches_counting_by_hand():
    torch.manual_seed(0)
    V, L = 7, 9
    lengths = torch.randint(1, L, (40,))
    x = torch.where(torch.arange(L) < lengths[:, None], torch.randint(3, V, (40, L)), data.PAD)
    counts, before, after = collections.Counter(), collections.defaultdict(set), collections.defaultdict(set)
    for r, (row, n) in enumerate(zip(x.tolist(), lengths.tolist())):
        for k in (2, 3):
            for i in range(n - k + 1):
                s = tuple(row[i:i + k])
                counts[s] += 1  # a caption's edge: a new neighbour each time (caption r, length k)
                before[s].add(row[i - 1] if i else ("start", r, k))
                after[s].add(row[i + k] if i + k < n else ("end", r, k))
    # variety first, then count, then shorter, then smaller ids; stored shortest first
    ranked = sorted(counts, key=lambda s: (-min(len(before[s]), len(after[s])), -counts[s], len(s), s))[:12]
    expected = [list(s) + [data.PAD] * (3 - len(s)) for s in sorted(ranked, key=len)]
    assert dlm107_vae_seg.LexicalMemory.top_substrings(x, 12, 2, 3, rank="variety").tolist() == expected


# ----------------------------------------------------------------------------- the model with it: enumeration
@pytest.mark.parametrize("kw", MEMORIES + [dict(lexicon=False)], ids=str)
def test_dlm107_chart_viterbi_posteriors_equal_enumeration_and_p_sums_to_one(kw):
    model, total = tiny_seg(**kw), 0.0
    for chars in all_captions():
        x, n = seg_caption(chars), torch.tensor([len(chars)])
        with torch.no_grad():
            log_px, (scores, ends, closing, _) = model.log_prob(x)
            best = dlm107_vae_seg.viterbi_segmentation(ends, n)[1]
            posteriors = dlm107_vae_seg.piece_posteriors(scores, n)
        Z = segmentations(len(chars))
        joint = torch.tensor([enumerated_log_joint(scores, closing, len(chars), z) for z in Z],
                             dtype=torch.float64)
        torch.testing.assert_close(dlm107_vae_seg.log_joint(ends, closing, n, Z[:, None])[:, 0], joint)
        assert log_px.item() == pytest.approx(torch.logsumexp(joint, 0).item(), abs=1e-10)
        assert torch.equal(best[0], Z[joint.argmax()])
        total += log_px.exp().item()
        # p(piece | x) by enumeration: the posterior mass of the segmentations that hold it
        expected = torch.zeros_like(posteriors)
        for z, p in zip(Z, (joint - log_px).exp()):
            start = 0
            for t in range(len(chars)):
                if z[t]:
                    expected[0, start, t - start] += p
                    start = t + 1
        torch.testing.assert_close(posteriors, expected, atol=1e-10, rtol=0)
        if len(chars):
            cut_probs = dlm107_vae_seg.cut_probabilities(scores, n)[0]
            torch.testing.assert_close(cut_probs, ((joint - log_px).exp()[:, None] * Z).sum(0))
    # forced ends included (pieces of SEG_K characters, captions of SEG_SLOTS-1): no mass lost, none invented
    assert total == pytest.approx(1.0, abs=1e-10)


def test_dlm107_the_memory_really_adds_mass():
    with_lex, without = tiny_seg(True), tiny_seg(False)
    x = seg_caption((4, 3, 4, 4))
    with torch.no_grad():
        scores, _ = with_lex.piece_scores(x)
        plain, _ = without.piece_scores(x)
    assert (scores[0, 0, 2] - plain[0, 0, 2]).abs() > 1e-3  # "434" and "34" are entries: both branches count
    assert (scores[0, 1, 1] - plain[0, 1, 1]).abs() > 1e-3


@pytest.mark.parametrize("kw", MEMORIES[:3], ids=str)
def test_dlm107_sampler_draws_captions_and_cuts_with_the_probabilities_the_chart_scores(kw):
    model, n = tiny_seg(**kw), 20000
    x, extra = dlm107_vae_seg.sample(model, n, dlm107_vae_seg.Config(), CPU, torch.Generator().manual_seed(0),
                                     slots=SEG_SLOTS)
    cuts = extra["cuts"]
    unique, counts = torch.cat([x, cuts.long()], 1).unique(dim=0, return_counts=True)
    with torch.no_grad():
        scores, closing = model.piece_scores(unique[:, :SEG_SLOTS])
        log_p = dlm107_vae_seg.log_joint(dlm107_vae_seg.by_end(scores), closing,
                                         data.num_chars(unique[:, :SEG_SLOTS]), unique[:, SEG_SLOTS:].bool())
    assert log_p.exp().sum() > 0.99
    torch.testing.assert_close(counts / n, log_p.exp(), atol=0.01, rtol=0, check_dtype=False)


def test_dlm107_dropout_is_off_at_zero_and_in_evaluation_and_the_same_model_else():
    plain, dropped, x = tiny_seg(), tiny_seg(dropout=0.5), seg_caption((4, 3, 4, 4))
    assert plain.state_dict().keys() == dropped.state_dict().keys()  # a checkpoint fits both
    torch.manual_seed(1)
    before = torch.rand(1)
    torch.manual_seed(1)
    reference = plain.loss(x)
    assert torch.equal(torch.rand(1), before)  # p = 0 draws no noise: the model as without the flag
    assert not torch.equal(dropped.loss(x), reference)  # training: features of the context dropped
    nll, _ = dlm107_vae_seg.evaluate(dropped, x, dlm107_vae_seg.Config(), CPU, full=False)
    torch.testing.assert_close(nll, reference.detach())  # evaluation: off, the exact -log p(x)


@pytest.mark.parametrize("mode", [dict(estimator="reinforce"), dict(segmenter="spaces")], ids=str)
def test_dlm107_other_modes_use_the_same_memory(mode):
    model, x = tiny_seg(**mode), seg_caption((4, 3, 4, 4))
    assert model.memory is not None and torch.isfinite(model.loss(x)).all()


# ----------------------------------------------------------------------------- expected-length regulariser
def test_dlm107_expected_length_is_the_enumerated_expectation_and_changes_the_training_loss_only():
    plain, model, x = tiny_seg(), tiny_seg(length_penalty=0.3, length_exponent=2.0), seg_caption((4, 3, 4, 4))
    with torch.no_grad():
        log_px, (scores, _, closing, n) = model.log_prob(x)
        Z = segmentations(4)
        joint = torch.tensor([enumerated_log_joint(scores, closing, 4, z) for z in Z], dtype=torch.float64)
        # piece lengths of each z
        lengths = [torch.diff(torch.tensor([-1] + z.nonzero()[:, 0].tolist())) for z in Z]
        expected = sum(p * (k.double() ** 2).sum() for p, k in zip((joint - log_px).exp(), lengths))
        assert (dlm107_vae_seg.expected_length_cost(scores, n, 2.0).item()
                == pytest.approx(expected.item(), abs=1e-10))
        # beta 1: n
        assert dlm107_vae_seg.expected_length_cost(scores, n, 1.0).item() == pytest.approx(4.0, abs=1e-10)
        assert model.loss(x).item() == pytest.approx(-log_px.item() + 0.3 * expected.item(), abs=1e-10)
        assert plain.loss(x).item() == pytest.approx(-log_px.item(), abs=1e-10)
        nll, _ = dlm107_vae_seg.evaluate(model, x, dlm107_vae_seg.Config(eval_batch_size=5), CPU, full=False)
        assert nll.item() == pytest.approx(-log_px.item(), abs=1e-12)  # the reported NLPPS: exact, no penalty
    # and its gradient is the gradient of the enumerated expectation (posteriors are differentiable)
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(model.length_cost(*model.log_prob(x)[1][::3]).sum(), params,
                                allow_unused=True)
    log_px, (scores, _, closing, _) = model.log_prob(x)
    joint = torch.stack([dlm107_vae_seg.log_joint(dlm107_vae_seg.by_end(scores), closing, torch.tensor([4]),
                                                  z[None, None])[0, 0] for z in Z])
    enumerated = 0.3 * sum(p * (k.double() ** 2).sum() for p, k in zip((joint - log_px).exp(), lengths))
    for g, e in zip(grads, torch.autograd.grad(enumerated, params, allow_unused=True)):
        if e is not None:
            torch.testing.assert_close(g, e)
    assert sum(g.abs().sum() for g in grads if g is not None) > 1e-3


# ============================================================================= dlm123_gmmvae.py
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
    # every slot scored, BOS-free and PAD included
    torch.testing.assert_close(log_pz, prior.log_prob(z).sum(-1))
    decoder = D.Categorical(logits=model.decoder_log_probs(z))
    torch.testing.assert_close(log_px_z, decoder.log_prob(x).sum(-1))
    # the training loss is exactly -mean_s [log p(x|z_s) + log p(z_s)] - H[q] for the same draws
    loss = model.neg_elbo(x, 6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss, -(log_px_z + log_pz).mean(0) - q.entropy())
    reinforce = model.neg_elbo(x, 6, "reinforce", torch.Generator().manual_seed(0))
    torch.testing.assert_close(reinforce, loss)  # same value; only the gradient differs


def test_dlm123_posterior_scale_is_capped_and_starts_at_one():
    for scale in ("dim", "slot"):
        model, cfg = tiny_gmmvae(posterior_scale=scale, sigma_max=2.5)
        x = torch.tensor([[3, 4, 0]])
        assert torch.allclose(model.encode(x)[1].exp(), torch.ones(1, dtype=torch.double))
        with torch.no_grad():
            (model.rho if scale == "dim" else model.rho.bias).add_(50.0)
        sigma = model.encode(x)[1].exp()
        assert (sigma <= 2.5).all() and (sigma > 2.49).all()


def test_dlm123_iw_bound_tightens_with_samples_and_equals_the_elbo_for_one():
    model, cfg = tiny_gmmvae()
    x = torch.tensor([[3, 4, 2, 0, 0, 0], [1, 2, 3, 4, 3, 0]]).repeat(500, 1)
    bounds = {}
    for m in (1, 4, 64):
        nll, extra = dlm123_gmmvae.evaluate(model, x, dataclasses.replace(cfg, iw_samples=m), CPU)
        bounds[m] = nll.mean().item(), extra["neg_elbo"]
        assert extra["kl"] > 0
    assert bounds[64][0] < bounds[4][0] - 0.5 < bounds[1][0] - 1.0
    assert bounds[4][0] < bounds[4][1] and bounds[64][0] < bounds[64][1]  # -IW_M <= -ELBO
    # one draw: -IW_1 = -log p(x, z) + log q(z|x), whose mean is the -ELBO (there with closed-form entropy)
    assert bounds[1][0] == pytest.approx(bounds[1][1], abs=0.3)
    assert bounds[64][1] == pytest.approx(bounds[1][1], abs=0.3)  # the ELBO does not depend on M


def test_dlm123_importance_weights_give_probabilities_that_sum_to_one():
    # mean_m p(x, z_m) / q(z_m|x) is an unbiased estimate of p(x); over all 3^2 sequences of 2 slots the
    # model's probabilities sum to 1 only if every latent the decoder reads is scored by the prior. A
    # posterior scale of 1.5 (wider than the initial encoder's) keeps the importance weights light-tailed.
    model, cfg = tiny_gmmvae(vocab_size=3, embed=2, components=3, sigma_max=4.0)
    with torch.no_grad():
        model.rho.fill_(-math.log(4.0 / 1.5 - 1))
    x = torch.tensor(list(itertools.product(range(3), repeat=2)))
    nll, extra = dlm123_gmmvae.evaluate(model, x,
                                        dataclasses.replace(cfg, iw_samples=2000, eval_batch_size=9), CPU)
    assert torch.exp(-nll).sum().item() == pytest.approx(1.0, abs=0.04)
    assert extra["neg_elbo"] > nll.mean().item() + 0.5  # the ELBO is a much looser bound


def test_dlm123_reinforce_and_reparam_gradients_agree_in_expectation():
    model, cfg = tiny_gmmvae()
    x = torch.tensor([[3, 4, 1, 0], [1, 2, 3, 0]])
    grads = {}
    for estimator in ("reparam", "reinforce"):
        loss = model.neg_elbo(x, 40000, estimator, torch.Generator().manual_seed(1)).mean()
        grads[estimator] = torch.cat([g.flatten()
                                      for g in torch.autograd.grad(loss, list(model.parameters()))])
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
    cfg = dataclasses.replace(cfg, iw_samples=3)
    a = dlm123_gmmvae.evaluate(model, x, cfg, CPU)
    dlm123_gmmvae.gradient_variance(model, x, cfg)
    dlm123_gmmvae.sample(model, 2, cfg, CPU, torch.Generator().manual_seed(0))
    b = dlm123_gmmvae.evaluate(model, x, cfg, CPU)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


def test_dlm123_sampler_draws_from_the_model_the_loss_scores():
    # symbol frequencies of the sampler at the interior slots == E_{z ~ prior}[p(x_t | z)], the prior sampled
    # by torch.distributions (a sampler that ignored the mixture means would be ~0.05 off)
    D = torch.distributions
    model, _ = tiny_gmmvae()
    with torch.no_grad():
        model.embed.weight.mul_(3)  # sharper decoder: the frequencies then depend on where z falls
    x, _ = dlm123_gmmvae.sample(model, 2000, dlm123_gmmvae.Config(), CPU, torch.Generator().manual_seed(0))
    assert x.shape == (2000, data.SLOTS) and x.dtype == torch.long
    freq = torch.bincount(x[:, 10:90].flatten(), minlength=5).double() / x[:, 10:90].numel()
    prior = D.MixtureSameFamily(D.Categorical(logits=torch.zeros(4, dtype=torch.double)),
                                D.Independent(D.Normal(model.prior_means, model.prior_log_std.exp()), 1))
    with torch.no_grad():
        log_p = data.emittable(model.decoder_log_probs(prior.sample((2000, data.SLOTS))))
        expected = log_p.exp()[:, 10:90].mean((0, 1))
    assert freq[data.BOS] == 0
    torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)


def test_dlm123_active_dims_counts_the_dimensions_whose_mean_moves_with_the_caption():
    model, _ = tiny_gmmvae(embed=6)
    means = torch.zeros(50, 7, 6, dtype=torch.double)
    means[:, :, :2] = torch.randn(50, 7, 2, dtype=torch.double)  # two dimensions carry the caption
    # one moves, but far below the prior's scale
    means[:, :, 2] = 1e-3 * torch.randn(50, 7, dtype=torch.double)
    assert dlm123_gmmvae.active_dims(model, means) == 2


# ============================================================================= dlm142_diffusion.py
# Exact checks enumerate a tiny model: DIFF_V = 4 symbols PAD, <bos>, UNK, one character (+ MASK),
# DIFF_L = 2 slots, DIFF_T = 4 steps. In the shape comments, S counts the states and L the slots.
DIFF_V, DIFF_L, DIFF_T = 4, 2, 4
KINDS = {  # name: Config overrides
    "x0": dict(param="x0"),
    "x0-dilated": dict(param="x0", dilation="1,2", time_cond=True),
    "x0-transformer": dict(param="x0", backbone="transformer"),
    "gate": dict(param="gate", time_cond=True),
    "gate-nocopy": dict(param="gate", copy=False),
    "gate-uniform-dilated": dict(param="gate", noise="uniform", dilation="2,1", time_cond=True),
    "gate-uniform-transformer": dict(param="gate", noise="uniform", backbone="transformer", time_cond=True),
    "x0-hybrid": dict(param="x0", backbone="hybrid"),
    "x0-hybrid-dilated-nomlp": dict(param="x0", backbone="hybrid", dilation="1,2", mlp_ratio=0,
                                    time_cond=True),
    "gate-uniform-hybrid": dict(param="gate", noise="uniform", backbone="hybrid", time_cond=True),
}


def tiny_diffusion(kind, steps=DIFF_T):
    torch.manual_seed(0)
    cfg = dlm142_diffusion.Config(embed=8, depth=2, kernel=3, heads=2, diffusion_steps=steps, **KINDS[kind])
    model = dlm142_diffusion.Model(DIFF_V, cfg).double()
    with torch.no_grad():  # random, far-from-uniform outputs make the checks bite
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def all_states(S):
    return torch.tensor(list(itertools.product(range(S), repeat=DIFF_L)))           # (S^L, L)


def data_captions():
    return torch.tensor([x for x in itertools.product(range(DIFF_V), repeat=DIFF_L) if data.BOS not in x])


def exact_diffusion_p(model):
    """p(x_0) for every 2-slot state, by summing over every reverse trajectory -> (S^L,)."""
    c = model.corruption
    states = all_states(c.states)
    with torch.no_grad():
        p = c.noise.double()[states].prod(-1)                                       # p(x_T)
        for t in range(c.T, 0, -1):
            lp = model.reverse_log_probs(states, torch.full((len(states),), t))     # (S^L, L, S)
            # [a, b] = p(x_{t-1}=b | x_t=a)
            p = p @ sum(lp[:, i, states[:, i]] for i in range(DIFF_L)).exp()
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
            terms = model.step_terms(x0.expand(int(possible.sum()), DIFF_L), states[possible],
                                     torch.full((int(possible.sum()),), t))
            rows.append((w[possible, None] * terms).sum(0))
    return torch.stack(rows)


@pytest.mark.parametrize("noise", ["uniform", "absorb"])
def test_dlm142_posterior_matches_bayes_rule_and_the_chain_ends_at_noise(noise):
    c = dlm142_diffusion.Corruption(DIFF_V, DIFF_T, noise)
    S = c.states
    a = c.alpha_bar(torch.arange(DIFF_T + 1))
    # one-step matrices straight from the definition q(x_t | x_{t-1}) = (1 - b_t) I + b_t n
    Q = [None] + [(a[t] / a[t - 1]) * torch.eye(S) + (1 - a[t] / a[t - 1]) * c.noise.expand(S, S)
                  for t in range(1, DIFF_T + 1)]
    x0 = torch.tensor([[0, 2, 3]])
    marg = torch.nn.functional.one_hot(x0[0], S).float()                            # (3, S): q(x_0 | x_0)
    for t in range(1, DIFF_T + 1):
        prev, marg = marg, marg @ Q[t]
        torch.testing.assert_close(c.marginal(x0, torch.tensor([t]))[0], marg)
        for xt in itertools.product(range(S), repeat=3):
            xt = torch.tensor([xt])
            if (marg[torch.arange(3), xt[0]] == 0).any():
                continue  # impossible x_t
            bayes = Q[t][:, xt[0]].t() * prev                                       # (3, S)
            torch.testing.assert_close(c.posterior(x0, xt, torch.tensor([t]))[0],
                                       bayes / bayes.sum(-1, keepdim=True))
    torch.testing.assert_close(marg, c.noise.expand(3, S))  # a_T = 0: x_T is pure noise
    assert c.prior_kl(x0).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_dlm142_p_sums_to_one_over_captions_and_the_elbo_bounds_it(kind):
    model = tiny_diffusion(kind)
    states, p = exact_diffusion_p(model)
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


@pytest.mark.parametrize("kind", ["x0", "x0-transformer", "x0-hybrid"])
def test_dlm142_x0_kernel_is_the_posterior_with_p_theta_in_place_of_x0(kind):
    model = tiny_diffusion(kind)
    c = model.corruption
    xt = all_states(c.states)
    xt = xt[~(xt == data.BOS).any(-1)]                                              # x_t never holds <bos>
    for t in range(1, DIFF_T + 1):
        if t == DIFF_T:  # a_T = 0: only the all-MASK x_T is possible
            xt = xt[(xt == c.mask).all(-1)]
        tt = torch.full((len(xt),), t)
        with torch.no_grad():
            kernel = model.reverse_log_probs(xt, tt).exp()                          # (N, L, S)
            p_x0 = model.x0_log_probs(xt, tt).exp()                                 # (N, L, S)
        bayes = torch.zeros_like(kernel)
        for j in range(DIFF_V):  # sum_j p_th(x_0 = j | x_t) q(x_{t-1} | x_t, x_0 = j) at masked slots
            bayes += p_x0[..., j:j + 1] * c.posterior(torch.full_like(xt, j), xt, tt).double()
        # kept: x_0 = x_t
        bayes = torch.where((xt == c.mask)[..., None], bayes, c.posterior(xt, xt, tt).double())
        torch.testing.assert_close(kernel, bayes, rtol=1e-6, atol=1e-6)  # the posterior is float32
        assert (p_x0[..., c.not_data] == 0).all()


@pytest.mark.parametrize("kind", ["x0", "gate", "gate-uniform-transformer"])
def test_dlm142_training_and_evaluation_estimates_are_unbiased_for_the_exact_bound(kind):
    model = tiny_diffusion(kind)
    x = data_captions()                                                             # (9, L)
    exact = torch.stack([exact_bound_terms(model, x0).sum() for x0 in x]) + model.corruption.prior_kl(x)
    copies = 800
    with torch.no_grad():
        torch.manual_seed(0)
        train = torch.cat([model.loss(x.repeat(8, 1)).view(8, -1) for _ in range(copies // 8)])  # (copies, 9)
        full, extra = dlm142_diffusion.evaluate(model, x.repeat(copies, 1),
                                                dlm142_diffusion.Config(eval_batch_size=500), CPU)
        few, few_extra = dlm142_diffusion.evaluate(model, x.repeat(copies, 1),
                                                   dlm142_diffusion.Config(eval_batch_size=500, val_steps=2),
                                                   CPU, full=False)
    bound, few_bound = extra.pop("bound"), few_extra["bound"]
    assert bound == "-elbo" and few_bound.startswith("-elbo, estimated from 2 of 4 steps")
    for draws in (train, full.view(copies, -1), few.view(copies, -1)):  # each row: independent draws
        error = (draws.mean(0) - exact).abs()
        assert (error < 4.5 * draws.std(0) / copies ** 0.5 + 1e-6).all(), (error, draws.std(0))
    # the per-step terms (total and split) add up to the bound; one draw for all: same numbers every time
    per_step = torch.tensor(extra["per_step"])
    assert per_step.sum().item() == pytest.approx(full.mean().item(), rel=1e-6)
    split = sum(torch.tensor(extra[f"per_step_{name}"]) for name in dlm142_diffusion.TERMS)
    torch.testing.assert_close(split, per_step)
    again, _ = dlm142_diffusion.evaluate(model, x.repeat(copies, 1),
                                         dlm142_diffusion.Config(eval_batch_size=77), CPU)
    torch.testing.assert_close(again, full)


@pytest.mark.parametrize("kind", ["x0", "gate-uniform-dilated", "x0-transformer", "x0-hybrid",
                                  "gate-uniform-hybrid"])
def test_dlm142_sampler_draws_from_the_exact_model_distribution(kind):
    model = tiny_diffusion(kind)
    states, p = exact_diffusion_p(model)
    n = 4000
    draws, _ = dlm142_diffusion.sample(model, n, dlm142_diffusion.Config(), CPU,
                                       torch.Generator().manual_seed(0), slots=DIFF_L)  # (n, L)
    assert not model.corruption.not_data[draws].any()  # no MASK, no <bos>
    index = (draws[:, 0] * model.corruption.states + draws[:, 1])
    counts = torch.bincount(index, minlength=len(states)).double()
    expected = n * p
    seen = expected > 0
    assert counts[~seen].sum() == 0
    chi2 = ((counts[seen] - expected[seen]) ** 2 / expected[seen]).sum().item()
    assert chi2 < 40, chi2  # df <= 8: P(chi2 > 40) < 1e-5 if the sampler is right


def test_dlm142_dilation_cycle_and_flag_errors():
    assert dlm142_diffusion.dilation_cycle("1,2,4,8", 6) == [1, 2, 4, 8, 1, 2]
    assert dlm142_diffusion.dilation_cycle("1", 3) == [1, 1, 1]
    conv = tiny_diffusion("x0-dilated").backbone.convs
    assert [c.dilation[0] for c in conv] == [1, 2] and [c.padding[0] for c in conv] == [1, 2]
    for bad in ("", "1,x", "0", "2,-1"):
        with pytest.raises(dlm142_diffusion.RunError, match="--dilation"):
            dlm142_diffusion.dilation_cycle(bad, 3)
    with pytest.raises(dlm142_diffusion.RunError, match="--heads"):
        dlm142_diffusion.Model(DIFF_V, dlm142_diffusion.Config(backbone="transformer", embed=10, heads=4))
    with pytest.raises(dlm142_diffusion.RunError, match="--param gate"):
        dlm142_diffusion.Model(DIFF_V, dlm142_diffusion.Config(noise="uniform"))
    with pytest.raises(dlm142_diffusion.RunError, match="--no-copy"):
        dlm142_diffusion.Model(DIFF_V, dlm142_diffusion.Config(copy=False))


def test_dlm142_headline_command_is_the_notes_network():
    cfg, given = common.parse_flags(dlm142_diffusion.Config, "",
                                    ["--embed", "50", "--depth", "11", "--lr", "1e-4"])
    assert ((cfg.backbone, cfg.embed, cfg.depth, cfg.kernel, cfg.dilation, cfg.lr)
            == ("cnn", 50, 11, 5, "1", 1e-4))
    assert given == {"embed", "depth", "lr"}
    cfg, _ = common.parse_flags(dlm142_diffusion.Config, "",
                                ["--param", "gate", "--no-copy", "--noise", "uniform", "--time-cond"])
    assert (cfg.param, cfg.copy, cfg.noise, cfg.time_cond) == ("gate", False, "uniform", True)
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        common.parse_flags(dlm142_diffusion.Config, "", ["--depth", "0"])


def test_dlm142_test_record_splits_the_bound_by_step_and_term(finished):
    test = [r for r in read_metrics(finished["dlm142_diffusion"]) if r["kind"] == "test"][-1]
    assert test["bound"] == "-elbo" and len(test["per_step"]) == 8
    assert test["nlpps"] == pytest.approx(sum(test["per_step"]), rel=1e-4)  # prior term is 0: a_T = 0
    assert sum(test["per_step_reveal"]) == 0 == sum(test["per_step_copy"])  # x0: only the token costs
    assert test["per_step_token"] == pytest.approx(test["per_step"])
    assert (finished["dlm142_diffusion"] / "noise_levels.png").stat().st_size > 0


def test_dlm142_gate_run_with_uniform_noise_and_the_x0_uniform_refusal(tiny_data, tmp_path):
    base = tiny_args("dlm142_diffusion", tiny_data, tmp_path, "--epochs", "1")
    out = call_ok("dlm142_diffusion", base + ["--param", "gate", "--noise", "uniform",
                                              "--backbone", "transformer", "--heads", "3"])
    test = [r for r in read_metrics(tmp_path / "dlm142_diffusion" / "default") if r["kind"] == "test"][-1]
    assert sum(test["per_step_reveal"]) == 0 and sum(test["per_step_copy"]) > 0
    assert "<bos>" not in out
    code, _, err = call("dlm142_diffusion", base + ["--noise", "uniform", "--run-name", "bad"])
    assert_one_line_error(code, err, "--param x0", "--param gate")


# ----------------------------------------------------------------------------- the attention backbones
def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_dlm142_rotary_scores_depend_on_the_offset_only_and_keep_lengths():
    torch.manual_seed(0)
    attention = dlm142_diffusion.RotaryAttention(16, heads=2)
    q, k = torch.randn(2, 8), torch.randn(2, 8)                             # one query and one key, 2 heads
    cos, sin = attention.cos, attention.sin                                  # (L, Dh/2)

    def at(x, i):                                                            # x rotated to slot i
        return dlm142_diffusion.rotate(x[None, :, None], cos[i:i + 1], sin[i:i + 1])[0, :, 0]

    score = lambda i, j: (at(q, i) * at(k, j)).sum(-1)  # noqa: E731       # (2,) per head
    for i, j, shift in [(3, 1, 10), (0, 7, 50), (5, 5, 94)]:
        torch.testing.assert_close(score(i, j), score(i + shift, j + shift))
    assert not torch.allclose(score(3, 1), score(3, 2))                      # but the offset matters
    torch.testing.assert_close(at(q, 40).norm(dim=-1), q.norm(dim=-1))      # a rotation
    torch.testing.assert_close(at(q, 0), q)


@pytest.mark.parametrize("backbone", ["transformer", "hybrid"])
def test_dlm142_attention_backbones_see_every_slot_and_the_cnn_does_not(backbone):
    t = torch.ones(1, dtype=torch.long)
    x = torch.randint(3, 92, (1, data.SLOTS))
    y = x.clone()
    y[0, 0] = 3 if x[0, 0] != 3 else 4                                       # a change at slot 0 ...
    for name, reaches in [(backbone, True), ("cnn", False)]:  # the CNN E96 D6 k5 reaches 12 slots each way
        torch.manual_seed(0)
        model = dlm142_diffusion.Model(92, dlm142_diffusion.Config(backbone=name, embed=32,
                                                                   depth=2 if name != "cnn" else 6))
        with torch.no_grad():
            changed = model.logits(x, t)[0] != model.logits(y, t)[0]        # (1, L, S)
        assert changed[0, -1].any() == reaches                               # ... at the last slot
        reached = changed[0].any(-1)                                         # (L,)
        if name == "cnn":
            assert reached[:13].all() and not reached[13:].any()
        else:
            assert reached.all()


def test_dlm142_attention_parameter_counts_and_flags():
    cnn = dlm142_diffusion.Model(92, dlm142_diffusion.Config())
    tf = dlm142_diffusion.Model(92, dlm142_diffusion.Config(backbone="transformer", embed=80, depth=3))
    hybrid = dlm142_diffusion.Model(92, dlm142_diffusion.Config(backbone="hybrid", embed=80, depth=3))
    assert 0.8 < n_params(tf) / n_params(cnn) < 1.25
    # a hybrid block is a transformer block plus the CNN's conv (E^2 k weights + E biases)
    assert n_params(hybrid) - n_params(tf) == 3 * (80 * 80 * 5 + 80)
    no_mlp = dlm142_diffusion.Model(92, dlm142_diffusion.Config(backbone="hybrid", embed=80, depth=3,
                                                                mlp_ratio=0))
    assert n_params(hybrid) - n_params(no_mlp) == 3 * (2 * 80 + 80 * 320 + 320 + 320 * 80 + 80)
    # the fixed angles stay out of checkpoints
    assert not any("cos" in k or "sin" in k for k in hybrid.state_dict())
    with pytest.raises(dlm142_diffusion.RunError, match="--heads"):
        dlm142_diffusion.Model(DIFF_V, dlm142_diffusion.Config(backbone="hybrid", embed=10, heads=4))
    with pytest.raises(dlm142_diffusion.RunError, match="even"):
        # Dh = 3: no pairs to rotate
        dlm142_diffusion.Model(DIFF_V, dlm142_diffusion.Config(backbone="transformer", embed=12, heads=4))
    cfg, _ = common.parse_flags(dlm142_diffusion.Config, "", ["--backbone", "hybrid", "--mlp-ratio", "0"])
    assert (cfg.backbone, cfg.mlp_ratio) == ("hybrid", 0)


@pytest.mark.parametrize("backbone", ["transformer", "hybrid"])
def test_dlm142_a_tiny_attention_run_trains_evaluates_and_samples(backbone, tiny_data, tmp_path):
    call_ok("dlm142_diffusion", tiny_args("dlm142_diffusion", tiny_data, tmp_path, "--epochs", "1",
                                          "--backbone", backbone, "--heads", "2"))
    test = [r for r in dlm142_diffusion.read_metrics(tmp_path / "dlm142_diffusion" / "default")
            if r["kind"] == "test"][-1]
    assert test["bound"] == "-elbo" and len(test["per_step"]) == 8 and math.isfinite(test["nlpps"])


# ============================================================================= compare.py
def fake_run(root, script, name, values, vocab=("<pad>", "a"), epochs=20, bound="exact",
             data_label="multi30k", per_step=None, **args):
    run_dir = root / script / name
    run_dir.mkdir(parents=True)
    (run_dir / "args.json").write_text(json.dumps({"epochs": epochs, "lr": 0.5, "run_name": name, **args}))
    records = [dict(kind="train", step=1, epoch=0.5, nlpps=99.0, seq_per_s=123.0),
               dict(kind="val", step=2, epoch=1.0, nlpps=90.0, bpc=1.0, bound=bound),
               dict(kind="test", step=2, epoch=epochs, nlpps=sum(values) / len(values), bpc=1.5, bound=bound,
                    data=data_label, per_step=per_step)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "test_nlpps.txt").write_text("".join(f"{v}\n" for v in values))
    dlm100_rnn.save_checkpoint(dict(script=script, model={"w": torch.zeros(7), "buffer": torch.zeros(1)},
                                    n_params=7, vocab=list(vocab)), run_dir / "ckpt_best.pt")
    return str(run_dir)


def test_compare_table_winners_and_refusals(tiny_data, tmp_path):
    n = 31
    a = fake_run(tmp_path, "dlm100_rnn", "a", [50.0] + [10.0 + 0.01 * i for i in range(1, n)])
    # run flags are not hyper-parameters, epochs is
    b = fake_run(tmp_path, "dlm142_diffusion", "b", [20.0] * 3 + [1.0] + [20.0] * (n - 4), bound="elbo",
                 epochs=0.34, max_steps=5, per_step=[1.0, 2.0])
    out = tmp_path / "cmp"
    text = compare.compare([a, b, "--data-dir", str(tiny_data), "--out", str(out), "--top", "1"])
    # parameters, not buffers
    assert "| dlm100_rnn/a | lr=0.5 | 7 | 20 | 11.44 | 1.5000 | exact | 123 |" in text
    assert "| dlm142_diffusion/b | epochs=0.34 lr=0.5 | 7 | 0.34 |" in text  # fractional epochs shown
    assert "dlm100_rnn/a wins on 93.5% of the captions, dlm142_diffusion/b on 6.5%" in text
    captions = data.read_captions(tiny_data / "test_2016_flickr.en.gz")
    assert f"- 10.0 / 20.0  `{captions[1]}`" in text   # the largest difference in a's favour
    assert f"- 20.0 / 50.0  `{captions[0]}`" in text   # ... and in b's
    assert (out / "comparison.md").read_text() == text and (out / "comparison.png").stat().st_size > 0

    loser = fake_run(tmp_path, "dlm100_rnn", "loser", [100.0] * n)  # wins on no caption: no "best" list
    text = compare.compare([a, loser, "--data-dir", str(tiny_data), "--out", str(out)])
    assert "dlm100_rnn/loser on 0.0%" in text and "Captions where dlm100_rnn/loser is best" not in text

    short = fake_run(tmp_path, "dlm100_rnn", "short", [1.0] * (n - 1))
    with pytest.raises(compare.UserError, match="do not line up"):
        compare.compare([a, short, "--data-dir", str(tiny_data), "--out", str(out)])
    other = fake_run(tmp_path, "dlm100_rnn", "other", [1.0] * n, vocab=("<pad>", "b"))
    with pytest.raises(compare.UserError, match="different vocabularies"):
        compare.compare([a, other, "--data-dir", str(tiny_data), "--out", str(out)])
    for label, flags in (("custom data", {"custom_data": True}), ("spaces removed", {"spaces": False})):
        odd = fake_run(tmp_path, "dlm107_vae_seg", label.replace(" ", "_"), [1.0] * n, data_label=label,
                       **flags)
        with pytest.raises(compare.UserError, match=f"scored on {label}.*not comparable"):
            compare.compare([a, odd, "--data-dir", str(tiny_data), "--out", str(out)])
    proc = subprocess.run([sys.executable, str(HERE / "compare.py"), a, str(tmp_path / "nothing")],
                          capture_output=True, text=True, cwd=HERE)
    assert_one_line_error(proc.returncode, proc.stderr, "nothing is not a folder")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(compare.UserError, match="nothing has no args.json"):
        compare.compare([a, str(tmp_path / "nothing"), "--out", str(out)])
    with pytest.raises(compare.UserError, match="at least two different run folders"):
        compare.compare([a, a + "/", "--out", str(out)])


def test_compare_survives_a_torn_record_and_refuses_other_files_and_a_file_as_out(tiny_data, tmp_path):
    n = 31
    a = fake_run(tmp_path, "dlm100_rnn", "a", [10.0] * n, custom_data=True, data_sha256={"test": "1"})
    b = fake_run(tmp_path, "dlm100_rnn", "b", [11.0] * n, custom_data=True, data_sha256={"test": "1"})
    with open(Path(b) / "metrics.jsonl", "a") as f:  # a hand-edited record, and a run killed while it
        f.write('{"kind": "test"}\n[1]\n{"kind": "test", "step": 8, "epoch": 2, "nlpps": "x", "bpc": 1, '
                '"bound": "exact"}\n{"kind": "train", "ste')  # wrote one: not records, left out
    text = compare.compare([a, b, "--data-dir", str(tiny_data), "--out", str(tmp_path / "cmp")])
    assert "dlm100_rnn/a wins on 100.0%" in text
    for bad in ("nan", "-1.0", "1e999"):  # a caption's nats are finite and never negative
        (Path(b) / "test_nlpps.txt").write_text("".join(f"{v}\n" for v in [11.0] * (n - 1) + [bad]))
        with pytest.raises(compare.UserError, match=f"line {n} is not a caption's nats"):
            compare.compare([a, b, "--data-dir", str(tiny_data), "--out", str(tmp_path / "cmp")])
    (Path(b) / "test_nlpps.txt").write_text("".join(f"{v}\n" for v in [11.0] * n))
    with open(Path(b) / "metrics.jsonl", "a") as f:  # a test record of another evaluation than the file's
        f.write("\n" + json.dumps(dict(kind="test", step=2, epoch=20, nlpps=9.5, bpc=1.5, bound="exact")))
    with pytest.raises(compare.UserError, match="NLPPS 9.5000 is not the mean of test_nlpps.txt, 11.0000"):
        compare.compare([a, b, "--data-dir", str(tiny_data), "--out", str(tmp_path / "cmp")])
    b = fake_run(tmp_path, "dlm100_rnn", "b2", [11.0] * n, custom_data=True, data_sha256={"test": "1"})
    other = fake_run(tmp_path, "dlm100_rnn", "other", [11.0] * n, custom_data=True, data_sha256={"test": "2"})
    with pytest.raises(compare.UserError, match="different data files"):
        compare.compare([a, other, "--data-dir", str(tiny_data), "--out", str(tmp_path / "cmp")])
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(compare.UserError, match="cannot write to --out"):
        compare.compare([a, b, "--data-dir", str(tiny_data), "--out", str(blocker)])


# ----------------------------------------------------------------------- compare.py: budgets and run control
BUDGET_CAPTIONS = 6  # test captions of the budget runs
OLD_LOG = ("{script} | new run | 20 epochs | 212,896 parameters | 29,000 training captions | cpu | "
           "290 steps/epoch | run folder out/{script}/{name}\nstep 1 | epoch 0.00 | train nlpps 440.04\n")


@pytest.fixture
def test_dir(tmp_path):
    """A data folder holding only the test file, BUDGET_CAPTIONS captions."""
    folder = tmp_path / "multi30k"
    folder.mkdir()
    with gzip.open(folder / data.FILES["test"], "wt", encoding="utf-8") as f:
        f.write("".join(f"A dog runs {i} times.\n" for i in range(BUDGET_CAPTIONS)))
    return folder


def budget_run(root, script, name, nlpps, tests=({},), log=None, lines=None):
    """A finished run folder: every test caption scored nlpps; a test record per dict in tests (its extra
    fields, e.g. n_params and train_seconds); log.txt if given; test_nlpps.txt's lines if given."""
    run_dir = root / "out" / script / name
    run_dir.mkdir(parents=True)
    (run_dir / "args.json").write_text(json.dumps({"epochs": 20, "run_name": name}))
    records = [dict(kind="train", step=1, epoch=0.5, nlpps=99.0, seq_per_s=100.0),
               dict(kind="val", step=2, epoch=1.0, nlpps=90.0, bpc=1.0, bound="exact")]
    test = dict(kind="test", step=2, epoch=20, nlpps=nlpps, bpc=1.0, bound="exact", data="multi30k")
    records += [{**test, **extra} for extra in tests]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "test_nlpps.txt").write_text("".join(f"{v}\n" for v in lines or [nlpps] * BUDGET_CAPTIONS))
    torch.save(dict(script=script, model={"w": torch.zeros(7)}, n_params=7, vocab=["<pad>", "a"]),
               run_dir / "ckpt_best.pt")
    if log is not None:
        (run_dir / "log.txt").write_text(log.format(script=script, name=name))
    return str(run_dir)


def budget_runs(root):
    """Six runs of four scripts: with the new fields, wall-clock time only, log.txt only, neither."""
    return [
        budget_run(root, "dlm100_rnn", "big", 30.0,  # an --eval-only record after training lacks the fields
                 tests=[dict(n_params=200_000, train_seconds=1500.0, train_cpu_seconds=1200.0), {}]),
        budget_run(root, "dlm100_rnn", "small", 40.0,  # CPU time, not the wall-clock time beside it
                   tests=[dict(n_params=1000, train_seconds=3000.0, train_cpu_seconds=600.0)]),
        budget_run(root, "dlm142_diffusion", "d", 35.0,
                   tests=[dict(n_params=50_000, train_cpu_seconds=3000.0)]),
        budget_run(root, "dlm142_diffusion", "walled", 36.0,  # wall-clock only: out of the time panel
                   tests=[dict(n_params=60_000, train_seconds=3000.0)]),
        budget_run(root, "dlm107_vae_seg", "old", 45.0, log=OLD_LOG),
        budget_run(root, "dlm123_gmmvae", "bare", 50.0),  # no log.txt either: the checkpoint's count
    ]


def test_budget_table_figure_and_the_runs_left_out_of_the_time_panel(test_dir, tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    text = compare.compare(budget_runs(tmp_path) + ["--data-dir", str(test_dir), "--out", str(out)])
    rows = ["| run | script | parameters | CPU-minutes | test NLPPS |",
            "| small | dlm100_rnn | 1,000 | 10.0 | 40.00 |",
            "| big | dlm100_rnn | 200,000 | 20.0 | 30.00 |",
            "| old | dlm107_vae_seg | 212,896 | – | 45.00 |",
            "| bare | dlm123_gmmvae | 7 | – | 50.00 |",
            "| d | dlm142_diffusion | 50,000 | 50.0 | 35.00 |",
            "| walled | dlm142_diffusion | 60,000 | – | 36.00 |",
            "Left out of the time panel (no train_cpu_seconds in a test record): "
            "dlm107_vae_seg/old, dlm123_gmmvae/bare, dlm142_diffusion/walled"]
    lines = text.splitlines()
    assert all(row in lines for row in rows), text
    assert [lines.index(row) for row in rows] == sorted(lines.index(row) for row in rows)  # in this order
    assert (out / "comparison.md").read_text() == text
    import matplotlib.image
    assert matplotlib.image.imread(out / "budget.png").shape[:2] == (450, 1300)

    # What the figure shows: a line per script, joined in order of x; untimed runs only in the size panel.
    import matplotlib.pyplot as plt
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    compare.plot_budget(compare.costs_of([compare.load_run(p) for p in budget_runs(tmp_path / "again")]), out)
    (ax_p, ax_t), = [fig.axes for fig in figures]
    by_size = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax_p.lines}
    by_time = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax_t.lines}
    assert by_size == {"dlm100_rnn": ([1000, 200_000], [40.0, 30.0]), "dlm107_vae_seg": ([212_896], [45.0]),
                       "dlm123_gmmvae": ([7], [50.0]), "dlm142_diffusion": ([50_000, 60_000], [35.0, 36.0])}
    assert by_time == {"dlm100_rnn": ([10.0, 20.0], [40.0, 30.0]), "dlm142_diffusion": ([50.0], [35.0])}
    assert ax_p.get_xscale() == "log"
    assert sorted(t.get_text() for t in ax_t.texts) == ["big", "d", "small"]  # each point named lightly
    plt.close("all")


def test_parameters_from_the_test_record_else_the_first_line_of_log_txt(tmp_path):
    folder = Path(budget_run(tmp_path, "dlm100_rnn", "old", 40.0, log=OLD_LOG))
    assert compare.params_from_log(folder) == 212_896
    (folder / "log.txt").write_text("dlm100_rnn | resumed at step 9 | 8 epochs | 1,226,912 parameters |\n")
    assert compare.params_from_log(folder) == 1_226_912
    (folder / "log.txt").write_text("step 1 | epoch 0.00 | train nlpps 440.04\n212,896 parameters |\n")
    assert compare.params_from_log(folder) is None  # only the first line, and only that field
    (folder / "log.txt").unlink()
    assert compare.params_from_log(folder) is None

    new = budget_run(tmp_path, "dlm100_rnn", "new", 40.0, log=OLD_LOG,
                   tests=[dict(n_params=5, train_cpu_seconds=6.0)])
    (cost,) = compare.costs_of([compare.load_run(new)])
    assert (cost.params, cost.minutes) == (5, 0.1)  # the record wins over the log


def test_a_garbage_line_in_test_nlpps_is_one_line_naming_file_and_line(test_dir, tmp_path):
    good = budget_run(tmp_path, "dlm100_rnn", "good", 10.0)
    bad = budget_run(tmp_path, "dlm100_rnn", "bad", 10.0, lines=["10.0", "", "11.5", "1O.0", "12"])
    with pytest.raises(compare.UserError, match=r"bad/test_nlpps.txt line 4 is not a number: '1O.0'"):
        compare.compare([good, bad, "--data-dir", str(test_dir), "--out", str(tmp_path / "cmp")])
    proc = subprocess.run([sys.executable, str(HERE / "compare.py"), good, bad, "--data-dir", str(test_dir),
                           "--out", str(tmp_path / "cmp")], capture_output=True, text=True, cwd=HERE)
    assert_one_line_error(proc.returncode, proc.stderr, f"{bad}/test_nlpps.txt line 4")


def make_read_only(folder, monkeypatch):
    """chmod a-w. Root ignores that, so for root the refusal the kernel gives anyone else is imitated at
    open() and mkdir() for paths under the folder."""
    folder.chmod(0o555)
    if os.geteuid() != 0:
        return

    def under(path):
        return isinstance(path, (str, os.PathLike)) and folder.resolve() in Path(path).resolve().parents

    def refuse(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    real_open, real_mkdir = builtins.open, os.mkdir

    def guarded_open(file, mode="r", *args, **kwargs):
        if under(file) and set(mode) & set("wax+"):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if under(path):
            refuse(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)  # what pathlib's write_text calls
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)


@pytest.mark.parametrize("inside", [False, True], ids=["out-is-read-only", "out-in-read-only-folder"])
def test_out_in_a_read_only_folder_is_one_line_naming_it(test_dir, tmp_path, monkeypatch, inside):
    runs = [budget_run(tmp_path, "dlm100_rnn", name, v) for name, v in (("a", 10.0), ("b", 11.0))]
    locked = tmp_path / "locked"
    locked.mkdir()
    out = locked / "cmp" if inside else locked
    make_read_only(locked, monkeypatch)
    try:
        with pytest.raises(SystemExit) as exit_:
            compare.main(runs + ["--data-dir", str(test_dir), "--out", str(out)])
    finally:
        locked.chmod(0o755)
    assert_one_line_error(1, exit_.value.code, f"compare: error: cannot write to --out {out}: Permission")
    assert list(locked.iterdir()) == []


def test_ctrl_c_while_comparing_is_one_line(test_dir, tmp_path, monkeypatch, capsys):
    runs = [budget_run(tmp_path, "dlm100_rnn", name, v) for name, v in (("a", 10.0), ("b", 11.0))]

    def interrupt(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(compare, "plot_budget", interrupt)
    try:
        with pytest.raises(SystemExit) as exit_:
            compare.main(runs + ["--data-dir", str(test_dir), "--out", str(tmp_path / "cmp")])
    except KeyboardInterrupt:  # left uncaught it would stop pytest itself
        pytest.fail("Ctrl-C went through compare.main")
    assert exit_.value.code == 130 and capsys.readouterr().err == "compare: interrupted\n"


# compare.py run as a script whose `import torch` is slowed down (and says so): the test presses Ctrl-C there.
STALLED_IMPORT = """
import importlib.abc, runpy, sys, time
class Stall(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print("importing torch", file=sys.stderr, flush=True)
            time.sleep(1)
sys.meta_path.insert(0, Stall())
sys.argv[0] = "compare.py"
runpy.run_path("compare.py", run_name="__main__")
"""


def test_ctrl_c_while_torch_loads_is_one_line(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", STALLED_IMPORT, "a", "b"], cwd=HERE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr.readline() == "importing torch\n"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert (proc.returncode, err) == (130, "compare: interrupted\n")


# --------------------------------------------------------------------------- runs made on a plain-text folder
# the test lines: 6 sequences (BUDGET_CAPTIONS) once the blank lines are skipped
PLAIN_TEST = ["a cat sits on a mat.", "", "two dogs run.", "   ", "a bird sings in a tree.", "", "the end.",
              "one more line here.", "last."]


@pytest.fixture
def plain_dir(tmp_path):
    """A plain-text data folder (test split gzipped) whose test file holds blank lines."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "train.txt").write_text("a cat sits.\n\ntwo dogs run.\n", encoding="utf-8")
    (folder / "valid.txt").write_text("a dog.\n", encoding="utf-8")
    with gzip.open(folder / "test.txt.gz", "wt", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in PLAIN_TEST))
    return folder


def plain_text_run(root, name, folder, lines):
    """fake_run, then args.json and the test record as a script writes them for a plain-text folder."""
    run_dir = Path(budget_run(root, "dlm100_rnn", name, sum(lines) / len(lines), lines=lines))
    _, _, sha256, info = data.load(str(folder))
    assert info["layout"] == "plain text"
    (run_dir / "args.json").write_text(json.dumps({"epochs": 20, "run_name": name, "data_dir": str(folder),
                                                   "custom_data": True, "data_sha256": sha256}))
    records = compare.read_metrics(run_dir)
    for r in records:
        if r["kind"] == "test":
            r["data"] = "custom data"
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(run_dir)


def test_runs_on_a_plain_text_folder_compare_on_its_non_blank_test_lines(plain_dir, test_dir, tmp_path,
                                                                         monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    scored = [line for line in PLAIN_TEST if line.strip()]
    assert len(scored) == BUDGET_CAPTIONS
    a = plain_text_run(tmp_path, "a", plain_dir, [5.0, 1.0, 5.0, 5.0, 5.0, 9.0])  # a best on "two dogs run."
    b = plain_text_run(tmp_path, "b", plain_dir, [5.0] * BUDGET_CAPTIONS)         # b best on "last."
    assert compare.layout_of(compare.load_run(a)) == "plain text"
    out = tmp_path / "cmp"
    text = compare.compare([a, b, "--data-dir", str(plain_dir), "--out", str(out), "--top", "1"])
    assert "- 1.0 / 5.0  `two dogs run.`" in text and "- 5.0 / 9.0  `last.`" in text, text
    assert "| 0–29 | 6 | 5.0 | 5.0 |" in text  # every scored line counted once, none of the blank ones
    monkeypatch.setenv(data.ENV_VAR, str(plain_dir))  # the folder from the environment does as well
    assert compare.compare([a, b, "--out", str(out), "--top", "1"]) == text

    # No folder named: a line saying which to pass (never Multi30k from the cache).
    monkeypatch.delenv(data.ENV_VAR)
    with pytest.raises(compare.UserError, match=f"plain-text folder \\(they recorded --data-dir "
                                                f"{plain_dir}\\): pass --data-dir"):
        compare.compare([a, b, "--out", str(out)])
    # Kept apart from Multi30k runs, published or custom, as before.
    for name, args in (("m30k", {}), ("m30k_custom", {"custom_data": True})):
        other = Path(budget_run(tmp_path, "dlm100_rnn", name, 5.0))
        (other / "args.json").write_text(json.dumps({"epochs": 20, "run_name": name, **args}))
        with pytest.raises(compare.UserError,
                           match="on custom data, plain text: different strings, not comparable"):
            compare.compare([a, str(other), "--data-dir", str(test_dir), "--out", str(out)])
    # A test file changed since the runs scored it: refused, even with the same number of lines.
    with gzip.open(plain_dir / "test.txt.gz", "wt", encoding="utf-8") as f:
        f.write("".join(line.upper() + "\n" for line in PLAIN_TEST))
    with pytest.raises(compare.UserError, match="test.txt.gz is not the test file dlm100_rnn/a scored"):
        compare.compare([a, b, "--data-dir", str(plain_dir), "--out", str(out)])
    # ... and through main(): one line.
    with pytest.raises(SystemExit) as exit_:
        compare.main([a, b, "--data-dir", str(plain_dir), "--out", str(out)])
    assert_one_line_error(1, exit_.value.code, "compare: error:", "SHA-256 differs")

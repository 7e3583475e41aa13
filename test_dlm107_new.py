"""Tests of dlm107_vae_seg.py, the segmental language model (to be merged into test_models.py).

The exact checks use a tiny model in float64: the characters UNK, 3 and 4 (3 plays the space), captions of at
most 4 characters (5 slots), pieces of at most 3 characters, a lexicon of a few 2..3-character entries, so
every caption and every segmentation can be enumerated.
"""
import contextlib
import dataclasses
import io
import itertools
import json
from pathlib import Path

import pytest
import torch

import common
import data
import dlm107_vae_seg as seg
from test_models import make_captions, tiny_data  # noqa: F401 (tiny_data: a fixture)


def call(args):
    """main(args) in this process: (exit status, stdout, stderr)."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            seg.main(args)
        except SystemExit as e:
            code = e.code
    if isinstance(code, str):
        err.write(code + "\n")
        code = 1
    return code or 0, out.getvalue(), err.getvalue()


def assert_one_line_error(code, err, *words):
    assert code != 0
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert all(w in err for w in words), err

SPACE, CHARS, SLOTS, K = 3, (data.UNK, 3, 4), 5, 3
LEXICON = [(4, 4), (3, 4), (4, 3, 4), (2, 4, 4)]


def tiny_model(lexicon=True, **kw):
    torch.manual_seed(0)
    cfg = seg.Config(embed=8, piece_embed=5, max_piece=K, lex_min=2, lex_max=3, lex_components=3, **kw)
    lex = torch.tensor([list(e) + [data.PAD] * (3 - len(e)) for e in LEXICON] if lexicon else [], dtype=torch.long)
    model = seg.Model(len(CHARS) + 2, SPACE, lex.view(-1, 3), cfg).double()
    with torch.no_grad():  # sharper distributions than the initial ones, so the checks are not near-uniform
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.7)
    return model


def caption(chars, slots=SLOTS):
    return torch.tensor([list(chars) + [data.PAD] * (slots - len(chars))])


def all_captions(slots=SLOTS):
    return [c for n in range(slots) for c in itertools.product(CHARS, repeat=n)]


def segmentations(n, slots=SLOTS, max_piece=K):
    """Every segmentation of n characters into pieces of 1..max_piece: (Z, slots) bool, a cut after character t."""
    out = []
    for inner in itertools.product([False, True], repeat=max(n - 1, 0)):
        z = list(inner) + [True] * (n > 0)
        ends = [t for t, c in enumerate(z) if c]
        if all(b - a <= max_piece for a, b in zip([-1] + ends, ends)):
            out.append(z + [False] * (slots - n))
    return torch.tensor(out).view(-1, slots)


def enumerated_log_joint(scores, closing, n, z):
    """log p(x, z) summed piece by piece from the (start, length) scores, independently of seg.log_joint."""
    total, start = closing[0, n].item(), 0
    for t in range(n):
        if z[t]:
            total += scores[0, start, t - start].item()
            start = t + 1
    return total


# ----------------------------------------------------------------------------- exact inference
@pytest.mark.parametrize("lexicon", [True, False])
def test_chart_viterbi_and_cut_marginals_equal_enumeration_and_p_sums_to_one(lexicon):
    model, total = tiny_model(lexicon), 0.0
    for chars in all_captions():
        x, n = caption(chars), len(chars)
        with torch.no_grad():
            log_px, (scores, ends, closing, _) = model.log_prob(x)
            best = seg.chart(ends, torch.tensor([n]), viterbi=True)[1]
        Z = segmentations(n)
        joint = torch.tensor([enumerated_log_joint(scores, closing, n, z) for z in Z], dtype=torch.float64)
        torch.testing.assert_close(seg.log_joint(ends, closing, torch.tensor([n]), Z[:, None])[:, 0], joint)
        assert log_px.item() == pytest.approx(torch.logsumexp(joint, 0).item(), abs=1e-10)
        assert torch.equal(best[0], Z[joint.argmax()])
        total += log_px.exp().item()
        if n == 0:
            continue
        posterior = (joint - log_px).exp()                   # p(z | x) by enumeration
        cut_probs = seg.cut_probabilities(scores, torch.tensor([n]))[0]
        torch.testing.assert_close(cut_probs, (posterior[:, None] * Z).sum(0))
    # forced ends included (pieces of K characters, captions of SLOTS-1): no mass lost, none invented
    assert total == pytest.approx(1.0, abs=1e-10)


def test_lexicon_really_adds_mass_and_is_renormalised_near_the_end():
    with_lex, without = tiny_model(True), tiny_model(False)
    x = caption((4, 3, 4, 4))
    with torch.no_grad():
        scores, closing = with_lex.piece_scores(x)
        plain, _ = without.piece_scores(x)
    assert (scores[0, 0, 1] - plain[0, 0, 1]).abs() > 1e-3  # "43" is an entry: both branches count
    # a piece starting after 3 characters has room for 1: no entry fits, so g = 0 there (nothing renormalised away)
    log_pi, log_g, log_not_g = with_lex.lexicon_log_probs(torch.zeros(2, 8, dtype=torch.float64), torch.tensor([1, 3]))
    assert log_g[0] < -1e8 and log_not_g[0] == 0 and log_g[1] > -50


def test_sampler_draws_captions_and_cuts_with_the_probabilities_the_chart_scores():
    model, n = tiny_model(), 20000
    x, cuts = seg.sample(model, n, 1.0, torch.device("cpu"), torch.Generator().manual_seed(0), slots=SLOTS)
    unique, counts = torch.cat([x, cuts.long()], 1).unique(dim=0, return_counts=True)
    with torch.no_grad():
        scores, closing = model.piece_scores(unique[:, :SLOTS])
        log_p = seg.log_joint(seg.by_end(scores), closing, data.num_chars(unique[:, :SLOTS]), unique[:, SLOTS:].bool())
    assert log_p.exp().sum() > 0.99
    torch.testing.assert_close(counts / n, log_p.exp(), atol=0.01, rtol=0, check_dtype=False)


def test_lexicon_is_the_most_frequent_substrings_and_the_trie_finds_them():
    x = torch.stack([caption((4, 3, 4, 4), 6)[0], caption((4, 3, 4), 6)[0], caption((3, 4), 6)[0]])
    cfg = seg.Config(lexicon=3, lex_min=2, lex_max=3, max_piece=3)
    lex = seg.build_lexicon(x, 3, 2, 3)
    # counts: 34 x3, 43 x2, 434 x2, 344 x1, 44 x1: the top 3, stored shortest first
    assert lex.tolist() == [[3, 4, 0], [4, 3, 0], [4, 3, 4]]
    model = seg.Model(5, SPACE, lex, dataclasses.replace(cfg, embed=4, piece_embed=4))
    ids = model.lexicon_ids(torch.tensor([[4, 3, 4], [3, 4, 4], [4, 4, 3]]))
    assert ids.tolist() == [[-1, 1, 2], [-1, 0, -1], [-1, -1, -1]]


# ----------------------------------------------------------------------------- reinforce
def exact_elbo_terms(model, x):
    Z = segmentations(int(data.num_chars(x)), x.shape[1])
    scores, closing = model.piece_scores(x)
    cuts, log_q = model.draw_cuts(x, len(Z), drawn=Z.unsqueeze(1))
    assert torch.equal(cuts[:, 0], Z)  # a valid segmentation needs no forced cut added
    return Z, seg.log_joint(seg.by_end(scores), closing, data.num_chars(x), cuts)[:, 0], log_q[:, 0]


@pytest.mark.parametrize("parser", ["causal", "bi"])
def test_elbo_is_below_log_p_for_every_caption(parser):
    model, gaps = tiny_model(inference="reinforce", parser=parser), []
    for chars in all_captions():
        x = caption(chars)
        _, log_p, log_q = exact_elbo_terms(model, x)
        assert log_q.exp().sum().item() == pytest.approx(1.0, abs=1e-12)  # q: a distribution over them
        elbo, log_px = (log_q.exp() * (log_p - log_q)).sum(), model.log_prob(x)[0][0]
        assert log_px.item() == pytest.approx(torch.logsumexp(log_p, 0).item(), abs=1e-10)
        assert elbo <= log_px + 1e-12
        gaps.append((log_px - elbo).item())
    assert max(gaps) > 0.1  # a real gap somewhere: q is not the posterior


def test_reinforce_gradient_matches_the_exact_elbo_gradient():
    # E over all pairs of segmentations of the estimator's gradient == the exact gradient of the ELBO,
    # for q's parameters (REINFORCE) and p's (pathwise) alike.
    model, x = tiny_model(inference="reinforce", samples=2), caption((4, 3, 4, 4))
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


def test_piece_cost_tilts_the_training_sum_only():
    model, x = tiny_model(piece_cost=0.7), caption((4, 3, 4, 4))
    with torch.no_grad():
        scores, closing = model.piece_scores(x)
        Z = segmentations(4)
        tilted = torch.tensor([enumerated_log_joint(scores, closing, 4, z) - 0.7 * z.sum().item() for z in Z],
                              dtype=torch.float64)
        assert model.loss(x).item() == pytest.approx(-torch.logsumexp(tilted, 0).item(), abs=1e-10)
        ev = seg.evaluate(model, x, seg.Config(eval_batch_size=5), torch.device("cpu"))
        assert ev.nll.item() == pytest.approx(-model.log_prob(x)[0].item(), abs=1e-12)  # untilted
        assert ev.nll.item() < model.loss(x).item()


def test_spaces_segmenter_loss_is_the_joint_of_the_cuts_after_the_spaces():
    model, x = tiny_model(segmenter="spaces"), caption((4, 4, 4, 3))
    z = torch.tensor([[False, False, True, True, False]])  # 444 (a forced cut at K = 3) | 3
    scores, closing = model.piece_scores(x)
    expected = enumerated_log_joint(scores, closing, 4, z[0])
    assert model.loss(x).item() == pytest.approx(-expected)


# ----------------------------------------------------------------------------- segmentation scores
def counts_of(text, cut_after, no_spaces_gold=None):
    vocab = data.Vocab(list("abc ."))
    x = torch.tensor([vocab.encode(text)])
    cuts = torch.zeros_like(x, dtype=torch.bool)
    cuts[0, list(cut_after) + [len(text) - 1]] = True
    gold = None if no_spaces_gold is None else torch.zeros_like(cuts).index_fill(1, torch.tensor(no_spaces_gold), True)
    return seg.segmentation_stats(seg.segmentation_counts(x, cuts, vocab.stoi[" "], gold))


def test_boundary_and_word_f1_on_hand_made_examples():
    text = "ab c abc."  # words ab | c | abc. ; spaces at 2 and 4
    s = counts_of(text, [2, 4])        # cuts after both spaces: perfect
    assert (s["precision"], s["recall"], s["f1"], s["word_f1"]) == (1, 1, 1, 1)
    s = counts_of(text, [1, 3])        # cuts before both spaces: perfect too
    assert (s["f1"], s["word_f1"]) == (1, 1)
    s = counts_of(text, [1, 2])        # both sides of the first space: one hit, one false cut; second missed
    assert (s["precision"], s["recall"]) == (0.5, 0.5) and s["cut_rate"] == 2 / 8
    # words: "ab" | "cabc." predicted against ab, c, abc.: one of two right, one of three found
    assert (s["word_precision"], s["word_recall"]) == (0.5, 1 / 3)
    s = counts_of(text, [0, 2, 6])     # a|b |c abc|.: one hit of 3 cuts, 1 of 2 spaces; no word right but none
    assert (s["precision"], s["recall"], s["word_precision"]) == (1 / 3, 0.5, 0)
    # --no-spaces: "abcabc." with the removed spaces after characters 1 and 2
    s = counts_of("abcabc.", [1, 4], no_spaces_gold=[1, 2])
    assert (s["precision"], s["recall"]) == (0.5, 0.5)
    assert (s["word_precision"], s["word_recall"]) == (1 / 3, 1 / 3)  # ab right; abc, .  vs c, abc. wrong


def test_no_spaces_data_round_trips_with_the_removed_spaces(tiny_data):
    vocab, splits = data.load(str(tiny_data), custom=True, no_spaces=True)
    cfg = seg.Config(data_dir=str(tiny_data), spaces=False)
    gold = seg.removed_spaces("val", cfg)
    lines = make_captions(30, 1)
    for ids, g, line in zip(splits["val"], gold, lines):
        text = vocab.decode(ids)
        assert " " not in text and "".join(c + " " * bool(g[t]) for t, c in enumerate(text)) == line


# ----------------------------------------------------------------------------- the script
SEG_TINY = ["--embed", "16", "--piece-embed", "8", "--max-piece", "6", "--lexicon", "50",
            "--lex-components", "4", "--batch-size", "50", "--eval-batch-size", "64",
            "--show-samples", "2", "--log-every", "1", "--iw-samples", "8", "--custom-data", "--lr", "1e-2"]


def records(run_dir, kind):
    return [r for r in common.read_metrics(run_dir) if r["kind"] == kind]


@pytest.mark.parametrize("mode", [[], ["--inference", "reinforce"], ["--segmenter", "spaces"], ["--no-spaces"]])
def test_each_mode_trains_resumes_exactly_evaluates_and_samples(tiny_data, tmp_path, mode):
    base = SEG_TINY + mode + ["--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--epochs", "3"]
    for more in (["straight"], ["split", "--max-steps", "5"], ["split", "--resume"]):
        code, out, err = call(base + ["--run-name", *more])
        assert code == 0, out + err
    root = tmp_path / seg.SCRIPT
    train = [(r["step"], r["nlpps"]) for r in records(root / "straight", "train")]
    assert train == [(r["step"], r["nlpps"]) for r in records(root / "split", "train")]
    assert train[-1][1] < train[0][1]  # the loss falls
    test, = records(root / "straight", "test")
    assert test == {**records(root / "split", "test")[-1], "seconds": test["seconds"]}
    assert test["bound"] == "exact" and test["data"] == ("custom data, spaces removed" if mode == ["--no-spaces"] else "custom data")
    assert all(0 <= test[k] <= 1 for k in ("f1", "word_f1", "cut_rate"))
    if mode == ["--inference", "reinforce"]:
        assert test["elbo_nlpps"] >= test["iw_nlpps"] >= test["nlpps"] - 1e-9 and test["kl_gap"] >= 0
    if mode == ["--segmenter", "spaces"]:
        assert test["joint_nlpps"] >= test["nlpps"]
    assert json.loads((root / "straight" / "args.json").read_text())["spaces"] == (mode != ["--no-spaces"])
    assert (root / "straight" / "segments.png").exists()
    assert torch.load(root / "straight" / "ckpt_last.pt", weights_only=True)["model"]["lexicon"].shape[1] == 6
    code, out, err = call(base + ["--run-name", "straight", "--sample-only", "--show-samples", "3"])
    assert code == 0, err
    assert out.count("[SAMPLE]") == 3 and out.count("[SEGMENT]") == seg.SHOWN
    shown = [l.split("] ", 1)[1].replace("|", "") for l in out.splitlines() if l.startswith("[SEGMENT]")]
    expected = make_captions(30, 2)[:seg.SHOWN]
    assert shown == ([c.replace(" ", "") for c in expected] if mode == ["--no-spaces"] else expected)


def test_bad_flag_combinations_are_one_line_errors(tiny_data, tmp_path):
    base = SEG_TINY + ["--data-dir", str(tiny_data), "--out-dir", str(tmp_path), "--epochs", "1"]
    assert_one_line_error(*call(base + ["--lex-max", "7"])[::2], "--max-piece")
    assert_one_line_error(*call(base + ["--run-name", "b", "--segmenter", "spaces", "--no-spaces"])[::2], "--no-spaces")


def test_a_checkpoints_lexicon_is_the_one_used_after_loading():
    model = tiny_model()  # another lexicon of the same shape, then the checkpoint's weights and lexicon
    other = seg.Model(5, SPACE, torch.tensor([[4, 4, 4], [3, 3, 0], [4, 3, 0], [3, 4, 4]]),
                      dataclasses.replace(seg.Config(), embed=8, piece_embed=5, max_piece=K, lex_min=2, lex_max=3,
                                          lex_components=3)).double()
    other.load_state_dict(model.state_dict())
    x = caption((4, 3, 4, 4))
    torch.testing.assert_close(other.log_prob(x)[0], model.log_prob(x)[0])

"""DLM107: a segmental language model. Its latent variable cuts a caption into pieces: are they the words?

A caption x = c_1 .. c_n (n <= 99 characters, see data.py) is a sequence of pieces, each of 1..K characters
(K = --max-piece), then the empty piece that ends it. A piece starting after i characters depends on the
characters before it, not on how they were cut (Kawakami, Dyer & Blunsom 2019; Sun & Deng 2018):
    h_i = GRU(h_{i-1}, e[c_i]),  h_0 from <bos>                          (context GRU over the characters)
    p_chars(piece | h_i) = prod_t p(c_t | c_<t, s_0 = tanh(W h_i)) * p(<pad> | all of it)   (piece GRU;
                           --piece-context adds U h_i to its input at every character, not at the start only)
    p(piece | h_i) = g(h_i) p_lex(piece | h_i) + (1 - g(h_i)) p_chars(piece | h_i)        (lexical memory)
p_lex is a distribution over the M most frequent substrings of the training captions (--lexicon, lengths
--lex-min..--lex-max; --lex-rank variety: those with the most distinct neighbours), computed from the context
(LexicalMemory; --lex-key, --lex-factor):
    score_e(h_i) = <W h_i, m_e> + b_e,
    p_lex(e | h_i) = p(first char a of e | h_i) softmax_{e' in G_a}(score)_e
where G_a holds the entries that start with a: exact, and only the group of the next character is normalised
at a start (~M / 13 scores instead of M; --no-lex-factor: one softmax over all M entries).
Which windows are entries is found by walking a trie of the lexicon, K tensor lookups per batch.
A piece ends with <pad>; <pad> as its first symbol is the empty piece, which ends the caption. Where a piece
has room for r = min(K, 99 - i) characters only, its end after r characters is forced (costs nothing), p_lex
is renormalised over the entries of <= r characters (g = 0 where none fits), and a caption of 99 characters
ends by force: p is a distribution over exactly the strings of <= 99 characters, and (x, z) <-> pieces is
one-to-one.

Because a piece depends on the characters before it only, the sum over all segmentations z is a chart:
    alpha_0 = 0,  alpha_j = logsumexp_{k=1..K} alpha_{j-k} + log p(c_{j-k+1..j} | h_{j-k})
    log p(x) = alpha_n + log p(empty piece | h_n)                                  (exact; --estimator exact)
max instead of logsumexp gives the most likely segmentation (viterbi_segmentation); the same chart from the
right (beta) gives the posterior probability of every piece, p(piece | x) = exp(alpha_i + log p(piece) +
beta_{i+k} - log p(x)), hence of a cut after each character. --length-penalty lambda adds Kawakami et al.'s
expected length lambda * sum_pieces p(piece | x) |piece|^beta (--length-exponent) to the training loss only.
The piece GRU runs over every (start, length <= K) window at once (an unfold of the caption).
--dropout p drops features of the context GRU's inputs and of h_i in training only, as DLM100's --dropout.

--estimator reinforce trains the same p by the notes' segmentation VAE instead: q(z|x) = a Bernoulli cut
after each character from a GRU (--parser causal|bi), cuts forced as in p;
    log p(x) >= ELBO = E_q[log p(x, z) - log q(z|x)],  KL(q || p(z|x)) = log p(x) - ELBO (logged)
with pathwise gradients for p and REINFORCE (leave-one-out baseline over --train-samples draws) for q.
--segmenter spaces trains log p(x, z = the cuts after every space) (DLM106). Every reported NLPPS is the
exact -log p(x) of the model; -ELBO, the IW bound and the joint of the spaces segmentation are extras.
--no-spaces removes the spaces before encoding (data.py: then the first 99 non-space characters, and no
space in the vocabulary; the papers' protocol; a different string, labelled so) and scores the cuts against
the removed spaces. Boundary F1 with the spaces kept: a cut just before or just after a space marks that word
boundary, cuts and spaces matched one to one; word F1: a word (the characters between two boundaries, spaces
left out) is right when both its ends are.
Results row:  python dlm107_vae_seg.py
              (and --lexicon 0, --estimator reinforce, --segmenter spaces, --no-spaces)
"""
from __future__ import annotations

import signal

signal.signal(signal.SIGINT, signal.SIG_DFL)  # a Ctrl-C while the modules load ends the process quietly
import contextlib
import dataclasses
import fcntl
import hashlib
import io
import itertools
import json
import math
import re
import secrets
import shutil
import sys
import time
import warnings
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data
from common import flag  # flag(default, help, checks): a Config field, one --flag of -h

matplotlib.use("Agg")  # figures are files; no window
warnings.filterwarnings("ignore", "Glyph .* missing from font")  # (a run name in another script: boxes)
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, Ctrl-C is a KeyboardInterrupt

SCRIPT = "dlm107_vae_seg"
SHOWN = 4  # test captions printed with their cuts and drawn in segments.png
NEG = -1e9  # log of an impossible piece: finite, so logsumexp never takes the gradient of -inf - -inf


class RunError(Exception):
    """Bad input, or a stop the user must hear about: main() prints it in one line, never a traceback."""


@dataclasses.dataclass
class Config:
    embed: int = flag(128, "embedding and context GRU width E", low=1, part="the model: context and pieces")
    piece_embed: int = flag(64, "piece-decoder GRU width D", low=1)
    max_piece: int = flag(10, "K: the most characters in a piece (the end after K is forced)", low=1, high=99)
    piece_context: bool = flag(False, "the piece GRU reads U h_i at every character, not only through its "
                               "start state")
    dropout: float = flag(0.0, "dropout on the context GRU's input embeddings and on its states h_i, which "
                          "the pieces and the memory read (training only; 0: off)", low=0, high=0.9)
    lexicon: int = flag(20000, "M: the lexical memory holds M training substrings (0: none)",
                        low=0, part="the model: the lexical memory")
    lexicon_chars: int = flag(0, "M from the corpus instead: one entry per this many training characters "
                              "(88 gives Multi30k's 20,000; a small corpus, a small memory); 0: --lexicon",
                              low=0)
    lex_min: int = flag(2, "shortest substring in the lexicon", low=1)
    lex_max: int = flag(0, "longest substring in the lexicon (<= --max-piece; 0: --max-piece)", low=0)
    lex_rank: str = flag("count", "which substrings are the M entries: the most frequent, or those with the "
                         "most distinct neighbours (accessor variety: the fewer of the distinct characters "
                         "before and after it, each time it touches a caption's edge counting as one more), "
                         "then the most frequent", choices=("count", "variety"))
    lex_key: int = flag(64, "key width of the memory: score_e(h) = <W h, m_e> + b_e with W: E -> this", low=1)
    lex_factor: bool = flag(True, "p_lex = p(first character | h) * a softmax within the entries that start "
                            "with it (exact, ~13x cheaper); --no-lex-factor: one softmax over all the "
                            "entries")
    estimator: str = flag("exact", "the training gradient: of the exact log p(x), or of the ELBO of a "
                          "REINFORCE-trained q(z|x)", choices=("exact", "reinforce"),
                          part="the model: how it is trained (the reported NLPPS is always the exact "
                               "-log p(x))")
    segmenter: str = flag("learned", "learned: sum over (or infer) the cuts; spaces: train on the cuts after "
                          "every space only (DLM106)", choices=("learned", "spaces"))
    piece_cost: float = flag(0.0, "exact: train on log sum_z p(x, z) exp(-piece_cost * pieces in z), which "
                             "favours fewer, longer pieces (the reported NLPPS stays the exact log p(x))",
                             low=0)
    length_penalty: float = flag(0.01, "lambda: add lambda * sum over pieces of p(piece | x) |piece|^beta to "
                                 "the training loss (Kawakami et al.'s expected length; the reported NLPPS "
                                 "stays the exact log p(x))", low=0)
    length_exponent: float = flag(2.0, "beta of --length-penalty", low=0)
    parser: str = flag("causal", "reinforce: q's GRU sees c_<=t (causal) or all of x (bi)",
                       choices=("causal", "bi"))
    train_samples: int = flag(4, "reinforce: segmentations drawn per caption for the ELBO, its gradient, "
                              "val's -ELBO", low=2)
    spaces: bool = flag(True, "--no-spaces removes the spaces (a different string: its NLPPS is labelled "
                        "'spaces removed')", part="the data: the spaces")
    epochs: int = flag(8, "training epochs (a plain --resume keeps the run's; 8, as the memory overfits "
                       "by 20)", low=1, resume_may_change=True,
                       part="optimisation and data (a checkpoint keeps these and the model's)")
    batch_size: int = flag(64, "captions per step", low=1)
    lr: float = flag(4e-3, "peak learning rate", above=0)
    lr_schedule: str = flag("cosine", "cosine decays the lr to 10% of its peak over training",
                            choices=("cosine", "constant"))
    optimizer: str = flag("adamw", "adamw, or rmsprop with eps 0.01 as the original research code",
                          choices=("adamw", "rmsprop"))
    weight_decay: float = flag(0.0, "AdamW weight decay", low=0)
    grad_clip: float = flag(1.0, "clip the gradient norm to this (0: off)", low=0)
    seed: int = flag(0, "seed of the initialisation, the data order and the training noise (evaluation "
                     "noise has its own)", low=0, high=2**31 - 1)
    limit_train: int = flag(0, "train on the first N captions only (0: all), for quick tests", low=0)
    custom_data: bool = flag(False, "use Multi30k files that differ from the published ones on purpose (no "
                             "checksum check; a plain-text corpus is custom data anyway): such runs are "
                             "labelled and compare.py keeps them apart")
    # part=common.RUN_CONTROL opens -h's last section: how a command runs, which a checkpoint never keeps
    device: str = flag("auto", "where to run: auto is CUDA, else MPS, else CPU",
                       choices=("auto", "cuda", "mps", "cpu"), part=common.RUN_CONTROL)
    dtype: str = flag("float32", "bfloat16 runs the training loss under torch.autocast on any device "
                      "(evaluation stays float32; on a CPU mostly slower)",
                      choices=("float32", "bfloat16"))
    compile: bool = flag(False, "torch.compile the model's loss (its random draws then come from inductor's "
                         "own generator: a model with noise in its loss trains as with another seed)")
    data_dir: str = flag("", "folder with the three Multi30k .gz files, or a corpus of train.txt, valid.txt, "
                         "test.txt (else $DLM_DATA_DIR, else download Multi30k)")
    out_dir: str = flag("out", "runs are written to OUT_DIR/SCRIPT/RUN_NAME")
    run_name: str = flag("default", "name of the run folder (no path separators)")
    overwrite: bool = flag(False, "start afresh in a run folder that already holds a run (deletes it)")
    resume: bool = flag(False, "continue from the run folder's ckpt_last.pt, with its settings")
    eval_only: bool = flag(False, "evaluate the run folder's ckpt_best.pt on val and test, then stop")
    sample_only: bool = flag(False, "print samples of the run's ckpt_best.pt and stop; writes nothing")
    show_samples: int = flag(8, "samples printed and saved at each evaluation", low=0)
    temperature: float = flag(1.0, "sampling temperature", low=0.01)
    log_every: int = flag(50, "steps between train log lines (the first step is always logged)", low=1)
    max_steps: int = flag(0, "stop after this many steps in total (0: no limit)", low=0)
    eval_batch_size: int = flag(100, "captions per evaluation batch", low=1)
    iw_samples: int = flag(100, "reinforce: samples per caption of the test IW bound (an evaluation setting)",
                           low=1)
    segment: str = flag("", "segment the lines of this text file with the run's best model (--run-name), "
                        "print the words found, one line each, then stop")
    segment_out: str = flag("", "with --segment: write the words found to this file instead of printing them")


    @property
    def no_spaces(self) -> bool:  # (a field named no_spaces would make argparse read --no-spaces as "False")
        return not self.spaces


# ----------------------------------------------------------------------------- segmentations
# The sum over segmentations (the chart of the docstring) and what is read from it, for any table of piece
# scores: scores[b, i, k-1] = log p(c_{i+1..i+k} | h_i), which the Model below fills (with the lexical
# memory's help).
def force_cuts(drawn, n, max_piece):
    """drawn (..., T) free draws of "cut after character t", n (...,) caption lengths -> (cuts, free): the
    segmentation with the forced cuts added (after each caption's last character, and where a piece reaches
    max_piece characters), and the mask of the decisions that were really drawn (the ones log q counts)."""
    t = torch.arange(drawn.shape[-1], device=drawn.device)
    last_drawn = torch.where(drawn, t, -1).cummax(-1).values
    since = t - F.pad(last_drawn, (1, -1), value=-1)  # characters since the last drawn cut, t included
    is_char, is_last = t < n.unsqueeze(-1), t == n.unsqueeze(-1) - 1
    forced = (since % max_piece == 0) | is_last
    return (drawn | forced) & is_char, ~forced & is_char


def by_end(scores, fill=NEG):
    """scores (B, L, K) indexed by start i and length k -> (B, L, K) indexed by end j: [b, j, k-1] =
    scores[b, j-k, k-1], the piece of k characters that ends after character j (`fill` where j < k)."""
    B, L, K = scores.shape
    j, k = torch.arange(L, device=scores.device)[:, None], torch.arange(1, K + 1, device=scores.device)
    index = ((j - k).clamp(min=0) * K + k - 1).view(-1)
    return scores.reshape(B, L * K)[:, index].view(B, L, K).masked_fill(j < k, fill)


def prefix_sums(ends, n):
    """ends (B, L, K) from by_end -> (B, J + 1), J = max n: alpha_j = log sum over the segmentations of the
    first j characters of the product of their pieces' probabilities,
        alpha_0 = 0,  alpha_j = logsumexp_{k=1..K} alpha_{j-k} + log p(c_{j-k+1..j} | h_{j-k})."""
    B, L, K = ends.shape
    alpha = [ends.new_full((B,), NEG)] * (K - 1) + [ends.new_zeros(B)]  # alpha_{1-K} .. alpha_0
    ends = ends.unbind(1)  # unbind: one backward for all j (indexing would allocate (B, L, K) per j)
    for j in range(1, int(n.max()) + 1 if len(n) else 1):
        alpha.append((torch.stack(alpha[:-K - 1:-1], -1) + ends[j]).logsumexp(-1))  # alpha_{j-k} + piece of k
    return torch.stack(alpha[K - 1:], 1)


def chart(ends, n):
    """ends (B, L, K) from by_end -> (B,) alpha_n: log sum over the segmentations of the first n characters of
    the product of their pieces' probabilities."""
    return prefix_sums(ends, n).gather(1, n[:, None]).squeeze(1)


def viterbi_segmentation(ends, n):
    """ends (B, L, K) from by_end -> (B,) the log-probability of the likeliest segmentation of the first n
    characters and its (B, L) cuts: the chart with max for logsumexp, then a walk back from the end."""
    B, L, K = ends.shape
    alpha = [ends.new_full((B,), NEG)] * (K - 1) + [ends.new_zeros(B)]  # alpha_{1-K} .. alpha_0
    best, ends = [], ends.unbind(1)
    for j in range(1, int(n.max()) + 1 if len(n) else 1):
        value, k = (torch.stack(alpha[:-K - 1:-1], -1) + ends[j]).max(-1)
        alpha.append(value)
        best.append(k + 1)
    at_n = torch.stack(alpha[K - 1:], 1).gather(1, n[:, None]).squeeze(1)
    best = torch.stack(best, 1) if best else n.new_zeros(B, 1)     # (B, max n): best length ending after j
    cuts = torch.zeros(B, L, dtype=torch.bool, device=n.device)
    pos, rows = n.clone(), torch.arange(B, device=n.device)
    while (pos > 0).any():  # walk back from the end, one piece per step
        on = pos > 0
        cuts[rows[on], pos[on] - 1] = True
        pos = torch.where(on, pos - best.gather(1, (pos - 1).clamp(min=0)[:, None]).squeeze(1), pos)
    return at_n, cuts


def suffix_sums(scores, n):
    """scores (B, L, K) by start -> (B, J + 1), J = max n: beta_j = log sum over the segmentations of
    characters j+1..n of the product of their pieces' probabilities (the chart from the right; beta_n = 0,
    NEG past n),
        beta_j = logsumexp_{k=1..K} log p(c_{j+1..j+k} | h_j) + beta_{j+k}."""
    B, L, K = scores.shape
    later, out, starts = [scores.new_full((B,), NEG)] * K, [], scores.unbind(1)  # beta_{j+1} .. beta_{j+K}
    for j in range(int(n.max()) if len(n) else 0, -1, -1):
        value = (torch.stack(later, -1) + starts[j]).logsumexp(-1)
        value = torch.where(j == n, 0.0, torch.where(j > n, NEG, value))
        later = [value] + later[:-1]
        out.append(value)
    return torch.stack(out[::-1], 1)


def piece_posteriors(scores, n):
    """scores (B, L, K) by start -> (B, L, K): p(piece c_{i+1..i+k} | x), differentiable (the training loss
    uses it), from the charts from both sides:
        p(piece | x) = exp(alpha_i + log p(piece | h_i) + beta_{i+k} - alpha_n)."""
    B, L, K = scores.shape
    alpha = prefix_sums(by_end(scores), n)                                        # (B, J + 1)
    J = alpha.shape[1] - 1
    log_px = alpha.gather(1, n[:, None])                                          # (B, 1)
    alpha = F.pad(alpha, (0, L - J - 1), value=NEG)                               # (B, L): alpha_i
    beta = F.pad(suffix_sums(scores, n), (0, L + K - J - 1), value=NEG)          # (B, L + K): beta_j
    after = beta.unfold(1, K, 1)[:, 1:L + 1]                                      # (B, L, K): beta_{i+k}
    return (alpha[:, :, None] + scores + after - log_px[:, :, None]).exp()


def expected_length_cost(scores, n, exponent):
    """scores (B, L, K) by start -> (B,): sum over the pieces of p(piece | x) |piece|^exponent, the
    expected-length regulariser of Kawakami et al. (2019) (exponent 1: the constant n)."""
    K = scores.shape[-1]
    lengths = torch.arange(1, K + 1, device=scores.device, dtype=scores.dtype) ** exponent
    return (piece_posteriors(scores, n) * lengths).sum((1, 2))


def cut_probabilities(scores, n):
    """scores (B, L, K) from piece_scores -> (B, L): the posterior probability of a cut after character t, the
    sum over the pieces that end there of their posterior probability d log p(x) / d log p(piece)."""
    with torch.enable_grad():
        scores = scores.detach().requires_grad_()
        (piece_probs,) = torch.autograd.grad(chart(by_end(scores), n).sum(), scores)
    return F.pad(by_end(piece_probs, fill=0.0).sum(-1)[:, 1:], (0, 1))


def log_joint(ends, closing, n, cuts):
    """log p(x, z) for segmentations cuts (..., B, L) (every piece <= K characters, a cut after the last
    one)."""
    L, K = cuts.shape[-1], ends.shape[-1]
    t = torch.arange(L, device=cuts.device)
    start = torch.where(F.pad(cuts, (1, -1), value=True), t, 0).cummax(-1).values  # where t's piece starts
    length = (t - start).clamp(max=K - 1)                                          # its length - 1 so far
    ending = F.pad(ends[:, 1:], (0, 0, 0, 1)).expand(*cuts.shape, K)               # the pieces ending at t
    piece = ending.gather(-1, length.unsqueeze(-1)).squeeze(-1)                    # t's piece, cut after t
    return torch.where(cuts, piece, 0.0).sum(-1) + closing.gather(1, n[:, None]).squeeze(1)


# ----------------------------------------------------------------------------- the lexical memory
class LexicalMemory(nn.Module):
    """The lexical memory: M entries (training substrings: top_substrings), a distribution over them
    computed from the context state h = h_i of a piece's start, and the gate g(h) that mixes it with the
    piece GRU.

        score_e(h) = <W h, m_e> + b_e        W: E -> key (--lex-key), m_e (key,), b_e: learned per entry e
    --no-lex-factor, one softmax over the entries that fit in the r characters of room:
        log p_lex(e | h) = score_e(h) - logsumexp_{e': |e'| <= r} score_e'(h)
    --lex-factor (default), by the first character a(e):  G_a = the entries that start with a,
        log p_lex(e | h) = log p(a(e) | h) + score_e(h) - logsumexp_{e' in G_a(e), |e'| <= r} score_e'(h)
        p(a | h) = softmax_a(u_a . h + c_a) over the first characters a whose G_a has an entry of
                   <= r characters.
    Both are exact distributions over the entries that fit. A window at start i is an entry only if it begins
    with the next character c_{i+1}, so the factorised memory needs the normaliser of that one group only (on
    Multi30k about M / 13 entries per start instead of M), where the full softmax needs a (starts x M)
    product per batch.
        g(h) = sigmoid(v . h + d), and g = 0 where no entry fits (r < the shortest entry).
    The entries are stored grouped by first character (a stable sort of top_substrings's list); the checkpoint
    keeps them so.
    """

    def __init__(self, lexicon: torch.Tensor, vocab_size: int, embed: int, key: int, factor: bool):
        super().__init__()
        lexicon = lexicon[torch.sort(lexicon[:, 0], stable=True).indices]  # grouped by first character
        self.V, self.factor = vocab_size, factor
        self.register_buffer("lexicon", lexicon)                   # (M, lex_max) ids then PAD
        self.key = nn.Linear(embed, key)                           # W
        self.values = nn.Parameter(torch.randn(len(lexicon), key) / math.sqrt(key))  # m_e
        self.bias = nn.Parameter(torch.zeros(len(lexicon)))        # b_e
        self.gate = nn.Linear(embed, 1)
        self.first = nn.Linear(embed, vocab_size) if factor else None  # u_a, c_a
        self.index()
        self.register_load_state_dict_post_hook(lambda module, keys: module.index())  # a checkpoint's lexicon

    # --- building the list and the trie
    @staticmethod
    def top_substrings(x, size, lex_min, lex_max, rank="count"):
        """x (N, L) training captions -> (size, lex_max) ids then PAD: the most frequent substrings
        (overlapping occurrences counted) of lex_min..lex_max characters, ties broken by length then ids,
        stored by length; with rank="variety" (--lex-rank), the first by accessor_variety, then by count.
        A substring is counted by its number in base V (uint64, exact while V ** lex_max < 2 ** 64)."""
        V, found = int(x.max()) + 1, []  # (rank_by, length, ids) of the M first of each length
        if V ** lex_max >= 2 ** 64:
            raise RunError(f"--lex-max {lex_max} is too long for a vocabulary of {V} "
                           "(V ** lex_max >= 2 ** 64)")
        for length in range(lex_min, lex_max + 1 if size else 0):
            windows = x.unfold(1, length, 1)                            # (N, L - length + 1, length)
            inside = (windows != data.PAD).all(-1)                      # (N, L - length + 1)
            place = np.uint64(V) ** np.arange(length - 1, -1, -1, dtype=np.uint64)  # V ** (length - 1) .. 1
            keys = windows[inside].numpy().astype(np.uint64) @ place
            unique, counts = np.unique(keys, return_counts=True)        # in lexicographic order of the ids
            rank_by = counts
            if rank == "variety":  # variety first, count next (no count exceeds x.numel())
                variety = LexicalMemory.accessor_variety(x, length, inside, keys, unique)
                rank_by = variety * (x.numel() + 1) + counts
            top = np.argsort(-rank_by, kind="stable")[:size]
            digits = unique[top, None] // place % np.uint64(V)          # the keys back to ids
            found += [(value, length, ids)
                      for value, ids in zip(rank_by[top].tolist(), digits.astype(np.int64).tolist())]
        chosen = sorted(sorted(found, key=lambda f: (-f[0], f[1], f[2]))[:size], key=lambda f: f[1])
        return torch.tensor([ids + [data.PAD] * (lex_max - len(ids)) for _, _, ids in chosen],
                            dtype=torch.long).view(-1, lex_max)

    @staticmethod
    def accessor_variety(x, length, inside, keys, unique):
        """The substrings of `length` characters (keys: one per window inside a caption; unique: the distinct
        keys, sorted) -> for each distinct key, in that order: the fewer of its left and right varieties
        (Feng et al. 2004), a side's variety being the number of distinct characters met on that side plus the
        number of times the substring touches the caption's edge there: an edge is a boundary every time.
        Many different characters precede and follow a word; few the inside of one (`lQR` in `flQRz`), so
        fragments rank low."""
        W = inside.shape[1]
        before = F.pad(x, (1, 0), value=-1)[:, :W][inside]                  # -1: the caption's start
        after = F.pad(x, (0, 1), value=data.PAD)[:, length:length + W][inside]  # PAD: its end
        varieties = []
        for neighbour, edge in ((before, -1), (after, data.PAD)):
            at_edge = (neighbour == edge).numpy()
            pairs = np.unique(np.stack([keys, neighbour.numpy().astype(np.uint64)], 1)[~at_edge], axis=0)
            distinct = np.bincount(np.searchsorted(unique, pairs[:, 0]), minlength=len(unique))
            edges = np.bincount(np.searchsorted(unique, keys[at_edge]), minlength=len(unique))
            varieties.append(distinct + edges)
        return np.minimum(*varieties)

    @staticmethod
    def trie(lexicon, vocab_size):
        """-> child (nodes, V): the node reached by reading a character (node 0: no entry starts so,
        absorbing; node 1: the root), and entry (nodes,): the lexicon row spelled by the path to a node,
        or -1."""
        children, entry = {}, [-1, -1]
        for index, ids in enumerate(lexicon.tolist()):
            node = 1
            for c in ids:
                if c == data.PAD:
                    break
                node = children.setdefault((node, c), len(entry))
                if node == len(entry):
                    entry.append(-1)
            entry[node] = index
        child = torch.zeros(len(entry), vocab_size, dtype=torch.long)
        if children:
            keys = torch.tensor(list(children))
            child[keys[:, 0], keys[:, 1]] = torch.tensor(list(children.values()))
        return child, torch.tensor(entry)

    def index(self):
        """From self.lexicon: the trie, every entry's length and group, each group's rows [start, end) and its
        shortest entry, and the group of every character (-1: no entry starts with it)."""
        device, lexicon = self.lexicon.device, self.lexicon.cpu()
        child, entry = self.trie(lexicon, self.V)
        firsts, sizes = lexicon[:, 0].unique_consecutive(return_counts=True)
        if len(firsts) != len(firsts.unique()):
            raise ValueError("the lexicon's entries are not grouped by their first character")
        bounds = F.pad(sizes.cumsum(0), (1, 0)).tolist()
        self.groups = list(zip(bounds[:-1], bounds[1:]))  # rows of each group, in the order of `firsts`
        length = (lexicon != data.PAD).sum(1)
        group_of_char = torch.full((self.V,), -1, dtype=torch.long)
        group_of_char[firsts] = torch.arange(len(firsts))
        buffers = dict(trie_child=child, trie_entry=entry, entry_len=length, firsts=firsts,
                       entry_group=torch.repeat_interleave(torch.arange(len(firsts)), sizes),
                       group_min_len=torch.stack([length[a:b].min() for a, b in self.groups]) if len(firsts)
                       else length, group_of_char=group_of_char)
        for name, value in buffers.items():
            self.register_buffer(name, value.to(device), persistent=False)

    def entry_ids(self, windows):
        """windows (P, K) characters -> (P, K) lexicon row of the first k characters, or -1: a walk down the
        trie."""
        node, ids = torch.ones_like(windows[:, 0]), []
        for t in range(windows.shape[1]):
            node = self.trie_child[node, windows[:, t]]
            ids.append(self.trie_entry[node])
        return torch.stack(ids, 1)

    # --- the log-probabilities
    def gates(self, h, room):
        """h (P, E), room (P,) -> log g, log (1 - g) (P,), with g = 0 where no entry fits."""
        fits, gate = room >= self.entry_len.min(), self.gate(h).squeeze(-1)
        return torch.where(fits, F.logsigmoid(gate), NEG), torch.where(fits, F.logsigmoid(-gate), 0.0)

    def log_first(self, h, room):
        """h (P, E), room (P,) -> (P, groups): log p(a | h), renormalised over the groups with an entry that
        fits."""
        logits = self.first(h)[:, self.firsts]                                          # (P, groups)
        return F.log_softmax(logits.masked_fill(self.group_min_len > room[:, None], NEG), -1)

    def scores(self, h, rows=slice(None)):
        """h (P, E) -> (P, entries in rows): score_e(h) = <W h, m_e> + b_e."""
        return F.linear(self.key(h), self.values[rows], self.bias[rows])

    def log_probs(self, h, room, windows):
        """h (P, E), room (P,), windows (P, K) the characters after each start -> lex (P, K):
        log p_lex(first k characters of the window | h) (NEG where they are not an entry), and log g,
        log (1 - g) (P,)."""
        ids = self.entry_ids(windows)                                                    # (P, K)
        if self.factor:  # log p(a | h) - log Z_a(h, r) for the group a of the next character, group by group
            group = self.group_of_char[windows[:, 0]]                                    # (P,), -1: none
            log_norm = h.new_zeros(len(h))
            for a, (lo, hi) in enumerate(self.groups):
                rows = (group == a).nonzero().squeeze(1)
                if len(rows):
                    s = self.scores(h[rows], slice(lo, hi))                              # (P_a, |G_a|)
                    too_long = self.entry_len[lo:hi] > room[rows, None]
                    log_norm = log_norm.index_put((rows,), s.masked_fill(too_long, NEG).logsumexp(-1))
            offset = self.log_first(h, room).gather(1, group.clamp(min=0)[:, None]).squeeze(1) - log_norm
        else:            # - log Z(h, r) over all the entries that fit: a (P, M) product
            too_long = self.entry_len[None, :] > room[:, None]                           # (P, M)
            offset = -self.scores(h).masked_fill(too_long, NEG).logsumexp(-1)
        hit = ids >= 0
        rows, e = hit.nonzero()[:, 0], ids[hit]                                          # (hits,) each
        score = (self.key(h)[rows] * self.values[e]).sum(-1) + self.bias[e]
        lex = torch.full(ids.shape, NEG, dtype=h.dtype, device=h.device)
        lex = lex.index_put((hit,), score + offset[rows])
        return (lex,) + self.gates(h, room)

    def all_log_probs(self, h, room):
        """h (N, E), room (N,) -> (N, M): log p_lex(e | h) of every entry (NEG for those that do not fit);
        for the sampler and the tests (M scores per row)."""
        too_long = self.entry_len[None, :] > room[:, None]
        s = self.scores(h).masked_fill(too_long, NEG)                                    # (N, M)
        if not self.factor:
            return s.log_softmax(-1).masked_fill(too_long, NEG)
        log_norm = torch.stack([s[:, lo:hi].logsumexp(-1) for lo, hi in self.groups], 1)  # (N, groups)
        log_p = self.log_first(h, room) - log_norm
        return (s + log_p[:, self.entry_group]).masked_fill(too_long, NEG)


# ----------------------------------------------------------------------------- model
class Model(nn.Module):
    def __init__(self, itos: list[str], lexicon: torch.Tensor, cfg: Config):
        super().__init__()
        E, D = cfg.embed, cfg.piece_embed
        vocab_size, space = len(itos), itos.index(" ") if " " in itos else -1
        self.itos = itos  # the characters: a segmentation is written and scored as text
        self.V, self.max_piece, self.space = vocab_size, cfg.max_piece, space
        self.spaces, self.reinforce = cfg.segmenter == "spaces", cfg.estimator == "reinforce"
        self.train_samples, self.piece_cost = cfg.train_samples, cfg.piece_cost
        self.length_penalty, self.length_exponent = cfg.length_penalty, cfg.length_exponent
        self.embed = nn.Embedding(vocab_size, E)
        self.context = nn.GRU(E, E, batch_first=True)
        # nn.Identity when p = 0: draws no noise, so the model and its training are as without the flag
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.piece_init = nn.Linear(E, D)
        self.piece_start = nn.Parameter(torch.randn(E))  # the input before a piece's first character
        self.piece_cell = nn.GRUCell(E, D)
        self.piece_out = nn.Linear(D, vocab_size)
        # U of --piece-context: U h_i is added to the piece GRU's input at every character
        self.piece_context = nn.Linear(E, 3 * D, bias=False) if cfg.piece_context else None
        # -inf at <bos>, 0 elsewhere, added to the piece GRU's logits: no piece holds <bos>
        no_bos = torch.zeros(vocab_size).index_fill(0, torch.tensor(data.BOS), -math.inf)
        self.register_buffer("no_bos", no_bos, persistent=False)
        self.memory = (LexicalMemory(lexicon, vocab_size, E, cfg.lex_key, cfg.lex_factor) if len(lexicon)
                       else None)
        if self.reinforce:  # q has its own embedding: REINFORCE noise never reaches p's
            self.seg_embed = nn.Embedding(vocab_size, E)
            self.seg_rnn = nn.GRU(E, E, batch_first=True, bidirectional=cfg.parser == "bi")
            self.cut = nn.Linear(E * (2 if cfg.parser == "bi" else 1), 1)

    def contexts(self, x):
        """x (B, L) -> (B, L, E): h_i, the context GRU's state after <bos> and i characters."""
        inputs = self.embed(torch.cat([torch.full_like(x[:, :1], data.BOS), x[:, :-1]], 1))
        return self.dropout(self.context(self.dropout(inputs))[0])

    def piece_step(self, gates_in, s):
        """One step of the piece GRU from its input half W_i e[c] + b_i (+ U h_i) (N, 3D) and state s (N, D):
        GRUCell's equations written out, so that the input half can be computed once per character."""
        in_r, in_z, in_n = gates_in.chunk(3, -1)
        h_r, h_z, h_n = F.linear(s, self.piece_cell.weight_hh, self.piece_cell.bias_hh).chunk(3, -1)
        r, z = torch.sigmoid(in_r + h_r), torch.sigmoid(in_z + h_z)
        return torch.lerp(torch.tanh(in_n + r * h_n), s, z)  # (1 - z) n + z s

    def piece_input(self, inputs):
        return F.linear(inputs, self.piece_cell.weight_ih, self.piece_cell.bias_ih)

    def piece_context_gates(self, h):
        """U h_i, the same at every character of a piece (--piece-context), else 0."""
        return self.piece_context(h) if self.piece_context is not None else 0.0

    def piece_states(self, x, live, h):
        """The piece GRU's state after each character of every window: (P, K, D), started from tanh(W h_i)
        with the input piece_start, then c_{i+1} .. c_{i+K-1}; the input half of a character is computed once
        per character of the caption, not once per window."""
        K = self.max_piece
        gates_in = self.piece_input(self.embed(F.pad(x, (0, K))))                           # (B, L+K, 3D)
        b, i = live.nonzero(as_tuple=True)
        gates_in = gates_in[b[:, None], i[:, None] + torch.arange(K - 1, device=x.device)]  # (P, K-1, 3D)
        s, states, context = torch.tanh(self.piece_init(h)), [], self.piece_context_gates(h)
        for gates in [self.piece_input(self.piece_start).expand(len(b), -1)] + list(gates_in.unbind(1)):
            s = self.piece_step(gates + context, s)
            states.append(s)
        return torch.stack(states, 1)

    def piece_scores(self, x):
        """x (B, L) -> scores (B, L, K): log p(piece c_{i+1..i+k} | h_i) at [b, i, k-1] (NEG past the
        caption's end), and closing (B, L): log p(empty piece | h_i) (0 at i = L-1: the end is forced
        there)."""
        B, L = x.shape
        K, n = self.max_piece, data.num_chars(x)
        i, k = torch.arange(L, device=x.device), torch.arange(1, K + 1, device=x.device)
        room = (L - 1 - i).clamp(max=K)                                     # (L,) characters a piece may hold
        live = (i <= n[:, None]) & (room > 0)                               # (B, L) starts decoded
        windows = F.pad(x, (0, K), value=data.PAD).unfold(1, K, 1)[:, :L][live]  # (P, K)
        h, room = self.contexts(x)[live], room.expand(B, L)[live]           # (P, E), (P,)
        log_p = F.log_softmax(self.piece_out(self.piece_states(x, live, h)) + self.no_bos, -1)  # (P, K, V)
        chars, stop = log_p.gather(-1, windows.unsqueeze(-1)).squeeze(-1), log_p[..., data.PAD]  # (P, K) each
        pieces = chars.cumsum(-1) + torch.where(k < room[:, None], F.pad(stop[:, 1:], (0, 1)), 0.0)
        empty = stop[:, 0]
        if self.memory is not None:  # g p_lex + (1 - g) p_chars
            lex, log_g, log_not_g = self.memory.log_probs(h, room, windows)      # (P, K), (P,) x2
            pieces = torch.logaddexp(log_g[:, None] + lex, log_not_g[:, None] + pieces)
            empty = log_not_g + empty
        scores = pieces.new_full((B, L, K), NEG)
        scores[live] = pieces
        scores = scores.masked_fill(i[:, None] + k > n[:, None, None], NEG)
        closing = pieces.new_full((B, L), NEG)
        closing[live] = empty
        closing[:, -1] = 0.0
        return scores, closing

    def log_prob(self, x, piece_cost=0.0):
        """x (B, L) -> (B,) exact log p(x), and what it was computed from (by_end scores, closing, n); with a
        piece_cost, log sum_z p(x, z) exp(-piece_cost * pieces in z) instead (a training objective only)."""
        scores, closing = self.piece_scores(x)
        ends, n = by_end(scores - piece_cost), data.num_chars(x)
        return chart(ends, n) + closing.gather(1, n[:, None]).squeeze(1), (scores, ends, closing, n)

    # --- the segmenter q(z|x) of --estimator reinforce
    def cut_logits(self, x):
        """x (B, L) -> (B, L) logit of a cut after each character."""
        return self.cut(self.seg_rnn(self.seg_embed(x))[0]).squeeze(-1)

    def draw_cuts(self, x, n_samples, uniform=None, drawn=None, greedy=False):
        """x (B, L) -> cuts (n_samples, B, L) from q (or `drawn`; or q's likelier decision at each character
        if greedy) and log q(cuts|x) (n_samples, B). Noise: `uniform` (n_samples, B, L) draws in [0, 1), else
        the CPU RNG (training: a checkpoint's torch_rng replays it)."""
        logits = self.cut_logits(x).expand(n_samples, -1, -1)
        if greedy:
            drawn = logits > 0
        elif drawn is None:
            uniform = torch.rand(logits.shape) if uniform is None else uniform
            drawn = uniform.to(x.device) < logits.sigmoid()
        cuts, free = force_cuts(drawn, data.num_chars(x), self.max_piece)
        log_q = -F.binary_cross_entropy_with_logits(logits, cuts.to(logits.dtype), reduction="none")
        return cuts, torch.where(free, log_q, 0.0).sum(-1)

    def loss(self, x, drawn=None):
        """x (B, L) -> (B,) training loss: -log p(x) (exact), -log p(x, z_spaces) (spaces), or the -ELBO
        estimate from --train-samples draws of q (reinforce; gradient pathwise for p, REINFORCE with a
        leave-one-out baseline for q)."""
        if not (self.spaces or self.reinforce):
            log_px, (scores, _, _, n) = self.log_prob(x, self.piece_cost)
            return -log_px + self.length_cost(scores, n)
        scores, closing = self.piece_scores(x)
        ends, n = by_end(scores), data.num_chars(x)
        if self.spaces:
            return -log_joint(ends, closing, n, force_cuts(x == self.space, n, self.max_piece)[0])
        cuts, log_q = self.draw_cuts(x, self.train_samples, drawn=drawn)
        log_p = log_joint(ends, closing, n, cuts)                                        # (n_samples, B)
        # the ELBO's -grad log q term has expectation zero and only adds variance: left out
        surrogate = common.reinforce_surrogate(log_q, (log_p - log_q).detach())
        return (-(log_p - log_q.detach()).mean(0) - (surrogate - surrogate.detach())
                + self.length_cost(scores, n))

    def length_cost(self, scores, n):
        """(B,) lambda * sum over the pieces of p(piece | x) |piece|^beta (--length-penalty,
        --length-exponent): the exact posteriors of p's chart (reinforce too); a training term only, 0 when
        lambda = 0."""
        if not self.length_penalty:
            return 0.0
        return self.length_penalty * expected_length_cost(scores, n, self.length_exponent)


def check_flags(cfg):
    """The flag combinations this model refuses, in one place (before any file is written)."""
    if cfg.compile:  # its chart is a Python loop over up to 99 characters: inductor took minutes, then failed
        raise RunError("--compile is not supported by dlm107 "
                       "(its chart loop compiles for many minutes on a CPU)")
    if (cfg.lex_max or cfg.max_piece) > cfg.max_piece or cfg.lex_min > (cfg.lex_max or cfg.max_piece):
        raise RunError(f"need --lex-min <= --lex-max <= --max-piece, got {cfg.lex_min}, "
                       f"{cfg.lex_max or cfg.max_piece}, {cfg.max_piece}")
    if cfg.segmenter == "spaces" and (cfg.estimator == "reinforce" or cfg.no_spaces):
        raise RunError("--segmenter spaces cuts after the spaces: "
                       "not with --estimator reinforce or --no-spaces")
    if cfg.segment_out and not cfg.segment:
        raise RunError("--segment-out names the output of --segment FILE")
    if cfg.segment and (cfg.resume or cfg.eval_only or cfg.sample_only or cfg.overwrite):
        raise RunError("--segment reads a trained run: "
                       "not with --resume, --eval-only, --sample-only or --overwrite")
    if cfg.dtype == "bfloat16":  # the chart writes float32 sums into its tables
        raise RunError("--dtype bfloat16 is not supported by dlm107 (its chart keeps float32 tables)")


def lexicon_size(train, cfg):
    """M: --lexicon, or with --lexicon-chars C one entry per C training characters (a rule of the corpus)."""
    return round(int(data.num_chars(train).sum()) / cfg.lexicon_chars) if cfg.lexicon_chars else cfg.lexicon


def build_model(vocab, train, cfg):
    """The model, with its lexicon: M (lexicon_size) training substrings, the first by --lex-rank."""
    lex_max = cfg.lex_max or cfg.max_piece
    size = lexicon_size(train, cfg)
    lexicon = LexicalMemory.top_substrings(train, size, cfg.lex_min, lex_max, cfg.lex_rank)
    return Model(vocab.itos, lexicon, cfg)


# ----------------------------------------------------------------------------- segmentation scores
# The word-discovery protocol of Goldwater, Griffiths & Johnson (2009): a segmentation is the list of words of
# each caption *without its spaces*, scored against the true words three ways, each summed over the split:
# boundaries inside a caption (its two edges are free, so not counted), word tokens (right when both ends
# are true boundaries and none lies inside), and word types (the set of distinct words found against the
# true set).
def words_of(symbols, cut_after, space=" "):
    """A caption's symbols and a cut flag after each -> the words the cuts imply in the caption without its
    spaces. Spaces belong to no word, and a cut anywhere in a run of spaces is a boundary there:
    "a |man in" (cuts after "a ") -> [a, manin]; "a| man| in" -> [a, man, in]."""
    words, word = [], ""
    for symbol, cut in zip(symbols, cut_after):
        word += symbol if symbol != space else ""
        if cut and word:
            words, word = words + [word], ""
    return words + [word] if word else words


def spans_of(words):
    """[(start, end)] of each word in the caption without its spaces: [ab, c] -> [(0, 2), (2, 3)]."""
    ends = list(itertools.accumulate(len(word) for word in words))
    return list(zip([0] + ends[:-1], ends))


def precision_recall_f1(name, right, found, true):
    """`right` of the `found` items are among the `true` ones -> name_precision, name_recall, name_f1."""
    precision, recall = right / found if found else 0.0, right / true if true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {f"{name}_precision": precision, f"{name}_recall": recall, f"{name}_f1": f1}


def segmentation_scores(found, gold, prefix=""):
    """found, gold: the words of each caption (lists of lists of strings, the same text caption by caption) ->
    boundary_, token_ and type_ precision, recall and F1 (a ratio over nothing is 0)."""
    right, n_found, n_true = [0, 0], [0, 0], [0, 0]  # [boundaries, tokens] each
    for found_words, true_words in zip(found, gold):
        found_spans, true_spans = spans_of(found_words), spans_of(true_words)
        found_cuts, true_cuts = {end for _, end in found_spans[:-1]}, {end for _, end in true_spans[:-1]}
        right[0] += len(found_cuts & true_cuts)
        right[1] += len(set(found_spans) & set(true_spans))
        n_found[0], n_found[1] = n_found[0] + len(found_cuts), n_found[1] + len(found_spans)
        n_true[0], n_true[1] = n_true[0] + len(true_cuts), n_true[1] + len(true_spans)
    found_types = {word for words in found for word in words}
    true_types = {word for words in gold for word in words}
    scores = (precision_recall_f1("boundary", right[0], n_found[0], n_true[0])
              | precision_recall_f1("token", right[1], n_found[1], n_true[1])
              | precision_recall_f1("type", len(found_types & true_types), len(found_types), len(true_types)))
    return {prefix + k: v for k, v in scores.items()}


def caption_words(model, x, cuts, gold=None):
    """x (B, L) captions and cuts (B, L) -> (the words the cuts imply, the true words) of each caption: the
    spaces of x, or with --no-spaces the removed spaces (gold (B, L): a space followed character t)."""
    found, true = [], []
    for ids, cut, n in zip(x.tolist(), cuts.tolist(), data.num_chars(x).tolist()):
        symbols = [model.itos[i] for i in ids[:n]]
        found.append(words_of(symbols, cut[:n]))
        true.append(words_of(symbols, gold[len(true)][:n].tolist()) if gold is not None
                    else "".join(symbols).split())
    return found, true


# ----------------------------------------------------------------------------- evaluate, sample
@torch.no_grad()
def evaluate(model, x, cfg, device, full=True, gold=None):
    """Exact -log p(x) per caption (file order), and extras: the Viterbi segmentation (its words, caption by
    caption) and its scores against the true words (gold: the removed spaces with --no-spaces). reinforce
    adds -ELBO (--train-samples draws), with `full` (the test) the IW bound from --iw-samples draws,
    KL(q || p(z|x)) and q's segmentation; spaces adds its joint. Each caption's draws are its own
    (common.caption_noise), so no number depends on --eval-batch-size."""
    model.eval()
    nll, sums, words = [], {}, {"": [], "true": [], "q_": []}
    draws, cut_rate = (cfg.iw_samples if full else model.train_samples), torch.zeros(2)
    for start in range(0, len(x), cfg.eval_batch_size):
        batch = x[start:start + cfg.eval_batch_size].to(device)
        batch_gold = None if gold is None else gold[start:start + len(batch)]
        log_px, (scores, ends, closing, n) = model.log_prob(batch)
        best = viterbi_segmentation(ends, n)[1]
        nll.append(-log_px.double().cpu())
        found, true = caption_words(model, batch.cpu(), best.cpu(), batch_gold)
        words[""], words["true"] = words[""] + found, words["true"] + true
        # the cut rate counts the cuts that are a choice: a cut after the last character is not
        inner = torch.arange(batch.shape[1], device=device) < n[:, None] - 1
        cut_rate += torch.tensor([(best & inner).sum().item(), inner.sum().item()])
        if model.spaces:
            joint = log_joint(ends, closing, n, force_cuts(batch == model.space, n, model.max_piece)[0])
            sums["joint_nlpps"] = sums.get("joint_nlpps", 0.0) - joint.sum().item()
        if model.reinforce:
            uniform = common.caption_noise(
                start, len(batch), lambda generator: torch.rand(draws, x.shape[1], generator=generator))
            log_w = []  # log p(x, z) - log q(z | x), --train-samples draws at a time: memory as in training
            for chunk in uniform.transpose(0, 1).split(model.train_samples):  # (S, B, L)
                cuts, log_q = model.draw_cuts(batch, len(chunk), uniform=chunk)
                log_w.append((log_joint(ends, closing, n, cuts) - log_q).double().cpu())
            log_w = torch.cat(log_w)                                                  # (draws, B)
            elbo = log_w[:model.train_samples].mean(0)                                # (B,)
            sums["elbo_nlpps"] = sums.get("elbo_nlpps", 0.0) - elbo.sum().item()
            if full:
                sums["iw_nlpps"] = sums.get("iw_nlpps", 0.0) - common.logmeanexp(log_w, 0).sum().item()
            q_cuts = model.draw_cuts(batch, 1, greedy=True)[0][0]  # q's likelier decision at each character
            words["q_"] += caption_words(model, batch.cpu(), q_cuts.cpu(), batch_gold)[0]
    model.train()
    nll = torch.cat(nll)
    extra = {"bound": "exact"} | {k: v / len(x) for k, v in sums.items()}
    if model.reinforce:
        extra["kl_gap"] = extra["elbo_nlpps"] - nll.mean().item()
        extra.update(segmentation_scores(words["q_"], words["true"], "q_"))
    extra.update(segmentation_scores(words[""], words["true"]))
    extra.update(cut_rate=(cut_rate[0] / cut_rate[1].clamp(min=1)).item(), words=words[""])
    return nll, extra


@torch.no_grad()
def sample(model, n, cfg, device, generator, slots=data.SLOTS):
    """Ancestral sampling, piece by piece: the gate picks the lexicon (one entry that fits) or the piece GRU
    (characters until <pad> or the forced end); the context GRU then reads the piece. An empty piece, or
    99 characters, ends a caption. Returns captions (n, slots) and extras: their cuts (n, slots)."""
    model.eval()
    def draw(logits):
        probs = torch.softmax(logits.float() / cfg.temperature, -1).cpu()
        return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(device)

    # the captions and their cuts, + a spare column for non-writes
    x = torch.full((n, slots + 1), data.PAD, dtype=torch.long, device=device)
    cuts = torch.zeros(n, slots + 1, dtype=torch.bool, device=device)
    pos, rows = torch.zeros(n, dtype=torch.long, device=device), torch.arange(n, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    out, state = model.context(model.embed(torch.full((n, 1), data.BOS, device=device)))
    h = out[:, 0]
    while True:
        room = (slots - 1 - pos).clamp(max=model.max_piece)
        done |= room == 0
        if done.all():
            break
        piece = torch.full((n, model.max_piece), data.PAD, dtype=torch.long, device=device)
        length = torch.zeros_like(pos)
        spelling = ~done  # the captions whose piece the piece GRU spells, character by character
        if model.memory is not None:
            memory = model.memory
            gate_logit = memory.gate(h).squeeze(-1) / cfg.temperature
            p_lexicon = torch.where(room >= memory.entry_len.min(), gate_logit.sigmoid(), 0.0)  # g(h)
            from_lexicon = ~done & (torch.rand(n, generator=generator).to(device) < p_lexicon)
            entry = draw(memory.all_log_probs(h, room))  # an entry that fits, from p_lex(. | h)
            piece[from_lexicon, :memory.lexicon.shape[1]] = memory.lexicon[entry[from_lexicon]]
            length = torch.where(from_lexicon, memory.entry_len[entry], 0)
            spelling &= ~from_lexicon
        piece_state, inputs = torch.tanh(model.piece_init(h)), model.piece_start.expand(n, -1)
        context = model.piece_context_gates(h)
        # the piece GRU, for the captions that took it; its end at `room` is forced
        for t in range(model.max_piece):
            spelling &= t < room
            if not spelling.any():
                break
            piece_state = model.piece_step(model.piece_input(inputs) + context, piece_state)
            symbol = draw(model.piece_out(piece_state) + model.no_bos)
            done |= spelling & (symbol == data.PAD) & (t == 0)  # the empty piece ends the caption
            spelling &= symbol != data.PAD
            piece[spelling, t], length = symbol[spelling], length + spelling
            inputs = model.embed(symbol)
        for t in range(int(length.max())):  # write the piece and let the context GRU read it
            on = t < length
            x[rows, torch.where(on, pos + t, slots)] = piece[:, t]
            out, new_state = model.context(model.embed(piece[:, t:t + 1]), state)
            state = torch.where(on[None, :, None], new_state, state)
            h = torch.where(on[:, None], out[:, 0], h)
        cuts[rows, torch.where(length > 0, pos + length - 1, slots)] = True
        pos += length
    model.train()
    return x[:, :slots], {"cuts": cuts[:, :slots]}


def with_cuts(vocab, ids, cuts):
    """A caption as text with '|' between its pieces."""
    n = int(data.num_chars(ids[None]))
    return "".join(vocab.decode(ids[t:t + 1]) + ("|" if cuts[t] and t < n - 1 else "") for t in range(n))


@torch.no_grad()
def show_segments(model, vocab, shown, run_dir):
    """Lines of captions cut by Viterbi (and by q's likelier decisions), and segments.png in run_dir (if not
    None): the posterior probability of a cut after each of their characters."""
    model.eval()
    _, (scores, ends, _, n) = model.log_prob(shown)
    best = viterbi_segmentation(ends, n)[1]
    lines = [f"[SEGMENT] {with_cuts(vocab, ids, cuts)}" for ids, cuts in zip(shown, best)]
    if model.reinforce:
        q_cuts = model.draw_cuts(shown, 1, greedy=True)[0][0]  # q's likelier decision at each character
        lines += [f"[SEGMENT q] {with_cuts(vocab, ids, cuts)}" for ids, cuts in zip(shown, q_cuts)]
    model.train()
    if run_dir is not None:
        plot_segments(vocab, shown, cut_probabilities(scores, n), best, run_dir)
    return lines


def plot_segments(vocab, shown, cut_probs, best, folder):
    fig, axes = plt.subplots(len(shown), 1, figsize=(14, 1.8 * len(shown)), squeeze=False)
    for ax, ids, cut_prob, cuts in zip(axes[:, 0], shown.cpu(), cut_probs.cpu(), best.cpu()):
        chars = [vocab.decode(ids[t:t + 1]) for t in range(int(data.num_chars(ids[None])))]
        colors = ["tab:orange" if c == " " else "tab:blue" for c in chars]
        ax.bar(range(len(chars)), cut_prob[:len(chars)].numpy(), color=colors)
        ax.plot([t for t in range(len(chars)) if cuts[t]], [1.02] * int(cuts.sum()), "kv", markersize=3)
        ax.set_xticks(range(len(chars)), [c.replace(" ", "_") for c in chars], fontsize=7)
        ax.set(ylim=(0, 1.08), xlim=(-1, data.SLOTS - 1), ylabel="p(cut)")
    axes[0, 0].set_title("posterior probability of a cut after each character "
                         "(orange: a space; v: Viterbi cuts)")
    fig.tight_layout()
    save_figure(fig, folder / "segments.png")


@torch.no_grad()
def segment_file(cfg, path, out=None):
    """--segment: the words that the best checkpoint of the run --run-name finds in each line of a text file
    (Viterbi; spaces removed first if the run was trained --no-spaces), one line each, printed or written to
    `out`. Characters the run never saw in training are named in one line before the words."""
    run_dir = Path(cfg.out_dir) / SCRIPT / cfg.run_name
    ckpt = load_checkpoint(run_dir / "ckpt_best.pt")
    cfg = dataclasses.replace(cfg, **{k: v for k, v in ckpt["args"].items()
                                      if k in Config.__dataclass_fields__ and k not in RUN_FLAGS})
    vocab = data.Vocab(ckpt["vocab"][len(data.SPECIALS):])
    model = Model(vocab.itos, ckpt["model"].get("memory.lexicon", torch.zeros(0, 1, dtype=torch.long)), cfg)
    model.load_state_dict(ckpt["model"])
    try:
        lines = [line.rstrip("\n") for line in open(path, encoding="utf-8")]
    except (OSError, UnicodeDecodeError) as e:
        raise RunError(f"cannot read --segment {path}: {getattr(e, 'strerror', None) or e}") from None
    lines = [line.replace(" ", "") if cfg.no_spaces else line for line in lines]
    unseen = sorted({c for line in lines for c in line} - set(vocab.itos))
    too_long = sum(len(line) > data.SLOTS - 1 for line in lines)
    if unseen or too_long:
        print(f"note: {len(unseen)} characters unseen in training, read as <unk>: "
              f"{', '.join(map(repr, unseen[:20]))}; {too_long} lines cut at {data.SLOTS - 1} characters",
              file=sys.stderr)
    x = torch.tensor([vocab.encode(line) for line in lines], dtype=torch.long).view(-1, data.SLOTS)
    words = []
    for batch in data.batches(x, cfg.eval_batch_size):
        _, (_, ends, _, n) = model.log_prob(batch)
        words += caption_words(model, batch, viterbi_segmentation(ends, n)[1])[0]
    text = "".join(" ".join(w) + "\n" for w in words)
    if out:
        write_file(Path(out), text)
    else:
        sys.stdout.write(text)


# ============================================================================= the run
# The same text in every script of the family, but for the lines where a model needs more (a test checks
# that each script keeps these lines of dlm100_rnn.py): flags, data, model, resume, the loop, checkpoints.
RUN_FLAGS = common.run_flags(Config)  # Config's last section, run control: a checkpoint keeps the rest
# what a checkpoint must hold before a run reads it (the tensors are checked as the model loads them)
CHECKPOINT_FIELDS = dict(args=dict, vocab=list, data_sha256=dict, step=int, best_val=float, model=dict,
                         optimizer=dict, epoch_rng=torch.Tensor, torch_rng=torch.Tensor, train_seconds=float,
                         train_cpu_seconds=float, train_losses=list, run_id=str)
RECORD_FIELDS = dict(kind=str, step=int, epoch=(int, float), nlpps=(int, float))  # of a metrics.jsonl line


def as_flag(name, value):
    """A setting as it is typed: --embed 64, --no-spaces."""
    name = name.replace("_", "-")
    return (f"--{name}" if value else f"--no-{name}") if isinstance(value, bool) else f"--{name} {value}"


def open_run(argv):
    """Flags -> (settings, the checkpoint --resume, --eval-only or --sample-only reads (else None), the run
    folder). A checkpoint keeps its settings (all but RUN_FLAGS): typing one with another value is refused."""
    cfg, given = common.parse_flags(Config, __doc__, argv)  # argparse from Config; given: the flags typed
    if (cfg.run_name.strip() in ("", ".", "..") or cfg.run_name != cfg.run_name.strip()
            or not cfg.run_name.isprintable() or any(sep in cfg.run_name for sep in "/\\")):
        raise RunError(f"--run-name {cfg.run_name!r} must be a plain folder name (no path separators, no "
                       "leading or trailing spaces, no control characters)")
    modes = [as_flag(m, True) for m in ("resume", "eval_only", "sample_only", "overwrite") if getattr(cfg, m)]
    if len(modes) > 1:
        raise RunError("use only one of " + ", ".join(modes))
    if cfg.sample_only and not cfg.show_samples:
        raise RunError("--sample-only with --show-samples 0 would print nothing")
    if (cfg.eval_only or cfg.sample_only) and (cfg.dtype != "float32" or cfg.compile):
        raise RunError("--dtype and --compile change training only: evaluation and sampling run in float32, "
                       "uncompiled")
    run_dir = Path(cfg.out_dir) / SCRIPT / cfg.run_name
    if not (cfg.resume or cfg.eval_only or cfg.sample_only):
        return cfg, None, run_dir
    ckpt = run_checkpoint(run_dir, cfg.resume)
    fields = Config.__dataclass_fields__
    saved = {k: v for k, v in ckpt["args"].items() if k in fields and k not in RUN_FLAGS
             and not (cfg.resume and k in given and fields[k].metadata["resume_may_change"])}
    for k in sorted(given & saved.keys()):
        if saved[k] != getattr(cfg, k):
            raise RunError(f"{as_flag(k, getattr(cfg, k))} contradicts the checkpoint's "
                           f"{as_flag(k, saved[k])}: a checkpoint keeps its settings; drop the flag, or "
                           "train a new --run-name")
    return dataclasses.replace(cfg, **saved), ckpt, run_dir


def load_data(cfg, ckpt, run_dir):
    """The data; a run goes on with the data it was trained on (SHA-256s and vocabulary), or not at all."""
    vocab, splits, sha256, found = data.load(cfg.data_dir or None, cfg.custom_data, cfg.no_spaces)
    if ckpt is not None and (ckpt["data_sha256"] != sha256 or ckpt["vocab"] != vocab.itos):
        theirs = ckpt["data_sha256"]
        changed = sorted(name for name in sha256 if sha256[name] != theirs.get(name))
        if sha256.keys() != theirs.keys():  # another layout: Multi30k against plain text
            raise RunError(f"the run in {run_dir} was trained on {', '.join(sorted(theirs))}, not on "
                           f"{', '.join(sorted(sha256))}: pass the --data-dir it used")
        if not changed:  # (a checkpoint is as it was written: see content_sha256)
            raise RunError(f"the data files are the run's, but data.py builds another vocabulary from them "
                           f"than the one in {run_dir}'s checkpoint: another version of data.py?")
        raise RunError(f"{', '.join(changed)} differs from the data the run in {run_dir} was trained on (by "
                       "the SHA-256s its checkpoint records): pass the --data-dir it used")
    return vocab, splits, sha256, found


def pick_device(name):
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    name = next(d for d in available if available[d]) if name == "auto" else name
    if not available[name]:
        raise RunError(f"--device {name} was asked for but is not available here")
    return torch.device(name)


def lr_at(step, total_steps, cfg):
    """The learning rate of a step: cosine from the peak down to 10% of it over training, or constant."""
    cosine = 0.1 + 0.45 * (1 + math.cos(math.pi * step / total_steps))
    return cfg.lr * cosine if cfg.lr_schedule == "cosine" else cfg.lr


def content_sha256(state):
    """The SHA-256 of a checkpoint's content but itself: its tensors' dtypes, shapes and bytes, and its other
    values' reprs, key by key. save_checkpoint records it and load_checkpoint checks it, so a checkpoint
    edited by hand (or damaged) is refused, never trusted with a value no run wrote."""
    digest = hashlib.sha256()

    def feed(value):
        if isinstance(value, dict):  # its keys, then their values (in an order no file changes)
            keys = sorted(value, key=repr)
            digest.update(f"dict {keys!r}\n".encode())
            for key in keys:
                feed(value[key])
        elif torch.is_tensor(value):
            digest.update(f"{value.dtype} {tuple(value.shape)}\n".encode())
            digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        else:  # numbers, strings, and lists of them (a float's repr is exact)
            digest.update(f"{value!r}\n".encode())

    feed({k: v for k, v in state.items() if k != "content_sha256"})
    return digest.hexdigest()


def save_checkpoint(state, path):
    """Serialise in memory (with its content_sha256), then write_file: a crash, a second Ctrl-C or a full disk
    never leaves a half-written checkpoint, and the previous one stays."""
    buffer = io.BytesIO()
    torch.save(state | {"content_sha256": content_sha256(state)}, buffer)
    try:
        write_file(path, buffer.getbuffer(), "wb")
    except RunError as e:
        previous = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
        raise RunError(f"{e}; {previous}") from None


def load_checkpoint(path):
    """This script's checkpoint, read with weights_only=True (tensors and plain containers, never code)."""
    if not path.is_file():
        hint = ("it is not a file" if path.exists()
                else "none written yet, or deleted: --resume trains on to the next val, which writes it (a "
                "finished run: with one more --epochs)"
                if (path.parent / "ckpt_last.pt").is_file()
                else "none yet: its run has not reached its first checkpoint, or stopped before it; "
                "--overwrite starts a stopped one afresh"
                if path.parent.is_dir() else "check --out-dir and --run-name")
        raise RunError(f"no checkpoint at {path} ({hint})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # empty, truncated, random bytes, a pickle with code in it
        raise RunError(f"{path} is not a readable checkpoint (empty, truncated, corrupt or not made by this "
                       "project)") from None
    if not isinstance(state, dict) or state.get("script") != SCRIPT:
        raise RunError(f"{path} is not a {SCRIPT} checkpoint")
    if not {"content_sha256", "run_id"} <= state.keys():  # (what this version of the script added last)
        raise RunError(f"{path} was written by an older version of {SCRIPT} (it has no content_sha256 or "
                       "run_id): use the commit that wrote it, or train the run again")
    if state["content_sha256"] != content_sha256(state):
        raise RunError(f"{path} is not as {SCRIPT} wrote it (its content does not match the SHA-256 it "
                       "records): edited or damaged?")
    garbled = [k for k, expected in CHECKPOINT_FIELDS.items() if not isinstance(state.get(k), expected)]
    if not garbled:  # a checkpoint of another version of the script: its flags
        garbled = common.invalid_settings(Config, state["args"])  # (kept flags missing, or values -h refuses)
    if garbled:
        raise RunError(f"{path} is not a whole {SCRIPT} checkpoint (no valid {', '.join(garbled)})")
    return state


def run_checkpoint(run_dir, resume):
    """The checkpoint a mode reads: ckpt_best.pt for --eval-only and --sample-only; for --resume ckpt_last.pt,
    or ckpt_best.pt where it is newer (it is written first: a process that died between the two writes left
    it ahead) or alone (it died before the first ckpt_last.pt). Both must be of the run (run_id) args.json
    and every evaluation record in metrics.jsonl name, and agree on the best val unless ckpt_best.pt is ahead:
    a file copied in is refused. (A checkpoint alone in a folder, as a colleague's, is read.)"""
    saved = {name: load_checkpoint(run_dir / name) for name in ("ckpt_last.pt", "ckpt_best.pt")
             if (run_dir / name).exists()}
    runs = {name: ckpt["run_id"] for name, ckpt in saved.items()}
    recorded = sorted({str(r["run_id"]) for r in read_metrics(run_dir) if "run_id" in r})  # (one, or none)
    runs |= {"metrics.jsonl": " and ".join(recorded)} if recorded else {}
    try:
        runs["args.json"] = str(json.loads((run_dir / "args.json").read_text())["run_id"])
    except FileNotFoundError:
        pass
    except (ValueError, LookupError, TypeError):
        raise RunError(f"{run_dir / 'args.json'} names no run_id (edited?): delete it (metrics.jsonl and the "
                       "checkpoints name the run too)") from None
    if len(set(runs.values())) > 1:
        ids = ", ".join(f"{run} in {name}" for name, run in runs.items())
        raise RunError(f"the files in {run_dir} are of different runs (run_id: {ids}): copied in, or edited? "
                       "Put back this run's own, or read another run's checkpoint alone, in a new --run-name")
    last, best = saved.get("ckpt_last.pt"), saved.get("ckpt_best.pt")
    if last and best and last["step"] >= best["step"] and last["best_val"] != best["best_val"]:
        raise RunError(f"the checkpoints in {run_dir} disagree about the best val NLPPS: {last['best_val']} "
                       f"in ckpt_last.pt, {best['best_val']} in ckpt_best.pt: an older ckpt_best.pt put "
                       "back? Put back the newest")
    if not resume or not saved:  # (a missing file: load_checkpoint says why)
        return best or load_checkpoint(run_dir / ("ckpt_last.pt" if resume else "ckpt_best.pt"))
    return max(saved.values(), key=lambda ckpt: ckpt["step"])


@contextlib.contextmanager
def lock_run_folder(run_dir):
    """Hold the run folder while this process uses it: an flock on its .lock file, which the OS releases
    however the process ends (no lock is ever stale). A second process on the same folder is refused."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(run_dir / ".lock", "a")
    except OSError as e:
        hint = " (copy it somewhere writable; --sample-only writes nothing)" if run_dir.is_dir() else ""
        raise RunError(f"cannot use the run folder {run_dir}: {e.strerror or e}{hint}") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(f"run folder {run_dir} is in use by another process; wait for it, or pick another "
                           "--run-name") from None
        yield


@contextlib.contextmanager
def stop_requests():
    """Ctrl-C or SIGTERM while training lands in the list this yields: the loop finishes its step, saves and
    stops. A second one, or one once the list holds "trained" (the final test), stops at once."""
    requests = []

    def request_stop(signum, frame):
        if requests:
            raise KeyboardInterrupt("interrupted: stopped at once, saving nothing more (the run folder is as "
                                    "last saved)")
        requests.append(signum)

    handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requests
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def read_metrics(run_dir):
    """metrics.jsonl's records, without a torn line (the process was killed while writing it) or anything
    else that is not a record (bytes that are not UTF-8 included)."""
    path, records = run_dir / "metrics.jsonl", []
    for line in path.read_text("utf-8", errors="replace").splitlines() if path.is_file() else []:
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if isinstance(record, dict) and all(isinstance(record.get(k), expected)
                                                for k, expected in RECORD_FIELDS.items()):
                records.append(record)
    return records


def rewrite_metrics(run_dir, records):
    """metrics.jsonl replaced by these records (at once: write_file)."""
    write_file(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))


def drop_samples_past(run_dir, step):
    """samples.txt without the samples of steps past `step`, which a resumed run replays (an epoch's samples
    are written before its checkpoints, so that a run killed between the two still has them)."""
    path = run_dir / "samples.txt"
    if path.is_file():
        blocks = re.split(r"(?m)^(?=# step \d+ )", path.read_text("utf-8", errors="replace"))
        starts = [re.match(r"# step (\d+) ", block) for block in blocks]
        write_file(path, "".join(b for b, start in zip(blocks, starts) if not start or int(start[1]) <= step))


def prepare_run_folder(run_dir, cfg, ckpt):
    """A new run starts in an empty folder (--overwrite empties it). A resumed one drops the records and
    samples past its checkpoint (it replays those steps) and its old test record (it ends with a new one)."""
    if ckpt is not None:
        if not (run_dir / "metrics.jsonl").is_file():
            log(run_dir, f"note: no metrics.jsonl in {run_dir}: the records up to step {ckpt['step']} are "
                "lost (curves.png starts after it)")
        drop_samples_past(run_dir, ckpt["step"])
        return rewrite_metrics(run_dir, [r for r in read_metrics(run_dir)
                                         if r["step"] <= ckpt["step"] and r["kind"] != "test"])
    old = [p for p in run_dir.iterdir() if p.name != ".lock"]
    if old and not cfg.overwrite:
        what, resumable = (("a run", "add --resume to continue it, ") if (run_dir / "ckpt_last.pt").exists()
                           else ("a run stopped before its first checkpoint", ""))
        raise RunError(f"{run_dir} holds {what}: {resumable}pick a new --run-name, or --overwrite to start "
                       "it afresh")
    for path in old:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def non_finite(what, step, run_dir):
    """The stop at a NaN or an infinity: nothing of the step is saved; the error names the kept checkpoint."""
    last = run_dir / "ckpt_last.pt"
    kept = f"{last} is kept (--resume replays the same steps)" if last.exists() else "(none yet) is kept"
    return RunError(f"non-finite {what} at step {step}: stopped before saving; the last good checkpoint "
                    f"{kept}; a new run with a lower --lr may get past it")


def write_file(path, content, mode="w"):
    """Append text to a file (mode "a"), or write a whole file ("w"; "wb": bytes) to a temp file, then rename
    it: a crash, a second Ctrl-C or a full disk never leaves half a file. A failed write names the file, as a
    full disk's error does not."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(path if mode == "a" else tmp, mode) as f:
            f.write(content)
        if mode != "a":
            tmp.replace(path)
    except OSError as e:
        raise RunError(f"could not write {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)  # (gone after the rename; left by a failed write or a second Ctrl-C)


def save_figure(fig, path):
    """Render a figure to PNG bytes, close it, and write them with write_file."""
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    write_file(path, png.getvalue(), "wb")


def log(run_dir, text, record=None):
    """Print a line and append it to log.txt, and a record (if any) to metrics.jsonl."""
    print(text, flush=True)
    write_file(run_dir / "log.txt", text + "\n", "a")
    if record is not None:
        write_file(run_dir / "metrics.jsonl", json.dumps(record) + "\n", "a")


def plot_curves(run_dir, title):
    """curves.png: train and val NLPPS against epoch, from metrics.jsonl."""
    records = read_metrics(run_dir)
    fig, (ax, segmentation) = plt.subplots(1, 2, figsize=(11, 4))  # and beside it, the val segmentation
    for key in ("boundary_f1", "token_f1", "type_f1", "cut_rate"):
        points = np.array([(r["epoch"], r[key]) for r in records if r["kind"] == "val" and key in r])
        segmentation.plot(*points.reshape(-1, 2).T, "o-", markersize=3, label=f"val {key}")
    segmentation.set(xlabel="epoch", title="segmentation (Viterbi words vs. true words)")
    segmentation.grid(alpha=0.3)
    segmentation.legend()
    for kind, style in (("train", ".-"), ("val", "o-")):
        of_kind = sorted((r for r in records if r["kind"] == kind), key=lambda r: r["epoch"])
        ax.plot([r["epoch"] for r in of_kind], [r["nlpps"] for r in of_kind], style, markersize=3, label=kind)
    ax.set(xlabel="epoch", ylabel="NLPPS (nats per caption)", title=title, yscale="log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, run_dir / "curves.png")


def evaluate_split(model, splits, split, cfg, device, run_dir, progress):
    """Score a split: the eval line, its record (with `progress`: step, epoch, parameters, training seconds),
    for test the per-caption nats compare.py reads. Returns the NLPPS."""
    t0 = time.time()
    nll, extra = evaluate(model, splits[split], cfg, device, full=split == "test",
                          gold=splits.get(split + "_spaces"))
    bound = extra.pop("bound")
    words = extra.pop("words")  # each caption's, in file order: the file any word-segmentation scorer reads
    write_file(run_dir / f"segmentation_{split}.txt", "".join(" ".join(w) + "\n" for w in words))
    nlpps, bpc = common.nlpps_and_bpc(nll, data.num_chars(splits[split]))  # nats a caption, bits a character
    if not math.isfinite(nlpps):  # (before its record: metrics.jsonl holds numbers only)
        raise non_finite(f"{split} NLPPS", progress["step"], run_dir)
    if split == "test":  # in file order, for compare.py; first, so that a test record always has its file
        write_file(run_dir / "test_nlpps.txt", "".join(f"{v:.4f}\n" for v in nll.tolist()))
    data_label = ", ".join(name for name, on in (("custom data", cfg.custom_data),
                                                 ("spaces removed", cfg.no_spaces)) if on)
    scalars = "".join(f" | {k} {v:.4g}" for k, v in extra.items()  # (precision and recall: in the record)
                      if isinstance(v, (int, float)) and not k.endswith(("_precision", "_recall")))
    seconds = time.time() - t0
    log(run_dir, f"eval {split} | epoch {progress['epoch']:.2f} | step {progress['step']} | "
        f"nlpps {nlpps:.2f} | bpc {bpc:.4f} ({', '.join(filter(None, [bound, data_label]))}){scalars} | "
        f"{seconds:.1f} s",
        dict(kind=split, **progress, nlpps=nlpps, bpc=bpc, bound=bound, data=data_label or "multi30k",
             seconds=seconds, **extra))
    return nlpps


def write_samples(model, vocab, splits, cfg, device, run_dir, progress):
    """Samples, printed and appended to samples.txt (--sample-only: printed only). Their own generator:
    sampling never shifts training."""
    # samples show their pieces; the first test captions are cut by Viterbi (and by q), and segments.png
    # shows the posterior probability of a cut after each of their characters
    step, epoch = progress["step"], int(progress["epoch"])
    generator = torch.Generator().manual_seed(cfg.seed + epoch)
    ids, extra = sample(model, cfg.show_samples, cfg, device, generator)
    lines = [f"[SAMPLE] {with_cuts(vocab, s, cuts)}" for s, cuts in zip(ids, extra["cuts"])]
    figures = None if cfg.sample_only else run_dir  # (--sample-only writes nothing)
    lines += show_segments(model, vocab, splits["test"][:SHOWN].to(device), figures)
    if cfg.sample_only:  # (printed only: the run folder stays as the run left it)
        return print("\n".join(lines), flush=True)
    header = f"# step {step} (epoch {epoch}), temperature {cfg.temperature}\n"
    write_file(run_dir / "samples.txt", header + "".join(line + "\n" for line in lines), "a")
    log(run_dir, "\n".join(lines))


def run(argv=None):
    cfg, ckpt, run_dir = open_run(argv)
    check_flags(cfg)
    if cfg.segment:
        return segment_file(cfg, cfg.segment, cfg.segment_out)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    vocab, splits, sha256, found = load_data(cfg, ckpt, run_dir)
    cfg = dataclasses.replace(cfg, custom_data=found["custom"])  # (a plain-text corpus is custom data)
    train = splits["train"][: cfg.limit_train or None]
    model = build_model(vocab, train, cfg).to(device)
    optimizer = (torch.optim.RMSprop(model.parameters(), lr=cfg.lr, eps=0.01) if cfg.optimizer == "rmsprop"
                 else torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay))
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    last_step = min(total_steps, cfg.max_steps or total_steps)
    if cfg.resume and 0 < cfg.max_steps < ckpt["step"]:
        raise RunError(f"--max-steps {cfg.max_steps} is before step {ckpt['step']}, where the run is")
    if cfg.resume and ckpt["step"] > total_steps:  # (fewer --epochs than the run has trained)
        raise RunError(f"--epochs {cfg.epochs} ends before step {ckpt['step']}, where the run is: give at "
                       f"least --epochs {math.ceil(ckpt['step'] / steps_per_epoch)}")
    has_best = (run_dir / "ckpt_best.pt").is_file()  # (missing on --resume: deleted, or no epoch ended yet)
    if cfg.resume and ckpt["step"] >= last_step and not has_best:
        more = f"--max-steps {last_step + 1}" if last_step < total_steps else f"--epochs {cfg.epochs + 1}"
        raise RunError(f"the run is at its last step, {ckpt['step']}, and has no ckpt_best.pt to test "
                       f"(deleted?): --resume {more} trains on to a new one")
    order = torch.Generator().manual_seed(cfg.seed)  # the data order
    n_params = sum(p.numel() for p in model.parameters())
    step, best_val, losses = 0, math.inf, []
    run_id = ckpt["run_id"] if ckpt is not None else secrets.token_hex(8)  # (see run_checkpoint)
    train_seconds, train_cpu_seconds = 0.0, 0.0  # wall-clock and CPU time of the training steps
    try:
        if ckpt is not None:  # its weights; for --resume also the optimizer and both random streams
            model.load_state_dict(ckpt["model"])
            step, best_val = ckpt["step"], ckpt["best_val"]
            if not has_best:  # the next val writes one
                best_val = math.inf
            train_seconds, train_cpu_seconds = ckpt["train_seconds"], ckpt["train_cpu_seconds"]
            losses = ckpt["train_losses"] if cfg.resume else []  # since the last train record
        if cfg.resume:
            optimizer.load_state_dict(ckpt["optimizer"])
            order.set_state(ckpt["epoch_rng"])
            torch.set_rng_state(ckpt["torch_rng"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        error = " ".join(str(e).split())[:240]  # (torch's first line names no key)
        raise RunError(f"the checkpoint in {run_dir} does not fit this model ({error})") from None
    forward = torch.compile(model.loss) if cfg.compile else model.loss
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")

    def progress():  # where the run is: every record and checkpoint says it
        return dict(step=step, epoch=step / steps_per_epoch, n_params=n_params, train_seconds=train_seconds,
                    train_cpu_seconds=train_cpu_seconds, run_id=run_id)

    if cfg.sample_only:  # it prints only: no lock, no file written (beside a training run too, or read-only)
        return write_samples(model, vocab, splits, cfg, device, run_dir, progress())
    if cfg.eval_only:
        with lock_run_folder(run_dir):
            records = read_metrics(run_dir)
            rewrite_metrics(run_dir, records)  # (drops a torn last line: the next one is whole)
            try:  # the new val and test records replace this step's once both are written, or none does
                for split in ("val", "test"):
                    evaluate_split(model, splits, split, cfg, device, run_dir, progress())
                *_, val, test = read_metrics(run_dir)
                records = [r for r in records if r["kind"] == "train" or r["step"] != step] + [val, test]
            finally:
                rewrite_metrics(run_dir, records)
            return
    with lock_run_folder(run_dir), stop_requests() as stop:
        prepare_run_folder(run_dir, cfg, ckpt)
        args = dataclasses.asdict(cfg)
        write_file(run_dir / "args.json", json.dumps(dict(args, data_sha256=sha256, run_id=run_id), indent=2))
        log(run_dir, f"{SCRIPT} | {f'resumed at step {step}' if step else 'new run'} | {cfg.epochs} epochs | "
            f"{n_params:,} parameters | {len(train):,} training captions | {device} {cfg.dtype} | "
            f"{steps_per_epoch} steps/epoch | run folder {run_dir}")
        log(run_dir, found["summary"])
        for k in ("dtype", "compile"):  # run control, but the arithmetic changes with it: say so
            if ckpt is not None and ckpt["args"].get(k, args[k]) != args[k]:
                log(run_dir, f"note: {as_flag(k, args[k])}, where the run had {as_flag(k, ckpt['args'][k])}")
        seen, window_t0, epoch_batches = 0, time.time(), None
        while step < last_step:
            if epoch_batches is None:  # an epoch starts (or a resumed one goes on): its order, from `order`
                epoch_rng, epoch_t0 = order.get_state(), time.time()
                epoch_batches = data.batches(train, cfg.batch_size, order, skip=step % steps_per_epoch)
            x, lr = next(epoch_batches), lr_at(step, total_steps, cfg)
            step_t0, step_cpu_t0 = time.time(), time.process_time()
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast:
                loss = forward(x.to(device)).mean()
            if not torch.isfinite(loss):
                raise non_finite("loss", step + 1, run_dir)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step, losses, seen = step + 1, losses + [loss.item()], seen + len(x)
            train_seconds += time.time() - step_t0
            train_cpu_seconds += time.process_time() - step_cpu_t0
            if step % cfg.log_every == 0 or step == 1:
                now, eta = time.time(), round(train_seconds / step * (last_step - step))
                record = dict(kind="train", step=step, epoch=step / steps_per_epoch,
                              nlpps=sum(losses) / len(losses), seq_per_s=seen / (now - window_t0))
                log(run_dir, f"step {step} | epoch {record['epoch']:.2f} | train nlpps {record['nlpps']:.2f} "
                    f"| {record['seq_per_s']:.0f} seq/s | lr {lr:.2e} | epoch time {now - epoch_t0:.0f} s | "
                    f"ETA {eta // 60}m{eta % 60:02d}s (training steps)", record)
                losses, seen, window_t0 = [], 0, now
            if not (stop or step == last_step or step % steps_per_epoch == 0):
                continue
            # the end of an epoch (or of the run, or a Ctrl-C): val, samples, checkpoints, curves
            is_best, epoch_done = False, step % steps_per_epoch == 0
            if not stop or epoch_done:  # (Ctrl-C mid-epoch saves the step as it is)
                val = evaluate_split(model, splits, "val", cfg, device, run_dir, progress())
                if epoch_done:
                    is_best, best_val = val <= best_val, min(val, best_val)
                else:  # a --max-steps stop, where a straight run has no val: no candidate for the best,
                    is_best = best_val == math.inf  # but before any epoch's end it stands in as ckpt_best.pt
                if cfg.show_samples:  # (before the checkpoints: see drop_samples_past)
                    write_samples(model, vocab, splits, cfg, device, run_dir, progress())
            state = dict(script=SCRIPT, model=model.state_dict(), optimizer=optimizer.state_dict(),
                         args=args, vocab=vocab.itos, data_sha256=sha256, best_val=best_val,
                         epoch_rng=order.get_state() if epoch_done else epoch_rng,  # (mid-epoch: replayed)
                         torch_rng=torch.get_rng_state(), train_losses=losses, **progress())
            if is_best:  # first: ckpt_last.pt never records a best_val whose checkpoint is not written yet
                save_checkpoint(state, run_dir / "ckpt_best.pt")
            save_checkpoint(state, run_dir / "ckpt_last.pt")
            if stop:
                raise KeyboardInterrupt(f"interrupted at step {step}: saved {run_dir / 'ckpt_last.pt'}; "
                                        "add --resume to continue from it")
            plot_curves(run_dir, f"{SCRIPT} ({cfg.run_name})")
            epoch_batches = None
        stop.append("trained")  # from here on a signal stops at once
        best = load_checkpoint(run_dir / "ckpt_best.pt")
        model.load_state_dict(best["model"])
        at_best = dict(step=best["step"], epoch=best["step"] / steps_per_epoch)
        evaluate_split(model, splits, "test", cfg, device, run_dir, progress() | at_best)


def main(argv=None):
    """Bad input of any kind ends in one line on stderr and exit status 1 (a bad flag: 2, as argparse's usage
    errors), never in a traceback."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # kill (outside training) stops as Ctrl-C does
    try:
        run(argv)
    except (RunError, data.DataError) as e:
        sys.exit(f"{SCRIPT}: error: {e}")
    except KeyboardInterrupt as e:
        for signum in (signal.SIGINT, signal.SIGTERM):  # the message is printed, whatever signal follows it
            signal.signal(signum, signal.SIG_IGN)
        sys.exit(f"{SCRIPT}: {str(e) or 'interrupted'}")
    except OSError as e:  # a full disk, a read-only folder: say which file
        sys.exit(f"{SCRIPT}: error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""))
    except RuntimeError as e:  # the one failure of a sound run: memory (e.g. --embed 100000)
        if "alloc" not in str(e) and "out of memory" not in str(e):
            raise
        sys.exit(f"{SCRIPT}: error: out of memory: {str(e).splitlines()[0][:200]}")


if __name__ == "__main__":
    main()

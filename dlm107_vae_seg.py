"""DLM107: a segmental language model. Its latent variable cuts a caption into pieces: are they the words?

A caption x = c_1 .. c_n (n <= 99 characters, see data.py) is a sequence of pieces, each of 1..K characters
(K = --max-piece), then the empty piece that ends it. A piece starting after i characters depends on the
characters before it, not on how they were cut (Kawakami, Dyer & Blunsom 2019; Sun & Deng 2018):
    h_i = GRU(h_{i-1}, e[c_i]),  h_0 from <bos>                          (context GRU over the characters)
    p_chars(piece | h_i) = prod_t p(c_t | c_<t, s_0 = tanh(W h_i)) * p(<pad> | all of it)   (piece GRU;
                           --piece-context adds U h_i to its input at every character, not at the start only)
    p(piece | h_i) = g(h_i) p_lex(piece | h_i) + (1 - g(h_i)) p_chars(piece | h_i)        (lexical memory)
p_lex is a distribution over the M most frequent substrings of the training captions (--lexicon, lengths
--lex-min..--lex-max): a mixture of C learned softmaxes over the entries, weighted by the context,
    p_lex(e | h_i) = sum_c pi_c(h_i) q_c(e),   pi = softmax(W h_i),  q_c = softmax(l_c)   (C = --lex-components)
(a full softmax of <h_i, v_e> needs a (starts x M) exponential per batch: 2-3x the rest of a step at M = 10000).
Which windows are entries is found by walking a trie of the lexicon, K tensor lookups per batch.
A piece ends with <pad>; <pad> as its first symbol is the
empty piece, which ends the caption. Where a piece has room for r = min(K, 99 - i) characters only, its end
after r characters is forced (costs nothing), p_lex is renormalised over the entries of <= r characters
(g = 0 where none fits), and a caption of 99 characters ends by force: p is a distribution over exactly
the strings of <= 99 characters, and (x, z) <-> pieces is one-to-one.

Because a piece depends on the characters before it only, the sum over all segmentations z is a chart:
    alpha_0 = 0,  alpha_j = logsumexp_{k=1..K} alpha_{j-k} + log p(c_{j-k+1..j} | h_{j-k})
    log p(x) = alpha_n + log p(empty piece | h_n)                                  (exact; --inference exact)
max instead of logsumexp gives the most likely segmentation (Viterbi); the gradient of log p(x) with
respect to the piece scores gives the posterior probability of every piece, hence of a cut after each
character. The piece GRU runs over every (start, length <= K) window at once (an unfold of the caption).

--inference reinforce trains the same p by the notes' segmentation VAE instead: q(z|x) = a Bernoulli cut
after each character from a GRU (--parser causal|bi), cuts forced as in p;
    log p(x) >= ELBO = E_q[log p(x, z) - log q(z|x)],  KL(q || p(z|x)) = log p(x) - ELBO (logged)
with pathwise gradients for p and REINFORCE (leave-one-out baseline over --train-samples draws) for q.
--segmenter spaces trains log p(x, z = the cuts after every space) (DLM106). Every reported NLPPS is the
exact -log p(x) of the model; -ELBO, the IW bound and the joint of the spaces segmentation are extras.
--no-spaces removes the spaces before encoding (data.py: then the first 99 non-space characters, and no
space in the vocabulary; the papers' protocol; a different string, labelled so) and scores the cuts against
the removed spaces. Boundary F1 with the spaces kept: a cut just before or just after a space marks that word
boundary; word F1: a word (the characters between two boundaries, spaces left out) is right when both its
ends are.
README row:  python dlm107_vae_seg.py      (and --lexicon 0, --inference reinforce, --segmenter spaces, --no-spaces)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data
from common import UserError, arg

SCRIPT = "dlm107_vae_seg"
SHOWN = 4  # test captions printed with their cuts and drawn in segments.png
NEG = -1e9  # log of an impossible piece: finite, so logsumexp never takes the gradient of -inf - -inf


@dataclass
class Config(common.BaseConfig):
    embed: int = arg(128, "embedding and context GRU width E", low=1)
    piece_embed: int = arg(64, "piece-decoder GRU width D", low=1)
    max_piece: int = arg(10, "K: the most characters in a piece (the end after K is forced)", low=1, high=99)
    lexicon: int = arg(10000, "M: lexical memory of the M most frequent training substrings (0: none)", low=0)
    lex_min: int = arg(2, "shortest substring in the lexicon", low=1)
    lex_max: int = arg(0, "longest substring in the lexicon (<= --max-piece; 0: --max-piece)", low=0)
    lex_components: int = arg(64, "C: p_lex(entry | h) mixes C learned distributions over the entries", low=1)
    piece_context: bool = arg(False, "the piece GRU reads U h_i at every character, not only through its start state")
    inference: str = arg("exact", "train by the exact log p(x), or by the ELBO of a REINFORCE-trained q(z|x)",
                         choices=("exact", "reinforce"))
    segmenter: str = arg("learned", "learned: sum over (or infer) the cuts; spaces: train on the cuts after every "
                         "space only (DLM106)", choices=("learned", "spaces"))
    piece_cost: float = arg(0.0, "exact: train on log sum_z p(x, z) exp(-piece_cost * pieces in z), which favours "
                            "fewer, longer pieces (the reported NLPPS stays the exact log p(x))", low=0)
    parser: str = arg("causal", "reinforce: q's GRU sees c_<=t (causal) or all of x (bi)", choices=("causal", "bi"))
    train_samples: int = arg(4, "reinforce: segmentations drawn per caption for the ELBO, its gradient, val's -ELBO", low=2)
    iw_samples: int = arg(100, "reinforce: samples per caption of the test IW bound", low=1, run=True)
    spaces: bool = arg(True, "--no-spaces removes the spaces (a different string: its NLPPS is labelled 'spaces removed')")
    batch_size: int = arg(64, "captions per step", low=1)
    lr: float = arg(4e-3, "peak learning rate", low=0, low_open=True)
    eval_batch_size: int = arg(100, "captions per evaluation batch", low=1, run=True)

    @property
    def no_spaces(self) -> bool:  # (a field named no_spaces would make argparse read --no-spaces as "False")
        return not self.spaces


CURVES_SIDE = ("segmentation (Viterbi cuts vs. words)", [("val", "f1"), ("val", "word_f1"), ("val", "cut_rate")])


# ----------------------------------------------------------------------------- lexicon
def build_lexicon(x, size, lex_min, lex_max):
    """x (N, L) training captions -> (size, lex_max) ids then PAD: the most frequent substrings (overlapping
    occurrences counted) of lex_min..lex_max characters, ties broken by length then ids, stored by length.
    A substring is counted by its number in base V (uint64, exact while V ** lex_max < 2 ** 64)."""
    V, found = int(x.max()) + 1, []  # (count, length, ids) of the M most frequent of each length
    if V ** lex_max >= 2 ** 64:
        raise UserError(f"--lex-max {lex_max} is too long for a vocabulary of {V} (V ** lex_max >= 2 ** 64)")
    for length in range(lex_min, lex_max + 1 if size else 0):
        windows = x.unfold(1, length, 1).reshape(-1, length)               # (N * (L - length + 1), length)
        windows = windows[(windows != data.PAD).all(1)].numpy().astype(np.uint64)
        keys = windows @ (np.uint64(V) ** np.arange(length - 1, -1, -1, dtype=np.uint64))
        unique, counts = np.unique(keys, return_counts=True)               # in lexicographic order of the ids
        top = np.argsort(-counts, kind="stable")[:size]
        digits = unique[top, None] // np.uint64(V) ** np.arange(length - 1, -1, -1, dtype=np.uint64) % np.uint64(V)
        found += [(c, length, ids) for c, ids in zip(counts[top].tolist(), digits.astype(np.int64).tolist())]
    chosen = sorted(sorted(found, key=lambda f: (-f[0], f[1], f[2]))[:size], key=lambda f: f[1])
    return torch.tensor([ids + [data.PAD] * (lex_max - len(ids)) for _, _, ids in chosen],
                        dtype=torch.long).view(-1, lex_max)


def lexicon_trie(lexicon, vocab_size):
    """-> child (nodes, V): the node reached by reading a character (node 0: no entry starts so, absorbing;
    node 1: the root), and entry (nodes,): the lexicon id spelled by the path to a node, or -1."""
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


# ----------------------------------------------------------------------------- segmentations
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


def chart(ends, n, viterbi=False):
    """ends (B, L, K) from by_end -> (B,) alpha_n = log sum (max, if viterbi) over the segmentations of the
    first n characters of the product of their pieces' probabilities; with viterbi also the (B, L) cuts."""
    B, L, K = ends.shape
    alpha = [ends.new_full((B,), NEG)] * (K - 1) + [ends.new_zeros(B)]  # alpha_{1-K} .. alpha_0
    best, ends = [], ends.unbind(1)  # unbind: one backward for all j (indexing would allocate (B, L, K) per j)
    for j in range(1, int(n.max()) + 1 if len(n) else 1):
        scores = torch.stack(alpha[:-K - 1:-1], -1) + ends[j]  # (B, K): alpha_{j-k} + piece of k, k = 1..K
        if viterbi:
            value, k = scores.max(-1)
            best.append(k + 1)
        else:
            value = scores.logsumexp(-1)
        alpha.append(value)
    at_n = torch.stack(alpha[K - 1:], 1).gather(1, n[:, None]).squeeze(1)
    if not viterbi:
        return at_n
    best = torch.stack(best, 1) if best else n.new_zeros(B, 1)     # (B, max n): best length ending after j
    cuts, pos, rows = torch.zeros(B, L, dtype=torch.bool, device=n.device), n.clone(), torch.arange(B, device=n.device)
    while (pos > 0).any():  # walk back from the end, one piece per step
        on = pos > 0
        cuts[rows[on], pos[on] - 1] = True
        pos = torch.where(on, pos - best.gather(1, (pos - 1).clamp(min=0)[:, None]).squeeze(1), pos)
    return at_n, cuts


def cut_probabilities(scores, n):
    """scores (B, L, K) from piece_scores -> (B, L): the posterior probability of a cut after character t, the
    sum over the pieces that end there of their posterior probability d log p(x) / d log p(piece)."""
    with torch.enable_grad():
        scores = scores.detach().requires_grad_()
        (piece_probs,) = torch.autograd.grad(chart(by_end(scores), n).sum(), scores)
    return F.pad(by_end(piece_probs, fill=0.0).sum(-1)[:, 1:], (0, 1))


def log_joint(ends, closing, n, cuts):
    """log p(x, z) for segmentations cuts (..., B, L) (every piece <= K characters, a cut after the last one)."""
    L, K = cuts.shape[-1], ends.shape[-1]
    t = torch.arange(L, device=cuts.device)
    start = torch.where(F.pad(cuts, (1, -1), value=True), t, 0).cummax(-1).values  # first character of t's piece
    length = (t - start).clamp(max=K - 1)                                          # its length - 1 so far
    piece = F.pad(ends[:, 1:], (0, 0, 0, 1)).expand(*cuts.shape, K).gather(-1, length.unsqueeze(-1)).squeeze(-1)
    return torch.where(cuts, piece, 0.0).sum(-1) + closing.gather(1, n[:, None]).squeeze(1)


# ----------------------------------------------------------------------------- model
class Model(nn.Module):
    def __init__(self, vocab_size: int, space: int, lexicon: torch.Tensor, cfg: Config):
        super().__init__()
        E, D = cfg.embed, cfg.piece_embed
        self.V, self.K, self.space = vocab_size, cfg.max_piece, space
        self.spaces, self.reinforce, self.train_samples = cfg.segmenter == "spaces", cfg.inference == "reinforce", cfg.train_samples
        self.piece_cost = cfg.piece_cost
        self.embed = nn.Embedding(vocab_size, E)
        self.context = nn.GRU(E, E, batch_first=True)
        self.piece_init = nn.Linear(E, D)
        self.piece_start = nn.Parameter(torch.randn(E))  # the input before a piece's first character
        self.piece_cell = nn.GRUCell(E, D)
        self.piece_out = nn.Linear(D, vocab_size)
        self.piece_context = nn.Linear(E, 3 * D, bias=False) if cfg.piece_context else None  # added to every input
        self.register_buffer("never", torch.zeros(vocab_size).index_fill(0, torch.tensor(data.BOS), -math.inf),
                             persistent=False)
        self.register_buffer("lexicon", lexicon)  # (M, lex_max) saved in the checkpoint: a plain tensor
        if len(lexicon):
            self.index_lexicon()
            self.register_load_state_dict_post_hook(lambda model, keys: model.index_lexicon())  # a checkpoint's
            self.lex_mix = nn.Linear(E, cfg.lex_components)
            self.lex_logits = nn.Parameter(torch.randn(cfg.lex_components, len(lexicon)))
            self.gate = nn.Linear(E, 1)
        if self.reinforce:  # q has its own embedding: REINFORCE noise never reaches p's
            self.seg_embed = nn.Embedding(vocab_size, E)
            self.seg_rnn = nn.GRU(E, E, batch_first=True, bidirectional=cfg.parser == "bi")
            self.cut = nn.Linear(E * (2 if cfg.parser == "bi" else 1), 1)

    def index_lexicon(self):
        """The lexicon's trie, the length of every entry and the lengths there are (sorted): from self.lexicon."""
        child, entry = lexicon_trie(self.lexicon.cpu(), self.V)
        for name, value in dict(trie=child, trie_entry=entry, lex_len=(self.lexicon != data.PAD).sum(1)).items():
            self.register_buffer(name, value.to(self.lexicon.device), persistent=False)
        self.register_buffer("lengths", self.lex_len.unique(), persistent=False)

    def contexts(self, x):
        """x (B, L) -> (B, L, E): h_i, the context GRU's state after <bos> and i characters."""
        return self.context(self.embed(torch.cat([torch.full_like(x[:, :1], data.BOS), x[:, :-1]], 1)))[0]

    def lexicon_log_probs(self, h, room):
        """h (P, E), room (P,) -> log pi_c(h) - log Z_c(room) (P, C), so that log p_lex(e | h) = logsumexp_c of it
        + l_c[e], with q_c renormalised over the entries of <= room characters (Z_c: once per batch, by length);
        and log g, log (1 - g) (P,), g = 0 where no entry fits."""
        by_length = torch.stack([self.lex_logits[:, self.lex_len == length].logsumexp(-1) for length in self.lengths], 0)
        log_norm = F.pad(by_length.logcumsumexp(0), (0, 0, 1, 0), value=NEG)  # (groups + 1, C): lengths <= each
        fitting = (self.lengths <= room[:, None]).sum(1)                     # (P,) length groups that fit
        log_pi = F.log_softmax(self.lex_mix(h), -1) - log_norm[fitting]                             # (P, C)
        fits, gate = room >= self.lex_len.min(), self.gate(h).squeeze(-1)
        return log_pi, torch.where(fits, F.logsigmoid(gate), NEG), torch.where(fits, F.logsigmoid(-gate), 0.0)

    def lexicon_ids(self, windows):
        """windows (P, K) characters -> (P, K) lexicon id of the first k characters, or -1: a walk down the trie."""
        node, ids = torch.ones_like(windows[:, 0]), []
        for t in range(windows.shape[1]):
            node = self.trie[node, windows[:, t]]
            ids.append(self.trie_entry[node])
        return torch.stack(ids, 1)

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
        """The piece GRU's state after each character of every window: (P, K, D), started from tanh(W h_i) with
        the input piece_start, then c_{i+1} .. c_{i+K-1}; the input half of a character is computed once per
        character of the caption, not once per window."""
        K = self.K
        gates_in = self.piece_input(self.embed(F.pad(x, (0, K))))                           # (B, L+K, 3D)
        b, i = live.nonzero(as_tuple=True)
        gates_in = gates_in[b[:, None], i[:, None] + torch.arange(K - 1, device=x.device)]  # (P, K-1, 3D)
        s, states, context = torch.tanh(self.piece_init(h)), [], self.piece_context_gates(h)
        for gates in [self.piece_input(self.piece_start).expand(len(b), -1)] + list(gates_in.unbind(1)):
            s = self.piece_step(gates + context, s)
            states.append(s)
        return torch.stack(states, 1)

    def piece_scores(self, x):
        """x (B, L) -> scores (B, L, K): log p(piece c_{i+1..i+k} | h_i) at [b, i, k-1] (NEG past the caption's
        end), and closing (B, L): log p(empty piece | h_i) (0 at i = L-1: the end is forced there)."""
        B, L = x.shape
        n, i, k = data.num_chars(x), torch.arange(L, device=x.device), torch.arange(1, self.K + 1, device=x.device)
        room = (L - 1 - i).clamp(max=self.K)                                     # (L,) characters a piece may hold
        live = (i <= n[:, None]) & (room > 0)                                    # (B, L) starts decoded
        windows = F.pad(x, (0, self.K), value=data.PAD).unfold(1, self.K, 1)[:, :L][live]  # (P, K)
        h, room = self.contexts(x)[live], room.expand(B, L)[live]               # (P, E), (P,)
        log_p = F.log_softmax(self.piece_out(self.piece_states(x, live, h)) + self.never, -1)     # (P, K, V)
        chars, stop = log_p.gather(-1, windows.unsqueeze(-1)).squeeze(-1), log_p[..., data.PAD]    # (P, K) each
        pieces = chars.cumsum(-1) + torch.where(k < room[:, None], F.pad(stop[:, 1:], (0, 1)), 0.0)
        empty = stop[:, 0]
        if len(self.lexicon):
            log_pi, log_g, log_not_g = self.lexicon_log_probs(h, room)
            ids = self.lexicon_ids(windows)
            hit = ids >= 0
            lex = torch.full_like(pieces, NEG)  # log p_lex of the windows that are entries: (hits, C) -> (P, K)
            lex[hit] = (log_pi[hit.nonzero()[:, 0]] + self.lex_logits.t()[ids[hit]]).logsumexp(-1)
            pieces = torch.logaddexp(log_g[:, None] + lex, log_not_g[:, None] + pieces)
            empty = log_not_g + empty
        scores = pieces.new_full((B, L, self.K), NEG)
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

    # --- the segmenter q(z|x) of --inference reinforce
    def cut_logits(self, x):
        """x (B, L) -> (B, L) logit of a cut after each character."""
        return self.cut(self.seg_rnn(self.seg_embed(x))[0]).squeeze(-1)

    def draw_cuts(self, x, k, generator=None, drawn=None, greedy=False):
        """x (B, L) -> cuts (k, B, L) from q (or `drawn`; or q's likelier decision at each character if greedy)
        and log q(cuts|x) (k, B). Noise from the CPU RNG: a checkpoint's torch_rng replays it."""
        logits = self.cut_logits(x).expand(k, -1, -1)
        if greedy:
            drawn = logits > 0
        elif drawn is None:
            drawn = torch.rand(logits.shape, generator=generator).to(x.device) < logits.sigmoid()
        cuts, free = force_cuts(drawn, data.num_chars(x), self.K)
        log_q = -F.binary_cross_entropy_with_logits(logits, cuts.to(logits.dtype), reduction="none")
        return cuts, torch.where(free, log_q, 0.0).sum(-1)

    def loss(self, x, drawn=None):
        """x (B, L) -> (B,) training loss: -log p(x) (exact), -log p(x, z_spaces) (spaces), or the -ELBO estimate
        from K draws of q (reinforce; gradient pathwise for p, REINFORCE with a leave-one-out baseline for q)."""
        if not (self.spaces or self.reinforce):
            return -self.log_prob(x, self.piece_cost)[0]
        scores, closing = self.piece_scores(x)
        ends, n = by_end(scores), data.num_chars(x)
        if self.spaces:
            return -log_joint(ends, closing, n, force_cuts(x == self.space, n, self.K)[0])
        cuts, log_q = self.draw_cuts(x, self.train_samples, drawn=drawn)
        log_p = log_joint(ends, closing, n, cuts)                                        # (k, B)
        # the ELBO's -grad log q term has expectation zero and only adds variance: left out
        surrogate = common.reinforce_surrogate(log_q, (log_p - log_q).detach())
        return -(log_p - log_q.detach()).mean(0) - (surrogate - surrogate.detach())


def build_model(vocab, train, cfg):
    lex_max = cfg.lex_max or cfg.max_piece
    if lex_max > cfg.max_piece or cfg.lex_min > lex_max:
        raise UserError(f"need --lex-min <= --lex-max <= --max-piece, got {cfg.lex_min}, {lex_max}, {cfg.max_piece}")
    if cfg.segmenter == "spaces" and (cfg.inference == "reinforce" or cfg.no_spaces):
        raise UserError("--segmenter spaces cuts after the spaces: not with --inference reinforce or --no-spaces")
    return Model(len(vocab), vocab.stoi.get(" ", -1), build_lexicon(train, cfg.lexicon, cfg.lex_min, lex_max), cfg)


# ----------------------------------------------------------------------------- segmentation scores
def segmentation_counts(x, cuts, space, gold=None):
    """x (B, L), cuts (B, L) -> counts of inner cuts (not after the last character), decisions, pieces, boundary
    hits, gold boundaries, word hits, predicted and gold words. Gold: the removed spaces (gold, --no-spaces), or
    the spaces of x: a cut just before or just after a space marks it, each space counted once and each cut
    given to one space (a space with cuts on both sides: one hit and one false cut). Words: the spans between
    boundaries in the string without spaces (a word is right when both its ends are)."""
    n = data.num_chars(x)
    inner = torch.arange(x.shape[1], device=x.device) < n[:, None] - 1
    cut = cuts & inner
    if gold is None:
        is_space = x == space
        after_prev = F.pad(cut & ~is_space, (1, -1))               # a cut just before character t
        gold_b = is_space & inner & F.pad(inner, (1, -1))  # spaces with a character on each side
        hit = gold_b & ((cut & is_space) | after_prev)
        position = (~is_space & (x != data.PAD)).long().cumsum(1)  # characters without spaces up to t
    else:
        gold_b = gold & inner
        hit, position = cut & gold_b, torch.arange(1, x.shape[1] + 1, device=x.device).expand_as(x)
    word_hits = words = gold_words = 0
    for p, c, g, m in zip(position.tolist(), cut.tolist(), gold_b.tolist(), position.gather(1, (n - 1).clamp(min=0)[:, None]).tolist()):
        spans = [sorted({0, m[0]} | {p[t] for t in range(len(p)) if flags[t]}) for flags in (c, g)]
        pred, true = [set(zip(s[:-1], s[1:])) for s in spans]
        word_hits, words, gold_words = word_hits + len(pred & true), words + len(pred), gold_words + len(true)
    return torch.tensor([cut.sum(), inner.sum(), cuts.sum(), n.sum(), hit.sum(), gold_b.sum(), word_hits,
                         words, gold_words], dtype=torch.float64)


def segmentation_stats(counts, prefix=""):
    cuts, decisions, pieces, chars, hits, gold, word_hits, words, gold_words = counts.tolist()
    p, r = hits / max(cuts, 1), hits / max(gold, 1)
    wp, wr = word_hits / max(words, 1), word_hits / max(gold_words, 1)
    return {prefix + k: v for k, v in dict(
        cut_rate=cuts / max(decisions, 1), piece_len=chars / max(pieces, 1), precision=p, recall=r,
        f1=2 * hits / max(cuts + gold, 1), word_precision=wp, word_recall=wr,
        word_f1=2 * word_hits / max(words + gold_words, 1)).items()}


# ----------------------------------------------------------------------------- evaluate, sample
@torch.no_grad()
def evaluate(model, x, cfg, device, final=True, gold=None):
    """Exact -log p(x) per caption (file order), and the Viterbi segmentation scored against the words (gold:
    the removed spaces with --no-spaces). reinforce adds -ELBO (--train-samples draws), on the final (test)
    evaluation the IW bound (--iw-samples), KL(q || p(z|x)) and q's segmentation; spaces adds its joint."""
    model.eval()
    generator, nll, extra = common.eval_generator(), [], {}
    counts = {"": 0, "q_": 0}
    for start in range(0, len(x), cfg.eval_batch_size):
        batch = x[start:start + cfg.eval_batch_size].to(device)
        log_px, (scores, ends, closing, n) = model.log_prob(batch)
        best = chart(ends, n, viterbi=True)[1]
        nll.append(-log_px.double().cpu())
        g = None if gold is None else gold[start:start + len(batch)].to(device)
        counts[""] = counts[""] + segmentation_counts(batch, best, model.space, g)
        if model.spaces:
            joint = log_joint(ends, closing, n, force_cuts(batch == model.space, n, model.K)[0])
            extra["joint_nlpps"] = extra.get("joint_nlpps", 0.0) - joint.sum().item()
        if model.reinforce:
            f = []
            total = cfg.iw_samples if final else cfg.train_samples
            for i in range(0, total, cfg.train_samples):  # --train-samples at a time: memory as in training
                cuts, log_q = model.draw_cuts(batch, min(cfg.train_samples, total - i), generator)
                f.append((log_joint(ends, closing, n, cuts) - log_q).double().cpu())
            f = torch.cat(f)
            extra["elbo_nlpps"] = extra.get("elbo_nlpps", 0.0) - f[:cfg.train_samples].mean(0).sum().item()
            if final:
                extra["iw_nlpps"] = extra.get("iw_nlpps", 0.0) - common.logmeanexp(f, 0).sum().item()
            counts["q_"] = counts["q_"] + segmentation_counts(batch, model.draw_cuts(batch, 1, greedy=True)[0][0],
                                                              model.space, g)
    model.train()
    nll = torch.cat(nll)
    extra = {k: v / len(x) for k, v in extra.items()}
    if model.reinforce:
        extra["kl_gap"] = extra["elbo_nlpps"] - nll.mean().item()
        extra.update(segmentation_stats(counts["q_"], "q_"))
    extra.update(segmentation_stats(counts[""]))
    return common.Evaluation(nll, "exact", extra)


@torch.no_grad()
def sample(model, n, temperature, device, generator, slots=data.SLOTS):
    """Ancestral sampling, piece by piece: the gate picks the lexicon (one entry that fits) or the piece GRU
    (characters until <pad> or the forced end); the context GRU then reads the piece. An empty piece, or
    99 characters, ends a caption. Returns captions (n, slots) and their cuts (n, slots)."""
    model.eval()
    def draw(logits):
        probs = torch.softmax(logits.float() / temperature, -1).cpu()
        return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(device)

    x = torch.full((n, slots + 1), data.PAD, dtype=torch.long, device=device)  # + a spare column for non-writes
    cuts = torch.zeros(n, slots + 1, dtype=torch.bool, device=device)
    pos, done, rows = torch.zeros(n, dtype=torch.long, device=device), torch.zeros(n, dtype=torch.bool, device=device), torch.arange(n, device=device)
    out, state = model.context(model.embed(torch.full((n, 1), data.BOS, device=device)))
    h = out[:, 0]
    while True:
        room = (slots - 1 - pos).clamp(max=model.K)
        done |= room == 0
        if done.all():
            break
        piece, length = torch.full((n, model.K), data.PAD, dtype=torch.long, device=device), torch.zeros_like(pos)
        chars = ~done
        if len(model.lexicon):
            g = torch.where(room >= model.lex_len.min(), (model.gate(h).squeeze(-1) / temperature).sigmoid(), 0.0)
            use = ~done & (torch.rand(n, generator=generator).to(device) < g)
            component = draw(F.log_softmax(model.lex_mix(h), -1))  # then an entry that fits from q_component
            entry = draw(model.lex_logits[component].masked_fill(model.lex_len > room[:, None], NEG))
            piece[use, :model.lexicon.shape[1]] = model.lexicon[entry[use]]
            length, chars = torch.where(use, model.lex_len[entry], 0), chars & ~use
        s, inputs, context = torch.tanh(model.piece_init(h)), model.piece_start.expand(n, -1), model.piece_context_gates(h)
        for t in range(model.K):  # the piece GRU, for the captions that took it; its end at `room` is forced
            chars &= t < room
            if not chars.any():
                break
            s = model.piece_step(model.piece_input(inputs) + context, s)
            symbol = draw(model.piece_out(s) + model.never)
            done |= chars & (symbol == data.PAD) & (t == 0)  # the empty piece ends the caption
            chars &= symbol != data.PAD
            piece[chars, t], length = symbol[chars], length + chars
            inputs = model.embed(symbol)
        for t in range(int(length.max())):  # write the piece and let the context GRU read it
            on = t < length
            x[rows, torch.where(on, pos + t, slots)] = piece[:, t]
            out, new = model.context(model.embed(piece[:, t:t + 1]), state)
            state, h = torch.where(on[None, :, None], new, state), torch.where(on[:, None], out[:, 0], h)
        cuts[rows, torch.where(length > 0, pos + length - 1, slots)] = True
        pos += length
    model.train()
    return x[:, :slots], cuts[:, :slots]


def with_cuts(vocab, ids, cuts):
    """A caption as text with '|' between its pieces."""
    n = int(data.num_chars(ids[None]))
    return "".join(vocab.decode(ids[t:t + 1]) + ("|" if cuts[t] and t < n - 1 else "") for t in range(n))


def eval_split(model, vocab, splits, split, cfg, device, run, step, epoch):
    t0 = time.time()
    ev = evaluate(model, splits[split], cfg, device, final=split == "test", gold=splits.get(split + "_spaces"))
    run.report_eval(split, ev, splits[split], step, epoch, time.time() - t0)
    return ev


@torch.no_grad()
def write_samples(model, vocab, splits, cfg, device, run, epoch):
    """Samples with their pieces, the first test captions cut by Viterbi, and segments.png: the posterior
    probability of a cut after each of their characters."""
    generator = torch.Generator().manual_seed(cfg.seed + epoch)  # own RNG: sampling never shifts training
    lines = [f"[SAMPLE] {with_cuts(vocab, *s)}" for s in zip(*sample(model, cfg.show_samples, cfg.temperature,
                                                                       device, generator))] if cfg.show_samples else []
    shown = splits["test"][:SHOWN].to(device)
    model.eval()
    _, (scores, ends, _, n) = model.log_prob(shown)
    best = chart(ends, n, viterbi=True)[1]
    lines += [f"[SEGMENT] {with_cuts(vocab, *s)}" for s in zip(shown, best)]
    if model.reinforce:  # and q's likelier decisions
        lines += [f"[SEGMENT q] {with_cuts(vocab, *s)}" for s in zip(shown, model.draw_cuts(shown, 1, greedy=True)[0][0])]
    model.train()
    run.write_samples(lines, epoch)
    plot_segments(vocab, shown, cut_probabilities(scores, n), best, run.dir)


def plot_segments(vocab, shown, cut_probs, best, folder):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(shown), 1, figsize=(14, 1.8 * len(shown)), squeeze=False)
    for ax, ids, p, cuts in zip(axes[:, 0], shown.cpu(), cut_probs.cpu(), best.cpu()):
        chars = [vocab.decode(ids[t:t + 1]) for t in range(int(data.num_chars(ids[None])))]
        ax.bar(range(len(chars)), p[:len(chars)], color=["tab:orange" if c == " " else "tab:blue" for c in chars])
        ax.plot([t for t in range(len(chars)) if cuts[t]], [1.02] * int(cuts.sum()), "kv", markersize=3)
        ax.set_xticks(range(len(chars)), [c.replace(" ", "_") for c in chars], fontsize=7)
        ax.set(ylim=(0, 1.08), xlim=(-1, data.SLOTS - 1), ylabel="p(cut)")
    axes[0, 0].set_title("posterior probability of a cut after each character (orange: a space; v: Viterbi cuts)")
    fig.tight_layout()
    fig.savefig(folder / "segments.png", dpi=100)
    plt.close(fig)


# ============================================================================= the loop
# From this line to the end of the file the text is the same in every script of the family (a test checks
# it): the model above provides build_model, Model.loss, eval_split, write_samples and CURVES_SIDE.
def run(argv=None):
    cfg, run = common.open_run(Config, SCRIPT, __doc__, argv)  # flags, the run folder (locked), its checkpoint
    device = common.pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    vocab, splits = data.load(cfg.data_dir or None, cfg.custom_data, getattr(cfg, "no_spaces", False))
    train = splits["train"][: cfg.limit_train or None]
    model = build_model(vocab, train, cfg).to(device)
    optimizer = common.make_optimizer(model, cfg)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    generator = torch.Generator().manual_seed(cfg.seed)  # data order
    step, best_val = run.restore(model, optimizer, generator, vocab)
    forward = torch.compile(model.loss) if cfg.compile else model.loss
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")

    if cfg.sample_only:
        return write_samples(model, vocab, splits, cfg, device, run, step // steps_per_epoch)
    if cfg.eval_only:
        for split in ("val", "test"):
            eval_split(model, vocab, splits, split, cfg, device, run, step, step / steps_per_epoch)
        return
    run.start(model, train, device, steps_per_epoch, total_steps, step)
    while step < total_steps and not (cfg.max_steps and step >= cfg.max_steps):
        epoch = step // steps_per_epoch
        epoch_rng = generator.get_state()  # saved so a resumed run replays this epoch's order
        for x in data.batches(train, cfg.batch_size, generator, skip=step - epoch * steps_per_epoch):
            lr = common.set_lr(optimizer, cfg, step, total_steps)
            with autocast:
                loss = forward(x.to(device)).mean()
            if not torch.isfinite(loss):
                raise run.nan_stop(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1
            run.log_step(step, steps_per_epoch, len(x), loss.item(), lr)
            if run.interrupted and step % steps_per_epoch:  # Ctrl-C mid-epoch: keep this step, then stop
                run.save(model, optimizer, vocab, step, epoch_rng, best_val, is_best=False)
                raise run.interrupt_stop(step)
            if step == total_steps or (cfg.max_steps and step >= cfg.max_steps):
                break
        epoch_done = step % steps_per_epoch == 0
        val = eval_split(model, vocab, splits, "val", cfg, device, run, step, step / steps_per_epoch)
        is_best = val.nll.mean().item() <= best_val
        best_val = min(best_val, val.nll.mean().item())
        run.save(model, optimizer, vocab, step, generator.get_state() if epoch_done else epoch_rng, best_val, is_best)
        write_samples(model, vocab, splits, cfg, device, run, step // steps_per_epoch)
        run.plot_curves(CURVES_SIDE)
        if run.interrupted:  # Ctrl-C at the end of an epoch: it is evaluated and saved
            raise run.interrupt_stop(step)

    best_step = run.load_best(model)
    eval_split(model, vocab, splits, "test", cfg, device, run, best_step, best_step / steps_per_epoch)


def main(argv=None):
    common.main(SCRIPT, run, argv)


if __name__ == "__main__":
    main()

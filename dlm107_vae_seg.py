"""DLM107: a segmentation VAE. The latent variable z cuts a caption into pieces; does it learn words?

A caption x = c_1 .. c_n (n <= 99 characters, see data.py) and its cuts z_t = "a piece ends after c_t".
A piece is its characters followed by STOP, written into W = max_piece + 1 slots (STOP is PAD: a piece
ends the way a caption does). A piece is cut by force when it reaches max_piece characters, and the
caption's last character always ends a piece, in q and in p alike.

Generative model p(x, z) = p(pieces) = prod_s p(piece_s | pieces_<s), ending with the empty piece:
    u_s = std_norm(Linear(ReLU(Linear(concat_w e[piece_s,w]))))     (piece encoder, an MLP over the W slots)
    h_s = std_norm(GRU(h_{s-1}, u_{s-1})),  u_{-1} = a learned start vector      (prior over pieces)
    p(slot w of piece s = c) = softmax_c( exp(tau) <d_{s,w}, e_c> + b_c ),  d_s = Linear(ReLU(Linear(h_s)))
The slots are independent given h_s; BOS is never a choice. A piece starting after o characters has room
r = min(max_piece, 99 - o): slots w <= its length are scored, except slot r, which is STOP by force (no
cost). The empty piece (STOP in slot 0) ends the caption, so the forced STOPs make p a distribution over
exactly the captions of <= 99 characters: sum_x p(x) = sum_x sum_z p(pieces(x, z)) = 1, because (x, z)
-> pieces is one-to-one and every piece sequence p can draw is the pieces of one (x, z).

Segmenter q(z|x) = prod over characters t < n whose cut is not forced of Bernoulli(z_t; sigmoid(l_t)),
l = Linear(GRU(x)) (causal, as the original, or bidirectional). Every drawn decision is in log q; the
forced ones have probability 1. --segmenter spaces cuts after every space instead (DLM106): log q = 0
and -log p(pieces) is an exact likelihood with a hand-made segmentation.

    log p(x) >= ELBO = E_q[log p(x, z) - log q(z|x)],   IW-K = E log (1/K) sum_k p(x, z_k) / q(z_k|x)
Gradients: pathwise for p; for q, REINFORCE with a leave-one-out baseline over the K samples (or a
running mean). NLPPS = -ELBO (train, val) and -IW (test), nats per caption; an upper bound on -log p(x).
README row:  python dlm107_vae_seg.py                 (and --segmenter spaces --run-name spaces)
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data
from common import UserError, arg

SCRIPT = "dlm107_vae_seg"
SHOWN = 4  # test captions printed with their cuts and drawn in segments.png


@dataclass
class Config:
    # model
    embed: int = arg(128, "embedding and GRU width E", low=1)
    segmenter: str = arg("learned", "learned q(z|x), or cut after every space (exact likelihood)", choices=("learned", "spaces"))
    parser: str = arg("causal", "the segmenter's GRU: causal (sees c_<=t) or bidirectional", choices=("causal", "bi"))
    max_piece: int = arg(21, "a piece reaching this many characters is cut by force (longest word + space: 21)", low=1)
    samples: int = arg(4, "segmentations K drawn per caption for the ELBO and its gradient", low=1)
    baseline: str = arg("loo", "REINFORCE baseline: leave-one-out over K, or a running mean per symbol", choices=("loo", "running"))
    iw_samples: int = arg(100, "samples per caption of the importance-weighted test bound", low=1)
    cut_init: float = arg(0.0, "initial logit of a cut (the bias of the segmenter's output)")
    cut_cost: float = arg(0.0, "nats per drawn cut taken off q's REINFORCE reward (any q keeps the bound valid)", low=0)
    # optimisation
    epochs: int = arg(20, "training epochs", low=1)
    batch_size: int = arg(100, "captions per step", low=1)
    lr: float = arg(2e-3, "peak learning rate", low=0, low_open=True)
    lr_schedule: str = arg("cosine", "cosine decays the lr to 10%% of its peak over training", choices=("cosine", "constant"))
    optimizer: str = arg("adamw", "adamw, or rmsprop with eps 0.01 as the original research code", choices=("adamw", "rmsprop"))
    weight_decay: float = arg(0.0, "AdamW weight decay", low=0)
    grad_clip: float = arg(1.0, "clip the gradient norm to this (0: off)", low=0)
    seed: int = arg(0, "seed of the initialisation and of the data order")
    # run control
    device: str = arg("auto", "where to run", choices=("auto", "cuda", "mps", "cpu"))
    dtype: str = arg("float32", "compute dtype (bfloat16 autocasts on CUDA)", choices=("float32", "bfloat16"))
    compile: bool = arg(False, "torch.compile the model")
    data_dir: str = arg("", "folder with the Multi30k .gz files (else $DLM_DATA_DIR, else download)")
    out_dir: str = arg("out", "runs are written to OUT_DIR/dlm107_vae_seg/RUN_NAME")
    run_name: str = arg("default", "name of the run folder")
    resume: bool = arg(False, "continue from the run folder's ckpt_last.pt")
    eval_only: bool = arg(False, "evaluate the run folder's ckpt_best.pt on val and test, then stop")
    sample_only: bool = arg(False, "print samples from the run folder's ckpt_best.pt, then stop")
    num_samples: int = arg(8, "samples printed and saved at each evaluation", low=0)
    temperature: float = arg(1.0, "sampling temperature", low=0, low_open=True)
    log_every: int = arg(50, "steps between train log lines", low=1)
    max_steps: int = arg(0, "stop after this many steps in total (0: no limit)", low=0)
    limit_train: int = arg(0, "train on the first N captions only (0: all), for quick tests", low=0)
    eval_batch_size: int = arg(500, "captions per evaluation batch", low=1)


# Flags that steer this run only; --resume takes every other setting from the checkpoint.
RUN_FLAGS = {"epochs", "device", "dtype", "compile", "data_dir", "out_dir", "run_name", "resume", "eval_only",
             "sample_only", "num_samples", "temperature", "log_every", "max_steps", "eval_batch_size", "iw_samples"}


# ----------------------------------------------------------------------------- segmentations
def std_norm(x, eps=1e-5):
    return x / (x.std(dim=-1, keepdim=True) + eps)


def force_cuts(drawn, n, max_piece):
    """drawn (..., T) free draws of "cut after character t", n (...,) caption lengths -> (cuts, free): the
    segmentation, with the forced cuts added (after each caption's last character, and where a piece reaches
    max_piece characters), and the mask of the decisions that were really drawn (the ones log q counts).
    Within a run of characters without a drawn cut the forced cuts fall every max_piece characters."""
    t = torch.arange(drawn.shape[-1], device=drawn.device)
    last_drawn = torch.where(drawn, t, -1).cummax(-1).values
    since = t - F.pad(last_drawn, (1, -1), value=-1)  # characters since the last drawn cut, t included
    is_char, is_last = t < n.unsqueeze(-1), t == n.unsqueeze(-1) - 1
    forced = (since % max_piece == 0) | is_last
    return (drawn | forced) & is_char, ~forced & is_char


def make_pieces(x, cuts, width):
    """x (N, T) ids, cuts (N, T) from force_cuts -> pieces (N, S, width): each piece's characters then PAD,
    S = the most pieces + 1, so every caption's pieces are followed by the all-PAD end piece."""
    N, T = x.shape
    t = torch.arange(T, device=x.device)
    piece = cuts.long().cumsum(1) - cuts.long()  # which piece each character is in
    start = torch.where(F.pad(cuts, (1, -1), value=True), t, 0).cummax(1).values  # where that piece starts
    S = int(cuts.sum(1).max()) + 1
    flat = torch.full((N, S * width + 1), data.PAD, dtype=x.dtype, device=x.device)
    # scatter every character to (piece, slot); PAD positions go to a spare last column, never onto a piece
    flat.scatter_(1, torch.where(x != data.PAD, piece * width + t - start, S * width), x)
    return flat[:, :-1].view(N, S, width)


# ----------------------------------------------------------------------------- model
class Model(nn.Module):
    def __init__(self, vocab_size: int, space: int, cfg: Config):
        super().__init__()
        E, W = cfg.embed, cfg.max_piece + 1
        self.V, self.W, self.max_piece, self.space = vocab_size, W, cfg.max_piece, space
        self.spaces, self.samples, self.cut_cost = cfg.segmenter == "spaces", cfg.samples, cfg.cut_cost
        self.loo = cfg.baseline == "loo"
        self.embed = nn.Embedding(vocab_size, E)  # generator's; also its output matrix (tied)
        self.enc_in, self.enc_out = nn.Linear(W * E, E), nn.Linear(E, E)
        self.start = nn.Parameter(torch.zeros(E))
        self.prior = nn.GRU(E, E, batch_first=True)
        self.dec_in, self.dec_out = nn.Linear(E, E), nn.Linear(E, W * E)
        self.log_temp = nn.Parameter(torch.tensor(-0.5 * math.log(E)))  # soft first predictions, as DLM100
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        self.register_buffer("never", torch.zeros(vocab_size).index_fill(0, torch.tensor(data.BOS), -math.inf),
                             persistent=False)
        self.register_buffer("running", torch.tensor(0.0))  # running mean of the ELBO per symbol
        if not self.spaces:  # q has its own embedding: REINFORCE noise never reaches p's output matrix
            self.seg_embed = nn.Embedding(vocab_size, E)
            self.seg_rnn = nn.GRU(E, E, batch_first=True, bidirectional=cfg.parser == "bi")
            self.cut = nn.Linear(E * (2 if cfg.parser == "bi" else 1), 1)
            nn.init.constant_(self.cut.bias, cfg.cut_init)

    def encode(self, pieces):
        """pieces (M, W) -> (M, E). Linear(concat_w e[piece_w]) = sum_w table[w, piece_w]: a (W, V, E) lookup
        summed by embedding_bag, never an (M, W*E) matrix."""
        E = self.embed.weight.shape[1]
        table = torch.einsum("fwe,ve->wvf", self.enc_in.weight.view(E, self.W, E), self.embed.weight)
        index = pieces + torch.arange(self.W, device=pieces.device) * self.V
        hidden = F.embedding_bag(index, table.reshape(-1, E), mode="sum") + self.enc_in.bias
        return std_norm(self.enc_out(F.relu(hidden)))

    def slot_logits(self, h):
        """h (M, E) prior states -> a (M, E) and tables (W, E, V), (W, V) with logits of slot w = a @ table[w] +
        bias[w]: exp(tau) <d_w, e_c> + b_c without ever building the (M, W, E) slot vectors d."""
        E, scale = self.embed.weight.shape[1], torch.exp(self.log_temp)
        table = torch.einsum("wfe,vf->wev", self.dec_out.weight.view(self.W, E, E), self.embed.weight * scale)
        bias = self.dec_out.bias.view(self.W, E) @ self.embed.weight.t() * scale + self.bias + self.never  # BOS: -inf
        return F.relu(self.dec_in(h)), table, bias

    def log_joint(self, x, cuts):
        """x (N, slots) ids, cuts (N, slots) -> (N,) log p(pieces(x, cuts)); p draws captions of < slots characters.
        The prior runs over S = the most pieces + 1 steps; only pieces up to each end piece are decoded."""
        pieces = make_pieces(x, cuts, self.W)                                 # (N, S, W)
        N, S, _ = pieces.shape
        length = (pieces != data.PAD).sum(-1)                                 # (N, S) characters
        room = (x.shape[1] - 1 - (length.cumsum(1) - length)).clamp(max=self.max_piece)  # characters it may hold
        s = torch.arange(S, device=x.device)
        is_piece, scored_piece = s < cuts.sum(1, keepdim=True), s <= cuts.sum(1, keepdim=True)
        u = self.start.new_zeros(N, S, self.start.shape[0])
        if is_piece.any():  # (not for a batch of empty captions)
            u[is_piece] = self.encode(pieces[is_piece]).to(u.dtype)  # (autocast may give bfloat16)
        inputs = torch.cat([self.start.expand(N, 1, -1), u[:, :-1]], dim=1)  # piece s is predicted from < s
        a, table, bias = self.slot_logits(std_norm(self.prior(inputs)[0][scored_piece]))  # a: (M, E)
        target, length, room = pieces[scored_piece], length[scored_piece], room[scored_piece]
        w = torch.arange(self.W, device=x.device)
        scored = (w <= length.unsqueeze(1)) & (w < room.unsqueeze(1))  # slot `room` is STOP by force
        per_piece = a.new_zeros(len(a), dtype=self.bias.dtype)  # the parameters' (autocast: not bfloat16)
        for slot in range(int(scored.any(0).sum())):  # slot by slot, decoding only the pieces that reach it
            rows = scored[:, slot].nonzero().squeeze(1)
            log_p = F.log_softmax(torch.addmm(bias[slot], a[rows], table[slot]), dim=-1, dtype=per_piece.dtype)
            per_piece = per_piece.index_add(0, rows, log_p.gather(1, target[rows, slot, None]).squeeze(1))
        return per_piece.new_zeros(N, S).masked_scatter(scored_piece, per_piece).sum(1)

    def cut_logits(self, x):
        """x (B, slots) -> (B, slots) logit of a cut after each character. Always over all the slots, so the
        bidirectional GRU reads the same PADs before a caption's end whatever batch it is in."""
        return self.cut(self.seg_rnn(self.seg_embed(x))[0]).squeeze(-1)

    def draw_cuts(self, x, k, generator=None, drawn=None, greedy=False):
        """x (B, T) -> cuts (k, B, T) from q (or `drawn` (k, B, T); or the most likely decision at every
        character if greedy), the mask of drawn decisions, log q(cuts|x) (k, B) and the logits (k, B, T)."""
        n = data.num_chars(x)
        if self.spaces:
            cuts, free = force_cuts((x == self.space).expand(k, -1, -1), n, self.max_piece)
            return cuts, free, x.new_zeros(cuts.shape[:2], dtype=torch.float), None
        logits = self.cut_logits(x).expand(k, -1, -1)
        if greedy:
            drawn = logits > 0
        elif drawn is None:  # noise from the CPU RNG: the checkpoint's torch_rng replays it on any device
            drawn = torch.rand(logits.shape, generator=generator).to(x.device) < logits.sigmoid()
        cuts, free = force_cuts(drawn, n, self.max_piece)
        log_q = -F.binary_cross_entropy_with_logits(logits, cuts.to(logits.dtype), reduction="none")
        return cuts, free, torch.where(free, log_q, 0.0).sum(-1), logits

    def elbo_terms(self, x, k, generator=None, drawn=None):
        """x (B, slots) -> log p(x, z_k) and log q(z_k|x), both (k, B), for k segmentations z_k ~ q(z|x),
        with the cuts (k, B, slots) and the cut logits."""
        cuts, free, log_q, logits = self.draw_cuts(x, k, generator, drawn)
        # score each distinct (caption, segmentation) once: a confident q draws the same one K times
        keys = torch.cat([torch.arange(len(x), device=x.device).repeat(k).unsqueeze(1), cuts.flatten(0, 1).long()], 1)
        keys, index = torch.unique(keys, dim=0, return_inverse=True)
        log_p = self.log_joint(x[keys[:, 0]], keys[:, 1:].bool())[index].view(k, -1)
        return log_p, log_q, cuts, free, logits

    def loss(self, x, drawn=None):
        """x (B, slots) -> (B,) -ELBO from K segmentations per caption, and the step's statistics. The gradient:
        pathwise for p; for q, REINFORCE mean_k (f_k - b_k) grad log q(z_k|x), f = log p(x, z) - log q(z|x)
        (the term -grad log q(z_k|x) has expectation zero and only adds variance: left out)."""
        k = 1 if self.spaces else self.samples
        log_p, log_q, cuts, free, logits = self.elbo_terms(x, k, drawn=drawn)
        counts = segment_counts(x, cuts, cuts[0], self.space)
        stats = dict(cut_rate=counts[0] / counts[1].clamp(min=1))
        if self.spaces:
            return -log_p[0], stats
        f, symbols = (log_p - log_q).detach(), data.num_chars(x) + 1
        f = f - self.cut_cost * (cuts & free).sum(-1)  # shapes q only: the value returned stays -ELBO
        if self.loo:
            surrogate = common.reinforce_surrogate(log_q, f)
        else:  # a running mean of the ELBO per symbol, times the caption's symbols
            surrogate = ((f - self.running * symbols) * log_q).mean(0)
            if self.training:
                self.running.lerp_((f / symbols).mean(), 0.01)
        if k > 1 and torch.is_grad_enabled():  # per-sample gradients w.r.t. the cut logits, read off by autograd
            per_sample = torch.autograd.grad(surrogate.sum(), logits, retain_graph=True)[0] * k  # (k, B, T)
            stats["grad_var"] = (per_sample.var(0) / k).sum(-1).mean()  # variance of the K-sample estimate
        return -(log_p - log_q.detach()).mean(0) - (surrogate - surrogate.detach()), stats


def segment_counts(x, cuts, best, space):
    """x (B, slots), drawn cuts (k, B, slots), most likely cuts (B, slots) -> sums of: drawn cuts and decisions,
    pieces and characters (per sample); boundaries of `best` that are gold, all of them, and gold ones. Gold =
    a cut after a space (as --segmenter spaces). A cut after a caption's last character is not a decision."""
    n = data.num_chars(x)
    inner = torch.arange(x.shape[1], device=x.device) < n.unsqueeze(1) - 1
    gold = (x == space) & inner
    return torch.stack([(cuts & inner).sum() / len(cuts), inner.sum(), cuts.sum() / len(cuts), n.sum(),
                        (best & gold).sum(), (best & inner).sum(), gold.sum()]).double().cpu()


def segment_stats(counts):
    cuts, decisions, pieces, chars, hits, predicted, gold = counts.tolist()
    precision, recall = hits / max(predicted, 1), hits / max(gold, 1)
    return dict(cut_rate=cuts / max(decisions, 1), piece_len=chars / max(pieces, 1), precision=precision,
                recall=recall, f1=2 * hits / max(predicted + gold, 1))


# ----------------------------------------------------------------------------- evaluate, sample
@torch.no_grad()
def evaluate(model, x, cfg, device, samples):
    """(N,) -ELBO and (N,) -IW bound from `samples` segmentations per caption (file order), and the
    segmentation statistics. Its own RNG with a fixed seed: evaluating never shifts the training RNG."""
    model.eval()
    generator = torch.Generator().manual_seed(cfg.seed)
    elbo, iw, counts = [], [], 0
    for batch in data.batches(x, cfg.eval_batch_size):
        batch, f = batch.to(device), []
        for i in range(0, samples, cfg.samples):  # K samples at a time: memory as in training
            log_p, log_q, cuts, _, _ = model.elbo_terms(batch, min(cfg.samples, samples - i), generator)
            f.append((log_p - log_q).float().cpu())
        f = torch.cat(f)
        elbo.append(-f.mean(0))
        iw.append(-common.logmeanexp(f, dim=0))
        best = model.draw_cuts(batch, 1, greedy=True)[0][0]  # (B, slots) the most likely cuts
        counts = counts + segment_counts(batch, cuts, best, model.space)
    model.train()
    return torch.cat(elbo), torch.cat(iw), segment_stats(counts)


@torch.no_grad()
def sample(model, n, temperature, device, generator, slots=data.SLOTS):
    """Ancestral sampling, one piece at a time. A piece's W slots are drawn at once (independent given the
    prior state); the piece is its characters before the first STOP, or before its room runs out. An empty
    piece ends the caption. Returns captions (n, slots) and their cuts (n, slots)."""
    model.eval()
    x = torch.full((n, slots + 1), data.PAD, dtype=torch.long, device=device)  # + a spare column for non-writes
    cuts = torch.zeros(n, slots + 1, dtype=torch.bool, device=device)
    offset, done = torch.zeros(n, dtype=torch.long, device=device), torch.zeros(n, dtype=torch.bool, device=device)
    inputs, h, w = model.start.expand(n, 1, -1), None, torch.arange(model.W, device=device)
    for _ in range(slots):  # at most slots - 1 pieces, then the end piece
        out, h = model.prior(inputs, h)
        a, table, bias = model.slot_logits(std_norm(out[:, 0]))
        probs = torch.softmax((torch.einsum("ne,wev->nwv", a, table) + bias) / temperature, dim=-1)  # (n, W, V)
        piece = torch.multinomial(probs.view(-1, model.V).cpu(), 1, generator=generator).view(n, -1).to(device)
        room = (slots - 1 - offset).clamp(max=model.max_piece)
        length = torch.where(done, 0, ((piece == data.PAD) | (w >= room.unsqueeze(1))).int().argmax(1))
        piece = torch.where(w < length.unsqueeze(1), piece, data.PAD)
        x.scatter_(1, torch.where(w < length.unsqueeze(1), offset.unsqueeze(1) + w, slots), piece)
        cuts[torch.arange(n, device=device), torch.where(length > 0, offset + length - 1, slots)] = True
        offset, done = offset + length, done | (length == 0)
        if done.all():
            break
        inputs = model.encode(piece).unsqueeze(1)
    model.train()
    return x[:, :slots], cuts[:, :slots]


# ----------------------------------------------------------------------------- main
def report(run_dir, text):
    print(text, flush=True)
    with open(run_dir / "log.txt", "a") as f:
        f.write(text + "\n")


def with_cuts(vocab, ids, cuts):
    """A caption as text with '|' between its pieces."""
    n = int(data.num_chars(ids[None]))
    return "".join(vocab.decode(ids[t:t + 1]) + ("|" if cuts[t] and t < n - 1 else "") for t in range(n))


@torch.no_grad()
def write_samples(model, cfg, vocab, device, run_dir, epoch, shown):
    if cfg.num_samples == 0:
        return
    generator = torch.Generator().manual_seed(cfg.seed + epoch)  # own RNG: sampling never shifts training
    texts = [with_cuts(vocab, *s) for s in zip(*sample(model, cfg.num_samples, cfg.temperature, device, generator))]
    shown = shown.to(device)
    segmented = [with_cuts(vocab, *s) for s in zip(shown, model.draw_cuts(shown, 1, generator)[0][0])]
    with open(run_dir / "samples.txt", "a") as f:
        f.write(f"# epoch {epoch}, temperature {cfg.temperature}\n" + "".join(t + "\n" for t in texts)
                + "# test captions cut by q\n" + "".join(t + "\n" for t in segmented))
    for t in texts:
        report(run_dir, f"[SAMPLE] {t}")
    for t in segmented:
        report(run_dir, f"[SEGMENT] {t}")
    plot_segments(model, vocab, shown, run_dir)


def plot_segments(model, vocab, shown, run_dir):
    """segments.png: q's probability of a cut after each character of a few test captions."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs = (shown == model.space).float() if model.spaces else model.cut_logits(shown).sigmoid()
    fig, axes = plt.subplots(len(shown), 1, figsize=(14, 1.8 * len(shown)), squeeze=False)
    for ax, ids, p in zip(axes[:, 0], shown, probs.cpu()):
        chars = [vocab.decode(ids[t:t + 1]) for t in range(int(data.num_chars(ids[None])))]
        ax.bar(range(len(chars)), p[:len(chars)], color=["tab:orange" if c == " " else "tab:blue" for c in chars])
        ax.set_xticks(range(len(chars)), [c.replace(" ", "_") for c in chars], fontsize=7)
        ax.set(ylim=(0, 1), xlim=(-1, data.SLOTS - 1), ylabel="p(cut)")
    axes[0, 0].set_title("q: probability of a cut after each character (orange: a space)")
    fig.tight_layout()
    fig.savefig(run_dir / "segments.png", dpi=100)
    plt.close(fig)


def eval_split(model, splits, split, cfg, device, run_dir, step, epoch):
    samples = 1 if cfg.segmenter == "spaces" else cfg.iw_samples if split == "test" else cfg.samples
    elbo, iw, seg = evaluate(model, splits[split], cfg, device, samples)
    bounds = ([("exact", elbo)] if cfg.segmenter == "spaces" else
              [("elbo", elbo)] + ([(f"iw-{samples}", iw)] if split == "test" else []))
    for bound, nll in bounds:  # the tightest last
        nlpps = nll.mean().item()
        bpc = common.bits_per_char(nlpps, data.num_chars(splits[split]).float().mean().item())
        report(run_dir, f"eval {split} | epoch {epoch:.2f} | step {step} | nlpps {nlpps:.2f} | bpc {bpc:.4f} ({bound})"
                        f" | cut rate {seg['cut_rate']:.3f} | piece len {seg['piece_len']:.2f} | boundary P/R/F1 "
                        f"{seg['precision']:.3f}/{seg['recall']:.3f}/{seg['f1']:.3f}")
        common.log_metrics(run_dir, dict(kind=split, step=step, epoch=epoch, nlpps=nlpps, bpc=bpc, bound=bound, **seg))
    if split == "test":  # per caption, file order: compare.py lines models up caption by caption
        (run_dir / "test_nlpps.txt").write_text("".join(f"{v:.4f}\n" for v in nll.tolist()))
    return nll


def make_checkpoint(model, optimizer, cfg, vocab, step, epoch_rng, best_val):
    return dict(script=SCRIPT, model=model.state_dict(), optimizer=optimizer.state_dict(), step=step,
                args=dataclasses.asdict(cfg), vocab=vocab.itos, epoch_rng=epoch_rng,
                torch_rng=torch.get_rng_state(), best_val=best_val)


def run(argv=None):
    cfg, given = common.parse_config(Config, __doc__, argv)
    run_dir = Path(cfg.out_dir) / SCRIPT / cfg.run_name
    ckpt = None
    if cfg.resume or cfg.eval_only or cfg.sample_only:
        ckpt = common.load_checkpoint(run_dir / ("ckpt_last.pt" if cfg.resume else "ckpt_best.pt"), SCRIPT)
        kept = {k: v for k, v in ckpt["args"].items() if k not in RUN_FLAGS and k not in given}
        cfg = dataclasses.replace(cfg, **kept)
    if cfg.segmenter == "learned" and cfg.baseline == "loo" and cfg.samples < 2:
        raise UserError("the leave-one-out baseline needs --samples 2 or more (or --baseline running)")
    run_dir.mkdir(parents=True, exist_ok=True)
    device = common.pick_device(cfg.device)
    torch.manual_seed(cfg.seed)

    vocab, splits = data.load(cfg.data_dir or None)
    if ckpt is not None and ckpt["vocab"] != vocab.itos:
        raise UserError("the checkpoint's vocabulary differs from this data's: wrong --data-dir?")
    train = splits["train"][: cfg.limit_train or None]
    model = Model(len(vocab), vocab.stoi.get(" ", -1), cfg).to(device)
    optimizer = (torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
                 if cfg.optimizer == "adamw" else torch.optim.RMSprop(model.parameters(), lr=cfg.lr, eps=0.01))
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    generator = torch.Generator().manual_seed(cfg.seed)  # data order
    step, best_val = 0, math.inf
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, best_val = ckpt["step"], ckpt["best_val"]
        generator.set_state(ckpt["epoch_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
    forward = torch.compile(model.loss) if cfg.compile else model.loss
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    n_params = sum(p.numel() for p in model.parameters())
    shown = splits["test"][:SHOWN]

    if cfg.sample_only:
        write_samples(model, cfg, vocab, device, run_dir, step // steps_per_epoch, shown)
        return
    if cfg.eval_only:
        for split in ("val", "test"):
            eval_split(model, splits, split, cfg, device, run_dir, step, step / steps_per_epoch)
        return
    (run_dir / "args.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    report(run_dir, f"{SCRIPT} | {n_params:,} parameters | {len(train):,} training captions | {device} | "
                    f"{steps_per_epoch} steps/epoch | run folder {run_dir}")

    def lr_at(step):
        if cfg.lr_schedule == "constant":
            return cfg.lr
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step / total_steps, 1.0))))

    ckpt_last, ckpt_best = run_dir / "ckpt_last.pt", run_dir / "ckpt_best.pt"
    while step < total_steps and not (cfg.max_steps and step >= cfg.max_steps):
        epoch = step // steps_per_epoch
        epoch_rng = generator.get_state()  # saved so a resumed run replays this epoch's order
        t0, seen, loss_sum, loss_n, stat_sum = time.time(), 0, 0.0, 0, {}
        for x in data.batches(train, cfg.batch_size, generator, skip=step - epoch * steps_per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            with autocast:
                loss, stats = forward(x.to(device))
                loss = loss.mean()
            if not torch.isfinite(loss):
                raise UserError(f"non-finite loss at step {step}: stopped; the last good checkpoint "
                                f"{ckpt_last if ckpt_last.exists() else '(none yet)'} is kept")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1
            seen, loss_sum, loss_n = seen + len(x), loss_sum + loss.item(), loss_n + 1
            stat_sum = {k: stat_sum.get(k, 0.0) + v.item() for k, v in stats.items()}
            if step % cfg.log_every == 0:
                rate, stat = seen / (time.time() - t0), {k: v / loss_n for k, v in stat_sum.items()}
                report(run_dir, f"step {step} | epoch {step / steps_per_epoch:.2f} | train nlpps "
                                f"{loss_sum / loss_n:.2f} | {rate:.0f} seq/s | lr {lr_at(step):.2e} | "
                                + " | ".join(f"{k.replace('_', ' ')} {v:.3g}" for k, v in stat.items()))
                common.log_metrics(run_dir, dict(kind="train", step=step, epoch=step / steps_per_epoch,
                                                 nlpps=loss_sum / loss_n, seq_per_s=rate, **stat))
                t0, seen, loss_sum, loss_n, stat_sum = time.time(), 0, 0.0, 0, {}
            if step == total_steps or (cfg.max_steps and step >= cfg.max_steps):
                break
        epoch_done = step % steps_per_epoch == 0
        val = eval_split(model, splits, "val", cfg, device, run_dir, step, step / steps_per_epoch).mean().item()
        best_val = min(best_val, val)
        state = make_checkpoint(model, optimizer, cfg, vocab, step,
                                generator.get_state() if epoch_done else epoch_rng, best_val)
        common.save_checkpoint(state, ckpt_last)
        if val <= best_val:
            common.save_checkpoint(state, ckpt_best)
        write_samples(model, cfg, vocab, device, run_dir, step // steps_per_epoch, shown)
        common.plot_curves(run_dir, f"{SCRIPT} ({cfg.run_name})", side=(
            "segmentation (F1: most likely cuts vs. spaces)", [("train", "cut_rate"), ("val", "cut_rate"), ("val", "f1")]))

    best = common.load_checkpoint(ckpt_best, SCRIPT)
    model.load_state_dict(best["model"])
    eval_split(model, splits, "test", cfg, device, run_dir, best["step"], best["step"] / steps_per_epoch)


def main(argv=None):
    try:
        run(argv)
    except UserError as e:
        sys.exit(f"{SCRIPT}: error: {e}")


if __name__ == "__main__":
    main()

"""DLM142: a reverse-diffusion language model over characters, scored by its evidence lower bound.

Forward process: every slot of x_0 (a 100-slot caption, see data.py) is corrupted independently,
    q(x_t | x_{t-1}) = (1 - b_t) [x_t = x_{t-1}] + b_t n(x_t),     t = 1..T,
    q(x_t | x_0)     = a_t [x_t = x_0] + (1 - a_t) n(x_t),         a_t = prod_{s<=t} (1 - b_s) = 1 - t/T,
with the noise distribution n all its mass on an extra MASK token (--noise absorb) or uniform over the
vocabulary (--noise uniform, as the original). a_T = 0, so x_T is exactly noise and p(x_T) = n.
A network maps x_t (+ an embedding of t with --time-cond) to per-slot logits over the tied embedding:
  --backbone cnn: the notes' residual tanh CNN, h <- tanh(h + Conv1d_d(h)), dilation d from the
    --dilation cycle;
  --backbone transformer: pre-norm blocks h <- h + Attn(LN(h)), h <- h + MLP(LN(h)), with rotary position
    embeddings (RoPE) on queries and keys, so attention scores depend on slot offsets only;
  --backbone hybrid: per block the CNN's step h <- tanh(h + Conv1d_d(h)) for the neighbours, then the
    transformer's attention (and MLP) steps for the far revealed characters.
Reverse kernel:
  --param x0 (absorb only; MDLM's "SUBS"): logits -> p_th(x_0,i | x_t) over characters (never MASK or <bos>),
    p(x_{t-1,i} | x_t) = [x_{t-1,i} = x_{t,i}]                            if slot i is not MASK,
                       = (1 - a_{t-1})/(1 - a_t) [MASK]
                         + (a_{t-1} - a_t)/(1 - a_t) p_th(x_{t-1,i} | x_t)         if it is,
    i.e. q(x_{t-1} | x_t, x_0) with p_th in place of x_0, so the step-t term below is exactly
    sum_{i masked} (a_{t-1} - a_t)/(1 - a_t) * (-log p_th(x_0,i | x_t))   (= -log p(x_0 | x_1) at t = 1).
  --param gate (the notes'): p(x_{t-1,i} = j | x_t) = g_i softmax_j(logits) + (1 - g_i) [j = x_{t,i}].
Bound (in nats, per caption; the posteriors q(x_{t-1} | x_t, x_0) are computed in closed form):
    -log p(x_0) <= KL(q(x_T|x_0) || p(x_T)) + sum_{t>=2} E_q KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))
                   - E_q log p(x_0 | x_1).
Training samples one t per caption (stratified over the batch, scaled by T: unbiased). The reported
test number sums all T steps, one x_t draw per step and caption from common.eval_generator(), on the
full split; each step's term is split into "stay/reveal", "token at masked slots" and "copy at unmasked
slots" (metrics.jsonl, noise_levels.png).
The defaults (x0, CNN E = 96, D = 6, lr 1e-3) were chosen by measurement: RESULTS.md.
Results rows:  python dlm142_diffusion.py                                  (the defaults; --epochs 40)
              python dlm142_diffusion.py --backbone hybrid --embed 80 --depth 3  (the best bound; --epochs 40)
              python dlm142_diffusion.py --embed 50 --depth 11 --lr 1e-4  (the notes' network and lr)
"""
from __future__ import annotations

import signal

signal.signal(signal.SIGINT, signal.SIG_DFL)  # a Ctrl-C while the modules load ends the process quietly
import contextlib
import dataclasses
import fcntl
import hashlib
import io
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

SCRIPT = "dlm142_diffusion"


class RunError(Exception):
    """Bad input, or a stop the user must hear about: main() prints it in one line, never a traceback."""


@dataclasses.dataclass
class Config:
    param: str = flag("x0", "reverse kernel: x0 predicts the character under each MASK (absorb only); "
                     "gate mixes a replace softmax with copying the input (the notes')",
                     choices=("x0", "gate"), part="the model")
    backbone: str = flag("cnn", "network over x_t: the notes' residual tanh CNN; a pre-norm transformer "
                        "with rotary positions; or hybrid blocks of a tanh conv then rotary attention "
                        "(the better bound for runs of half an hour or more; --embed 96 --depth 3 the best "
                        "at 20 epochs: RESULTS.md)",
                        choices=("cnn", "transformer", "hybrid"))
    embed: int = flag(96, "embedding and channel width E (the notes' network: 50)", low=1)
    depth: int = flag(6, "blocks D: residual convs, transformer layers or hybrid blocks "
                      "(the notes' network: 11)", low=1, high=100)
    kernel: int = flag(5, "conv kernel width, cnn and hybrid (odd, so a slot's output sits on the slot)",
                       low=1)
    dilation: str = flag("1", "conv dilations, a comma-separated cycle repeated over the depth "
                         "(e.g. 1,2,4,8)")
    heads: int = flag(4, "attention heads, transformer and hybrid (must divide E; E / heads even for rotary)",
                      low=1)
    mlp_ratio: int = flag(4, "hidden width of each attention block's MLP, in multiples of E (0: no MLP)",
                          low=0)
    diffusion_steps: int = flag(100, "diffusion steps T", low=1)
    noise: str = flag("absorb", "corruption: replace by a MASK token, or by a uniform draw",
                      choices=("absorb", "uniform"))
    copy: bool = flag(True, "--param gate: gate between replacing and copying the input token "
                      "(--no-copy: replace only)")
    time_cond: bool = flag(False, "add a learned embedding of t to the input")
    epochs: int = flag(20, "training epochs (a plain --resume keeps the run's)", low=1,
                       resume_may_change=True,
                       part="optimisation and data (a checkpoint keeps these and the model's)")
    batch_size: int = flag(32, "captions per step", low=1)
    lr: float = flag(1e-3, "peak learning rate", above=0)
    lr_schedule: str = flag("cosine", "cosine decays the lr to 10% of its peak over training",
                            choices=("cosine", "constant"))
    optimizer: str = flag("adamw", "adamw, or rmsprop with eps 0.01 as the original research code",
                          choices=("adamw", "rmsprop"))
    weight_decay: float = flag(0.0, "AdamW weight decay", low=0)
    grad_clip: float = flag(1.0, "clip the gradient norm to this (0: off)", low=0)
    seed: int = flag(0, "seed of the initialisation, the data order and the training noise "
                     "(evaluation noise has its own)", low=0, high=2**31 - 1)
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
    eval_batch_size: int = flag(2000, "(caption, t) pairs per evaluation batch", low=1)
    val_steps: int = flag(10, "steps per caption in the per-epoch val estimate "
                          "(0: all T; test always sums all T)", low=0)



# the parts of each step's term: stay/reveal, token at masked, copy at unmasked
TERMS = ("reveal", "token", "copy")


# ----------------------------------------------------------------------------- forward process
class Corruption:
    """q(x_t | x_{t-1}) = (1 - b_t) [x_t = x_{t-1}] + b_t n(x_t), with a_t = 1 - t/T, over S states.
    Noise is drawn on the CPU, so a run replays the same x_t on any device."""

    def __init__(self, vocab_size: int, steps: int, noise: str):
        self.T, self.kind = steps, noise
        self.states = vocab_size + (noise == "absorb")
        self.mask = vocab_size if noise == "absorb" else None
        self.noise = (torch.full((self.states,), 1 / self.states) if noise == "uniform"
                      else F.one_hot(torch.tensor(self.mask), self.states).float())  # n, (S,)
        # states no caption holds (data.py never writes <bos>): x_0 is never one of them
        self.not_data = torch.zeros(self.states, dtype=torch.bool)
        self.not_data[data.BOS] = True
        if self.mask is not None:
            self.not_data[self.mask] = True

    def alpha_bar(self, t, dtype=torch.float32):
        return 1 - t.to(dtype) / self.T

    def reveal_prob(self, t, dtype=torch.float32):
        """(a_{t-1} - a_t) / (1 - a_t): a MASK at step t is revealed at t-1 with this probability (= 1/t)."""
        a_prev, a = self.alpha_bar(t - 1, dtype), self.alpha_bar(t, dtype)
        return (a_prev - a) / (1 - a)

    def marginal(self, x0, t, dtype=torch.float32):
        """q(x_t | x_0) for x0 (..., L) and t (...,) -> (..., L, S), in the caller's dtype."""
        a = self.alpha_bar(t, dtype)[..., None, None]
        return a * F.one_hot(x0, self.states) + (1 - a) * self.noise.to(x0.device, dtype)

    def posterior(self, x0, xt, t, dtype=torch.float32):
        """q(x_{t-1} = j | x_t, x_0) ∝ q(x_t | x_{t-1} = j) q(x_{t-1} = j | x_0), for t >= 1
        -> (..., L, S), in the caller's dtype (a float64 model gets float64 terms)."""
        a_prev, a = self.alpha_bar(t - 1, dtype)[..., None, None], self.alpha_bar(t, dtype)[..., None, None]
        beta = 1 - a / a_prev
        likelihood = ((1 - beta) * F.one_hot(xt, self.states)
                      + beta * self.noise.to(xt.device, dtype)[xt].unsqueeze(-1))
        joint = likelihood * self.marginal(x0, t - 1, dtype)
        return joint / joint.sum(-1, keepdim=True)

    def sample(self, x0, t, generator=None):
        """x_t ~ q(x_t | x_0) for CPU x0 (N, L), t (N,): keep each slot with prob a_t, else draw it from n."""
        keep = torch.rand(x0.shape, generator=generator) < self.alpha_bar(t)[..., None]
        noise = torch.multinomial(self.noise, x0.numel(), replacement=True, generator=generator)
        return torch.where(keep, x0, noise.view(x0.shape))

    def prior_kl(self, x0):
        """KL(q(x_T | x_0) || n), summed over slots -> (...,). Zero when a_T = 0, counted anyway."""
        q = self.marginal(x0, torch.full(x0.shape[:-1], self.T, device=x0.device))
        return (torch.xlogy(q, q) - torch.xlogy(q, self.noise.to(x0.device))).sum((-1, -2))


# ----------------------------------------------------------------------------- model
def dilation_cycle(text: str, depth: int) -> list[int]:
    """"1,2,4,8" and depth 6 -> [1, 2, 4, 8, 1, 2]."""
    try:
        cycle = [int(d) for d in text.split(",")]
    except ValueError:
        cycle = []
    if not cycle or min(cycle) < 1:
        raise RunError(f"--dilation wants positive integers separated by commas, e.g. 1,2,4,8; got {text!r}")
    return [cycle[i % len(cycle)] for i in range(depth)]


class ResidualCNN(nn.Module):
    """The notes' network: h <- tanh(h + Conv1d_d(h)) per block; the skip inside the tanh keeps deep stacks
    trainable, and dilation d widens what a block sees without adding weights."""

    def __init__(self, width, kernel, dilations):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(width, width, kernel, padding=d * (kernel // 2), dilation=d)
                                   for d in dilations)

    def forward(self, h):
        h = h.transpose(1, 2)                                                # (N, E, L) for Conv1d
        for conv in self.convs:
            h = torch.tanh(h + conv(h))
        return h.transpose(1, 2)                                             # (N, L, E)


def rotate(x, cos, sin):
    """RoPE (Su et al. 2021) on x (N, H, L, Dh): each pair (x_a, x_b) of channels a < Dh/2, b = a + Dh/2 at
    slot i is turned by the angle i w_a,
        (x_a, x_b) -> (x_a cos iw_a - x_b sin iw_a, x_a sin iw_a + x_b cos iw_a).
    Then <rotate(q)_i, rotate(k)_j> depends on i and j only through i - j: positions are relative."""
    x_a, x_b = x.chunk(2, dim=-1)                                            # (N, H, L, Dh/2) each
    return torch.cat([x_a * cos - x_b * sin, x_a * sin + x_b * cos], dim=-1)


class RotaryAttention(nn.Module):
    """Pre-norm bidirectional self-attention with rotary queries and keys:  h <- h + W_o attn(LN(h)),
    attn = softmax(R q k^T R^T / sqrt(Dh)) v per head, R the rotation of each slot's position."""

    def __init__(self, width, heads, slots=data.SLOTS, base=1e4):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        head_dim = width // heads
        w = base ** (-torch.arange(head_dim // 2) / (head_dim // 2))         # (Dh/2,): from 1 down to ~1/base
        angles = torch.arange(slots)[:, None] * w                            # (L, Dh/2)
        self.register_buffer("cos", angles.cos(), persistent=False)          # not in checkpoints: fixed
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, h):
        N, L, E = h.shape
        q, k, v = self.qkv(self.norm(h)).view(N, L, 3, self.heads, E // self.heads).permute(2, 0, 3, 1, 4)
        cos, sin = self.cos[:L].to(h.dtype), self.sin[:L].to(h.dtype)       # (L, Dh/2)
        a = F.scaled_dot_product_attention(rotate(q, cos, sin), rotate(k, cos, sin), v)  # (N, H, L, Dh)
        return h + self.out(a.transpose(1, 2).reshape(N, L, E))             # (N, L, E)


class MLP(nn.Module):
    """Pre-norm feed-forward step:  h <- h + W_2 gelu(W_1 LN(h)),  W_1: E -> ratio * E."""

    def __init__(self, width, ratio):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, ratio * width), nn.GELU(),
                                 nn.Linear(ratio * width, width))

    def forward(self, h):
        return h + self.net(h)                                               # (N, L, E)


class TanhConv(nn.Module):
    """The CNN's block as a step of its own:  h <- tanh(h + Conv1d_d(h)),  on (N, L, E)."""

    def __init__(self, width, kernel, dilation):
        super().__init__()
        self.conv = nn.Conv1d(width, width, kernel, padding=dilation * (kernel // 2), dilation=dilation)

    def forward(self, h):
        return torch.tanh(h + self.conv(h.transpose(1, 2)).transpose(1, 2))  # (N, L, E)


class Blocks(nn.Module):
    """--backbone transformer: D blocks of [rotary attention, MLP], every slot sees every slot from the first
    block and "the slot to my left" is the same offset at every position (no learned positions: at 3 epochs
    they scored 153 nats against rotary's 109).
    --backbone hybrid: D blocks of [tanh conv, rotary attention, MLP]: the convolution reads the neighbours,
    attention the far revealed characters. A final LayerNorm, since pre-norm steps leave h unnormalised."""

    def __init__(self, width, depth, heads, mlp_ratio, conv_dilations=None, kernel=5):
        super().__init__()
        steps = []
        for d in range(depth):
            if conv_dilations is not None:
                steps.append(TanhConv(width, kernel, conv_dilations[d]))
            steps.append(RotaryAttention(width, heads))
            if mlp_ratio:
                steps.append(MLP(width, mlp_ratio))
        self.steps = nn.Sequential(*steps)
        self.norm = nn.LayerNorm(width)

    def forward(self, h):
        return self.norm(self.steps(h))                                      # (N, L, E)


def check_flags(cfg):
    """The flag combinations this model refuses, in one place (the run calls it before writing any file, and
    Model before building)."""
    dilation_cycle(cfg.dilation, cfg.depth)  # a bad --dilation is refused there
    if cfg.param == "x0" and cfg.noise != "absorb":
        raise RunError("--param x0 predicts the character under a MASK, so it needs --noise absorb; "
                       "use --param gate with --noise uniform")
    if cfg.kernel % 2 == 0:
        raise RunError(f"--kernel {cfg.kernel} must be odd, so that a slot's output sits on the slot")
    if cfg.param == "x0" and not cfg.copy:
        raise RunError("--no-copy removes the copy gate of --param gate; --param x0 has no gate")
    if cfg.backbone != "cnn" and cfg.embed % cfg.heads:
        raise RunError(f"--heads {cfg.heads} must divide --embed {cfg.embed}")
    if cfg.backbone != "cnn" and (cfg.embed // cfg.heads) % 2:
        raise RunError(f"rotary positions turn pairs of channels: --embed {cfg.embed} / --heads {cfg.heads} "
                       "must be even")


class Model(nn.Module):
    def __init__(self, vocab_size: int, cfg: Config):
        super().__init__()
        check_flags(cfg)
        self.corruption = Corruption(vocab_size, cfg.diffusion_steps, cfg.noise)
        S, E = self.corruption.states, cfg.embed
        self.param = cfg.param
        self.embed = nn.Embedding(S, E)  # also the output matrix (tied)
        self.time_embed = nn.Embedding(cfg.diffusion_steps + 1, E) if cfg.time_cond else None
        dilations = dilation_cycle(cfg.dilation, cfg.depth)
        self.backbone = (ResidualCNN(E, cfg.kernel, dilations) if cfg.backbone == "cnn" else
                         Blocks(E, cfg.depth, cfg.heads, cfg.mlp_ratio,
                                dilations if cfg.backbone == "hybrid" else None, cfg.kernel))
        self.out_bias = nn.Parameter(torch.zeros(S))
        self.gate = nn.Linear(E, 2) if cfg.param == "gate" and cfg.copy else None

    def logits(self, xt, t):
        """Per-slot scores over the S states for xt (N, L), t (N,) -> (N, L, S), and the features
        (N, L, E)."""
        h = self.embed(xt)                                                   # (N, L, E)
        if self.time_embed is not None:
            h = h + self.time_embed(t).unsqueeze(1)
        h = self.backbone(h)
        return h @ self.embed.weight.t() + self.out_bias, h

    def x0_log_probs(self, xt, t, temperature=1.0):
        """--param x0: log p_th(x_0 | x_t), (N, L, S), zero mass on states no caption holds."""
        logits, _ = self.logits(xt, t)
        not_data = self.corruption.not_data.to(xt.device)
        return F.log_softmax((logits / temperature).masked_fill(not_data, -math.inf), dim=-1)

    def reverse_log_probs(self, xt, t, temperature=1.0):
        """log p(x_{t-1} | x_t) for xt (N, L), t (N,) -> (N, L, S). At t = 1 it puts no mass outside the
        data."""
        c = self.corruption
        # (S,), all False for uniform noise
        is_mask = torch.arange(c.states, device=xt.device) == c.mask
        if self.param == "x0":
            log_x0 = self.x0_log_probs(xt, t, temperature)
            reveal = c.reveal_prob(t, log_x0.dtype).to(xt.device)[:, None, None]  # (N, 1, 1)
            at_mask = torch.where(is_mask, torch.log1p(-reveal), log_x0 + reveal.log())
            kept = F.one_hot(xt, c.states).to(at_mask.dtype).log()           # unmasked slots stay as they are
            return torch.where((xt == c.mask).unsqueeze(-1), at_mask, kept)
        logits, h = self.logits(xt, t)
        log_p = F.log_softmax(logits / temperature, dim=-1)
        if self.gate is not None:
            log_gate = F.log_softmax(self.gate(h), dim=-1)                   # (N, L, 2): replace, copy
            log_p = log_p + log_gate[..., :1]
            at_input = torch.logaddexp(log_p.gather(-1, xt.unsqueeze(-1)), log_gate[..., 1:])
            log_p = log_p.scatter(-1, xt.unsqueeze(-1), at_input)
        last = (t == 1)[:, None, None] & c.not_data.to(xt.device)           # x_0 is data
        return F.log_softmax(log_p.masked_fill(last, -math.inf), dim=-1)

    def step_terms(self, x0, xt, t):
        """The bound's term of step t, KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) summed over slots (at
        t = 1 q is x_0 itself, so this is -log p(x_0 | x_1)), split by TERMS -> (N, 3): at the slots x_t
        changed, the choice MASK-or-not (absorb only) and the token; at the slots it kept, copying them."""
        c = self.corruption
        changed = xt != x0                                                   # (N, L)
        if self.param == "x0":  # the stay/reveal part matches q exactly, unmasked slots are copied exactly
            nll = -self.x0_log_probs(xt, t).gather(-1, x0.unsqueeze(-1)).squeeze(-1)
            token = c.reveal_prob(t, nll.dtype).to(xt.device) * torch.where(changed, nll, 0.0).sum(-1)
            return torch.stack([torch.zeros_like(token), token, torch.zeros_like(token)], -1)
        log_p = self.reverse_log_probs(xt, t)
        q = c.posterior(x0, xt, t, log_p.dtype)
        # where q_j = 0 the KL term is 0 even if p_j = 0 too (xlogy and where avoid 0 * inf)
        kl = (torch.xlogy(q, q) - torch.where(q > 0, q * log_p, 0.0)).sum(-1)  # (N, L)
        reveal = torch.zeros_like(kl)
        if c.mask is not None:  # chain rule: KL = KL(stay-or-reveal) + q(reveal) KL(token | reveal)
            q_stay, log_p_stay = q[..., c.mask], log_p[..., c.mask]
            log_p_reveal = torch.logsumexp(
                log_p.index_fill(-1, torch.tensor([c.mask], device=xt.device), -math.inf), -1)
            reveal = (torch.xlogy(q_stay, q_stay) - torch.where(q_stay > 0, q_stay * log_p_stay, 0.0)
                      + torch.xlogy(1 - q_stay, 1 - q_stay)
                      - torch.where(q_stay < 1, (1 - q_stay) * log_p_reveal, 0.0))
            reveal = torch.where(changed, reveal, 0.0)
        token = torch.where(changed, kl, 0.0) - reveal
        return torch.stack([reveal.sum(-1), token.sum(-1), torch.where(changed, 0.0, kl).sum(-1)], -1)

    def step_loss(self, x0, xt, t):
        return self.step_terms(x0, xt, t).sum(-1)                             # (N,)

    def loss(self, x0):
        """Unbiased one-sample estimate of the bound for each caption of x0 (B, L) -> (B,):
        T * (term of one t per caption, stratified across the batch) + prior KL."""
        B, T = len(x0), self.corruption.T
        u = (torch.rand(()) + torch.arange(B) / B) % 1.0
        t = 1 + (u * T).long()
        xt = self.corruption.sample(x0.cpu(), t).to(x0.device)
        return T * self.step_loss(x0, xt, t.to(x0.device)) + self.corruption.prior_kl(x0)


def build_model(vocab, train, cfg):
    """The family's constructor (a model may read its training captions, as DLM107's lexicon does)."""
    return Model(len(vocab), cfg)


# ----------------------------------------------------------------------------- evaluate, sample
@torch.no_grad()
def evaluate(model, x, cfg, device, full=True):
    """The bound of every caption of x (N, L): all steps t = 1..T summed, one x_t draw per step and caption
    from common.eval_generator(); extra holds the mean term of each step, total and by TERMS. With
    0 < steps = k < T (the per-epoch val check): k stratified steps per caption weighted by T/k, an unbiased
    estimate of the same bound at k/T of the cost, and no per-step terms; full (the test): all T steps.
    Returns (nll, extra), extra["bound"] saying what it is."""
    model.eval()
    T = model.corruption.T
    k = cfg.val_steps if 0 < cfg.val_steps < T and not full else T
    generator = common.eval_generator()
    if k == T:
        t = torch.arange(1, T + 1).repeat(len(x))                           # (N * T,)
    else:
        u = torch.rand(len(x), 1, generator=generator)
        t = 1 + ((u + torch.arange(k) / k) % 1.0 * T).long().flatten()     # (N * k,)
    rows = x.repeat_interleave(k, dim=0)                                    # (N * k, L): caption-major
    noised = model.corruption.sample(rows, t, generator)  # drawn at once: the same for any --eval-batch-size
    batches = zip(*(z.split(cfg.eval_batch_size) for z in (rows, noised, t)))
    terms = torch.cat([model.step_terms(x0.to(device), xt.to(device), tt.to(device)).double().cpu()
                       for x0, xt, tt in batches])
    terms = terms.view(len(x), k, len(TERMS))                               # (N, k, 3)
    model.train()
    nll = terms.sum((1, 2)) * (T / k) + model.corruption.prior_kl(x).double()
    if k < T:
        return nll, {"bound": f"-elbo, estimated from {k} of {T} steps"}
    per_step = terms.mean(0)                                                # (T, 3)
    extra = {"bound": "-elbo", "per_step": per_step.sum(-1).tolist()}
    extra.update({f"per_step_{name}": per_step[:, i].tolist() for i, name in enumerate(TERMS)})
    return nll, extra


@torch.no_grad()
def sample(model, n, cfg, device, generator, slots=data.SLOTS):
    """Ancestral: x_T ~ n, then x_{t-1} ~ p(x_{t-1} | x_t) for t = T..1; x_0 holds no MASK and no <bos>."""
    model.eval()
    c = model.corruption
    x = torch.multinomial(c.noise, n * slots, replacement=True, generator=generator).view(n, slots)
    for t in range(c.T, 0, -1):
        log_p = model.reverse_log_probs(x.to(device), torch.full((n,), t, device=device), cfg.temperature)
        x = torch.multinomial(torch.softmax(log_p, -1).view(-1, c.states).cpu(), 1,
                              generator=generator).view(n, -1)
    model.train()
    return x, {}


def plot_noise_levels(run_dir, per_step, corruption):
    """noise_levels.png: which noise levels cost the most nats, and on what (the TERMS of each step)."""
    noised = 1 - corruption.alpha_bar(torch.arange(1, corruption.T + 1))
    labels = {"": "total", "_reveal": "stay/reveal", "_token": "token at masked slots",
              "_copy": "copy at unmasked slots"}
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in labels.items():
        ax.plot(noised.numpy(), per_step["per_step" + key], ".-" if key == "" else "-", markersize=3,
                label=label)
    ax.set(xlabel="fraction of slots noised, 1 - a_t", ylabel="nats per caption (term of step t)",
           title=f"{corruption.kind} noise: bound = {sum(per_step['per_step']):.1f} nats + prior")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, run_dir / "noise_levels.png")


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
    vocab, splits, sha256, found = data.load(cfg.data_dir or None, cfg.custom_data)
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
    fig, ax = plt.subplots(figsize=(6, 4))
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
    nll, extra = evaluate(model, splits[split], cfg, device, full=split == "test")
    bound = extra.pop("bound")
    nlpps, bpc = common.nlpps_and_bpc(nll, data.num_chars(splits[split]))  # nats a caption, bits a character
    if not math.isfinite(nlpps):  # (before its record: metrics.jsonl holds numbers only)
        raise non_finite(f"{split} NLPPS", progress["step"], run_dir)
    if split == "test":  # in file order, for compare.py; first, so that a test record always has its file
        write_file(run_dir / "test_nlpps.txt", "".join(f"{v:.4f}\n" for v in nll.tolist()))
    data_label = "custom data" if cfg.custom_data else ""
    scalars = "".join(f" | {k} {v:.4g}" for k, v in extra.items()  # (precision and recall: in the record)
                      if isinstance(v, (int, float)) and not k.endswith(("_precision", "_recall")))
    seconds = time.time() - t0
    log(run_dir, f"eval {split} | epoch {progress['epoch']:.2f} | step {progress['step']} | "
        f"nlpps {nlpps:.2f} | bpc {bpc:.4f} ({', '.join(filter(None, [bound, data_label]))}){scalars} | "
        f"{seconds:.1f} s",
        dict(kind=split, **progress, nlpps=nlpps, bpc=bpc, bound=bound, data=data_label or "multi30k",
             seconds=seconds, **extra))
    if split == "test":  # (its bound at each noise level)
        plot_noise_levels(run_dir, extra, model.corruption)
    return nlpps


def write_samples(model, vocab, cfg, device, run_dir, progress):
    """Samples, printed and appended to samples.txt (--sample-only: printed only). Their own generator:
    sampling never shifts training."""
    step, epoch = progress["step"], int(progress["epoch"])
    generator = torch.Generator().manual_seed(cfg.seed + epoch)
    ids, _ = sample(model, cfg.show_samples, cfg, device, generator)
    lines = [f"[SAMPLE] {vocab.decode(s)}" for s in ids]
    if cfg.sample_only:  # (printed only: the run folder stays as the run left it)
        return print("\n".join(lines), flush=True)
    header = f"# step {step} (epoch {epoch}), temperature {cfg.temperature}\n"
    write_file(run_dir / "samples.txt", header + "".join(line + "\n" for line in lines), "a")
    log(run_dir, "\n".join(lines))


def run(argv=None):
    cfg, ckpt, run_dir = open_run(argv)
    check_flags(cfg)
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
        return write_samples(model, vocab, cfg, device, run_dir, progress())
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
                    write_samples(model, vocab, cfg, device, run_dir, progress())
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

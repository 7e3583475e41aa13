"""DLM142: a reverse-diffusion language model over characters, scored by its evidence lower bound.

Forward process: every slot of x_0 (a 100-slot caption, see data.py) is corrupted independently,
    q(x_t | x_{t-1}) = (1 - b_t) [x_t = x_{t-1}] + b_t n(x_t),     t = 1..T,
    q(x_t | x_0)     = a_t [x_t = x_0] + (1 - a_t) n(x_t),         a_t = prod_{s<=t} (1 - b_s) = 1 - t/T,
with the noise distribution n all its mass on an extra MASK token (--noise absorb) or uniform over the
vocabulary (--noise uniform, as the original). a_T = 0, so x_T is exactly noise and p(x_T) = n.
A network (--backbone cnn: the notes' residual tanh CNN, h <- tanh(h + Conv1d_d(h)) with dilation d from
the --dilation cycle; --backbone transformer: a pre-norm bidirectional encoder with learned positions)
maps x_t (+ an embedding of t with --time-cond) to per-slot logits over the tied embedding. Reverse kernel:
  --param x0 (absorb only; MDLM's "SUBS"): logits -> p_th(x_0,i | x_t) over characters (never MASK or <bos>),
    p(x_{t-1,i} | x_t) = [x_{t-1,i} = x_{t,i}]                            if slot i is not MASK,
                       = (1 - a_{t-1})/(1 - a_t) [MASK] + (a_{t-1} - a_t)/(1 - a_t) p_th(x_{t-1,i} | x_t)  if it is,
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
README row:  python dlm142_diffusion.py --depth 11 --lr 1e-4
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

SCRIPT = "dlm142_diffusion"


@dataclass
class Config:
    # model
    param: str = arg("x0", "reverse kernel: x0 predicts the character under each MASK (absorb only); gate mixes "
                     "a replace softmax with copying the input (the notes')", choices=("x0", "gate"))
    backbone: str = arg("cnn", "network over x_t: the notes' residual tanh CNN, or a transformer encoder",
                        choices=("cnn", "transformer"))
    embed: int = arg(50, "embedding and channel width E", low=1)
    depth: int = arg(11, "residual conv blocks, or transformer layers, D", low=1)
    kernel: int = arg(5, "conv kernel width (odd)", low=1)
    dilation: str = arg("1", "conv dilations, a comma-separated cycle repeated over the depth (e.g. 1,2,4,8)")
    heads: int = arg(4, "attention heads of the transformer (must divide E)", low=1)
    steps: int = arg(100, "diffusion steps T", low=1)
    noise: str = arg("absorb", "corruption: replace by a MASK token, or by a uniform draw", choices=("absorb", "uniform"))
    copy: bool = arg(True, "--param gate: gate between replacing and copying the input token (--no-copy: replace only)")
    time_cond: bool = arg(False, "add a learned embedding of t to the input")
    # optimisation
    epochs: int = arg(20, "training epochs", low=1)
    batch_size: int = arg(32, "captions per step", low=1)
    lr: float = arg(1e-3, "peak learning rate", low=0, low_open=True)
    lr_schedule: str = arg("cosine", "cosine decays the lr to 10%% of its peak over training", choices=("cosine", "constant"))
    optimizer: str = arg("adamw", "adamw, or rmsprop with eps 0.01 as the original research code", choices=("adamw", "rmsprop"))
    weight_decay: float = arg(0.0, "AdamW weight decay", low=0)
    grad_clip: float = arg(1.0, "clip the gradient norm to this (0: off)", low=0)
    seed: int = arg(0, "seed of the initialisation, the data order and the noise")
    # run control
    device: str = arg("auto", "where to run", choices=("auto", "cuda", "mps", "cpu"))
    dtype: str = arg("float32", "compute dtype (bfloat16 autocasts on CUDA)", choices=("float32", "bfloat16"))
    compile: bool = arg(False, "torch.compile the model")
    data_dir: str = arg("", "folder with the Multi30k .gz files (else $DLM_DATA_DIR, else download)")
    custom_data: bool = arg(False, "use data files that differ from the published Multi30k ones (no checksum check)")
    out_dir: str = arg("out", "runs are written to OUT_DIR/dlm142_diffusion/RUN_NAME")
    run_name: str = arg("default", "name of the run folder")
    resume: bool = arg(False, "continue from the run folder's ckpt_last.pt")
    eval_only: bool = arg(False, "evaluate the run folder's ckpt_best.pt on val and test, then stop")
    sample_only: bool = arg(False, "print samples from the run folder's ckpt_best.pt, then stop")
    num_samples: int = arg(8, "samples printed and saved at each evaluation", low=0)
    temperature: float = arg(1.0, "sampling temperature of the network's logits", low=0, low_open=True)
    log_every: int = arg(50, "steps between train log lines", low=1)
    max_steps: int = arg(0, "stop after this many steps in total (0: no limit)", low=0)
    limit_train: int = arg(0, "train on the first N captions only (0: all), for quick tests", low=0)
    eval_batch_size: int = arg(2000, "(caption, t) pairs per evaluation batch", low=1)
    val_steps: int = arg(10, "steps per caption in the per-epoch val estimate (0: all T; test always sums all T)", low=0)


# Flags that steer this run only; --resume takes every other setting from the checkpoint.
RUN_FLAGS = {"epochs", "device", "dtype", "compile", "data_dir", "custom_data", "out_dir", "run_name", "resume", "eval_only",
             "sample_only", "num_samples", "temperature", "log_every", "max_steps", "eval_batch_size", "val_steps"}
TERMS = ("reveal", "token", "copy")  # the parts of each step's term: stay/reveal, token at masked, copy at unmasked


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

    def marginal(self, x0, t):
        """q(x_t | x_0) for x0 (..., L) and t (...,) -> (..., L, S)."""
        a = self.alpha_bar(t)[..., None, None]
        return a * F.one_hot(x0, self.states) + (1 - a) * self.noise.to(x0.device)

    def posterior(self, x0, xt, t):
        """q(x_{t-1} = j | x_t, x_0) ∝ q(x_t | x_{t-1} = j) q(x_{t-1} = j | x_0), for t >= 1 -> (..., L, S)."""
        a_prev, a = self.alpha_bar(t - 1)[..., None, None], self.alpha_bar(t)[..., None, None]
        beta = 1 - a / a_prev
        likelihood = (1 - beta) * F.one_hot(xt, self.states) + beta * self.noise.to(xt.device)[xt].unsqueeze(-1)
        joint = likelihood * self.marginal(x0, t - 1)
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
        raise UserError(f"--dilation wants positive integers separated by commas, e.g. 1,2,4,8; got {text!r}")
    return [cycle[i % len(cycle)] for i in range(depth)]


class ResidualCNN(nn.Module):
    """The notes' network: h <- tanh(h + Conv1d_d(h)) per block; the skip inside the tanh keeps deep stacks
    trainable, and dilation d widens what a block sees without adding weights."""

    def __init__(self, width, kernel, dilations):
        super().__init__()
        if kernel % 2 == 0:
            raise UserError(f"--kernel must be odd (the output keeps the input's length), got {kernel}")
        self.convs = nn.ModuleList(nn.Conv1d(width, width, kernel, padding=d * (kernel // 2), dilation=d)
                                   for d in dilations)

    def forward(self, h):
        h = h.transpose(1, 2)                                                # (N, E, L) for Conv1d
        for conv in self.convs:
            h = torch.tanh(h + conv(h))
        return h.transpose(1, 2)                                             # (N, L, E)


class Transformer(nn.Module):
    """A bidirectional pre-norm transformer encoder with learned positions: every slot sees every slot."""

    def __init__(self, width, depth, heads):
        super().__init__()
        if width % heads:
            raise UserError(f"--heads {heads} must divide --embed {width}")
        self.positions = nn.Parameter(0.02 * torch.randn(data.SLOTS, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)  # pre-norm layers leave the last output unnormalised

    def forward(self, h):
        return self.norm(self.layers(h + self.positions[: h.shape[1]]))    # (N, L, E)


class Model(nn.Module):
    def __init__(self, vocab_size: int, cfg: Config):
        super().__init__()
        if cfg.param == "x0" and cfg.noise != "absorb":
            raise UserError("--param x0 predicts the character under a MASK, so it needs --noise absorb; "
                            "use --param gate with --noise uniform")
        if cfg.param == "x0" and not cfg.copy:
            raise UserError("--no-copy removes the copy gate of --param gate; --param x0 has no gate")
        self.corruption = Corruption(vocab_size, cfg.steps, cfg.noise)
        S, E = self.corruption.states, cfg.embed
        self.param = cfg.param
        self.embed = nn.Embedding(S, E)  # also the output matrix (tied)
        self.time_embed = nn.Embedding(cfg.steps + 1, E) if cfg.time_cond else None
        self.backbone = (ResidualCNN(E, cfg.kernel, dilation_cycle(cfg.dilation, cfg.depth))
                         if cfg.backbone == "cnn" else Transformer(E, cfg.depth, cfg.heads))
        self.out_bias = nn.Parameter(torch.zeros(S))
        self.gate = nn.Linear(E, 2) if cfg.param == "gate" and cfg.copy else None

    def logits(self, xt, t):
        """Per-slot scores over the S states for xt (N, L), t (N,) -> (N, L, S), and the features (N, L, E)."""
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
        """log p(x_{t-1} | x_t) for xt (N, L), t (N,) -> (N, L, S). At t = 1 it puts no mass outside the data."""
        c = self.corruption
        is_mask = torch.arange(c.states, device=xt.device) == c.mask        # (S,), all False for uniform noise
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
        """The bound's term of step t, KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) summed over slots (at t = 1
        q is x_0 itself, so this is -log p(x_0 | x_1)), split by TERMS -> (N, 3): at the slots x_t changed,
        the choice MASK-or-not (absorb only) and the token; at the slots it kept, copying them."""
        c = self.corruption
        changed = xt != x0                                                   # (N, L)
        if self.param == "x0":  # the stay/reveal part matches q exactly, unmasked slots are copied exactly
            nll = -self.x0_log_probs(xt, t).gather(-1, x0.unsqueeze(-1)).squeeze(-1)
            token = c.reveal_prob(t, nll.dtype).to(xt.device) * torch.where(changed, nll, 0.0).sum(-1)
            return torch.stack([torch.zeros_like(token), token, torch.zeros_like(token)], -1)
        log_p = self.reverse_log_probs(xt, t)
        q = c.posterior(x0, xt, t)
        # where q_j = 0 the KL term is 0 even if p_j = 0 too (xlogy and where avoid 0 * inf)
        kl = (torch.xlogy(q, q) - torch.where(q > 0, q * log_p, 0.0)).sum(-1)  # (N, L)
        reveal = torch.zeros_like(kl)
        if c.mask is not None:  # chain rule: KL = KL(stay-or-reveal) + q(reveal) KL(token | reveal)
            q_stay, log_p_stay = q[..., c.mask], log_p[..., c.mask]
            log_p_reveal = torch.logsumexp(log_p.index_fill(-1, torch.tensor([c.mask], device=xt.device), -math.inf), -1)
            reveal = (torch.xlogy(q_stay, q_stay) - torch.where(q_stay > 0, q_stay * log_p_stay, 0.0)
                      + torch.xlogy(1 - q_stay, 1 - q_stay) - torch.where(q_stay < 1, (1 - q_stay) * log_p_reveal, 0.0))
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


# ----------------------------------------------------------------------------- evaluate, sample
@torch.no_grad()
def evaluate(model, x, cfg, device, steps_per_caption=0) -> common.Evaluation:
    """The bound of every caption of x (N, L): all steps t = 1..T summed, one x_t draw per step and
    caption from common.eval_generator(); extra holds the mean term of each step, total and by TERMS.
    With 0 < steps_per_caption = k < T: k stratified steps per caption weighted by T/k, an unbiased
    estimate of the same bound at k/T of the cost (the per-epoch val check); then no per-step terms."""
    model.eval()
    T = model.corruption.T
    k = steps_per_caption if 0 < steps_per_caption < T else T
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
        return common.Evaluation(nll, f"-elbo, estimated from {k} of {T} steps")
    per_step = terms.mean(0)                                                # (T, 3)
    extra = {"per_step": per_step.sum(-1).tolist()}
    extra.update({f"per_step_{name}": per_step[:, i].tolist() for i, name in enumerate(TERMS)})
    return common.Evaluation(nll, "-elbo", extra)


@torch.no_grad()
def sample(model, n, temperature, device, generator, slots=data.SLOTS):
    """Ancestral: x_T ~ n, then x_{t-1} ~ p(x_{t-1} | x_t) for t = T..1; x_0 holds no MASK and no <bos>."""
    model.eval()
    c = model.corruption
    x = torch.multinomial(c.noise, n * slots, replacement=True, generator=generator).view(n, slots)
    for t in range(c.T, 0, -1):
        log_p = model.reverse_log_probs(x.to(device), torch.full((n,), t, device=device), temperature)
        x = torch.multinomial(torch.softmax(log_p, -1).view(-1, c.states).cpu(), 1, generator=generator).view(n, -1)
    model.train()
    return x


# ----------------------------------------------------------------------------- main
def report(run_dir, text):
    print(text, flush=True)
    with open(run_dir / "log.txt", "a") as f:
        f.write(text + "\n")


def write_samples(model, cfg, vocab, device, run_dir, epoch):
    if cfg.num_samples == 0:
        return
    generator = torch.Generator().manual_seed(cfg.seed + epoch)  # own RNG: sampling never shifts training
    texts = [vocab.decode(s) for s in sample(model, cfg.num_samples, cfg.temperature, device, generator)]
    with open(run_dir / "samples.txt", "a") as f:
        f.write(f"# epoch {epoch}, temperature {cfg.temperature}\n" + "".join(t + "\n" for t in texts))
    for t in texts:
        report(run_dir, f"[SAMPLE] {t}")


def eval_split(model, splits, split, cfg, device, run_dir, step, epoch):
    result = evaluate(model, splits[split], cfg, device, cfg.val_steps if split == "val" else 0)
    nlpps = result.nll.mean().item()
    bpc = common.bits_per_char(nlpps, data.num_chars(splits[split]).float().mean().item())
    report(run_dir, f"eval {split} | epoch {epoch:.2f} | step {step} | nlpps {nlpps:.2f} | bpc {bpc:.4f} ({result.bound})")
    common.log_metrics(run_dir, dict(kind=split, step=step, epoch=epoch, nlpps=nlpps, bpc=bpc, bound=result.bound,
                                     **result.extra))
    if split == "test":  # per caption, file order: compare.py lines models up caption by caption
        (run_dir / "test_nlpps.txt").write_text("".join(f"{v:.4f}\n" for v in result.nll.tolist()))
        plot_noise_levels(run_dir, result.extra, model.corruption)
    return result.nll


def plot_noise_levels(run_dir, per_step, corruption):
    """noise_levels.png: which noise levels cost the most nats, and on what (the TERMS of each step)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    noised = 1 - corruption.alpha_bar(torch.arange(1, corruption.T + 1))
    labels = {"": "total", "_reveal": "stay/reveal", "_token": "token at masked slots",
              "_copy": "copy at unmasked slots"}
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in labels.items():
        ax.plot(noised.numpy(), per_step["per_step" + key], ".-" if key == "" else "-", markersize=3, label=label)
    ax.set(xlabel="fraction of slots noised, 1 - a_t", ylabel="nats per caption (term of step t)",
           title=f"{corruption.kind} noise: bound = {sum(per_step['per_step']):.1f} nats + prior")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "noise_levels.png", dpi=100)
    plt.close(fig)


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
    run_dir.mkdir(parents=True, exist_ok=True)
    device = common.pick_device(cfg.device)
    torch.manual_seed(cfg.seed)

    vocab, splits = data.load(cfg.data_dir or None, custom=cfg.custom_data)
    if ckpt is not None and ckpt["vocab"] != vocab.itos:
        raise UserError("the checkpoint's vocabulary differs from this data's: wrong --data-dir?")
    train = splits["train"][: cfg.limit_train or None]
    model = Model(len(vocab), cfg).to(device)
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

    if cfg.sample_only:
        write_samples(model, cfg, vocab, device, run_dir, epoch=step // steps_per_epoch)
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
        t0, seen, loss_sum, loss_n = time.time(), 0, 0.0, 0
        for x in data.batches(train, cfg.batch_size, generator, skip=step - epoch * steps_per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            with autocast:
                loss = forward(x.to(device)).mean()
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
            if step % cfg.log_every == 0:
                rate = seen / (time.time() - t0)
                report(run_dir, f"step {step} | epoch {step / steps_per_epoch:.2f} | train nlpps "
                                f"{loss_sum / loss_n:.2f} | {rate:.0f} seq/s | lr {lr_at(step):.2e}")
                common.log_metrics(run_dir, dict(kind="train", step=step, epoch=step / steps_per_epoch,
                                                 nlpps=loss_sum / loss_n, seq_per_s=rate))
                t0, seen, loss_sum, loss_n = time.time(), 0, 0.0, 0
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
        write_samples(model, cfg, vocab, device, run_dir, epoch=step // steps_per_epoch)
        common.plot_curves(run_dir, f"{SCRIPT} ({cfg.run_name})")

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

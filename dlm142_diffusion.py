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
Defaults (x0, CNN E = 96, D = 6, undilated, lr 1e-3) come from 2-epoch probes on 10,000 captions: x0 beat
the gate by 14 nats, E = 96, D = 6 beat E = 50, D = 11 by 8; dilation, lr 2e-3 and lr 3e-3 were worse;
at 20 epochs E = 128 buys 0.3 nats for 1.45x the time, the transformer loses 15 (README).
README rows:  python dlm142_diffusion.py                                  (the defaults; --epochs 40)
              python dlm142_diffusion.py --embed 50 --depth 11 --lr 1e-4  (the notes' network and lr)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data
from common import UserError, arg

SCRIPT = "dlm142_diffusion"


@dataclass
class Config(common.BaseConfig):
    param: str = arg("x0", "reverse kernel: x0 predicts the character under each MASK (absorb only); gate mixes "
                     "a replace softmax with copying the input (the notes')", choices=("x0", "gate"))
    backbone: str = arg("cnn", "network over x_t: the notes' residual tanh CNN, or a transformer encoder",
                        choices=("cnn", "transformer"))
    embed: int = arg(96, "embedding and channel width E (the notes' network: 50)", low=1)
    depth: int = arg(6, "residual conv blocks, or transformer layers, D (the notes' network: 11)", low=1)
    kernel: int = arg(5, "conv kernel width (odd, so a slot's output sits on the slot)", low=1, odd=True)
    dilation: str = arg("1", "conv dilations, a comma-separated cycle repeated over the depth (e.g. 1,2,4,8)")
    heads: int = arg(4, "attention heads of the transformer (must divide E)", low=1)
    diffusion_steps: int = arg(100, "diffusion steps T", low=1)
    noise: str = arg("absorb", "corruption: replace by a MASK token, or by a uniform draw", choices=("absorb", "uniform"))
    copy: bool = arg(True, "--param gate: gate between replacing and copying the input token (--no-copy: replace only)")
    time_cond: bool = arg(False, "add a learned embedding of t to the input")
    batch_size: int = arg(32, "captions per step", low=1)
    lr: float = arg(1e-3, "peak learning rate", low=0, low_open=True)
    eval_batch_size: int = arg(2000, "(caption, t) pairs per evaluation batch", low=1, run=True)
    val_steps: int = arg(10, "steps per caption in the per-epoch val estimate (0: all T; test always sums all T)",
                         low=0, run=True)


CURVES_SIDE = None  # the per-step view is noise_levels.png
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
        # learned, but started from sines and cosines, whose dot products already single out nearby slots:
        # from a random start the network was stuck near a context-free predictor for 2 epochs
        angles = torch.arange(data.SLOTS)[:, None] * torch.exp(-math.log(1e4) * torch.arange(0, width, 2) / width)
        self.positions = nn.Parameter(torch.stack([angles.sin(), angles.cos()], -1).flatten(1)[:, :width])  # (L, E)
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
        self.corruption = Corruption(vocab_size, cfg.diffusion_steps, cfg.noise)
        S, E = self.corruption.states, cfg.embed
        self.param = cfg.param
        self.embed = nn.Embedding(S, E)  # also the output matrix (tied)
        self.time_embed = nn.Embedding(cfg.diffusion_steps + 1, E) if cfg.time_cond else None
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
def evaluate(model, x, cfg, device, final=True) -> common.Evaluation:
    """The bound of every caption of x (N, L): all steps t = 1..T summed, one x_t draw per step and
    caption from common.eval_generator(); extra holds the mean term of each step, total and by TERMS.
    Not final (the per-epoch val check), with 0 < cfg.val_steps = k < T: k stratified steps per caption
    weighted by T/k, an unbiased estimate of the same bound at k/T of the cost; then no per-step terms."""
    model.eval()
    T = model.corruption.T
    k = cfg.val_steps if not final and 0 < cfg.val_steps < T else T
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
                       for x0, xt, tt in common.progress(batches, math.ceil(len(t) / cfg.eval_batch_size), "evaluating")])
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


def build_model(vocab, train, cfg):
    return Model(len(vocab), cfg)


def eval_split(model, vocab, splits, split, cfg, device, run, step, epoch):
    t0 = time.time()
    ev = evaluate(model, splits[split], cfg, device, final=split == "test")
    run.report_eval(split, ev, splits[split], step, epoch, time.time() - t0)
    if split == "test":
        plot_noise_levels(run.dir, ev.extra, model.corruption)
    return ev


def write_samples(model, vocab, splits, cfg, device, run, epoch):
    if cfg.show_samples:
        generator = torch.Generator().manual_seed(cfg.seed + epoch)  # own RNG: sampling never shifts training
        run.write_samples([f"[SAMPLE] {vocab.decode(s)}" for s in
                           sample(model, cfg.show_samples, cfg.temperature, device, generator)], epoch)


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

"""DLM100: an autoregressive character GRU. The exact-likelihood baseline of the family.

A caption x = (x_1 .. x_100) (characters, then PAD; see data.py) is scored exactly:

    log p(x) = sum_t log p(x_t | x_<t),      h_t = GRU(h_{t-1}, e[x_{t-1}]),  x_0 = BOS
    y_t = h_t / std(h_t)                      (divide by the std over features, as the original)

Head "mos" (default), a mixture of K softmaxes over the tied embedding e:
    p(x_t = c | x_<t) = sum_k pi_k(y_t) q_k(c),   pi(y) = softmax(W y + b),
    q_k(c) = softmax_c( exp(s_k) <v_k / std(v_k), e_c> )    (K fixed distributions, context picks the mix)
Head "softmax": p(x_t = c | x_<t) = softmax_c( exp(s) <y_t, e_c> + b_c ).

NLPPS = -log p(x) in nats, averaged over the test captions; exact for this model.
README row:  python dlm100_rnn.py                 (and --head softmax --run-name softmax)
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
from common import arg

SCRIPT = "dlm100_rnn"


@dataclass
class Config(common.BaseConfig):
    embed: int = arg(128, "embedding and GRU width E", low=1)
    head: str = arg("mos", "output head: mixture of softmaxes or a plain softmax", choices=("mos", "softmax"))
    components: int = arg(400, "mixture components K of the mos head", low=1)


CURVES_SIDE = None  # curves.png shows NLPPS only


# ----------------------------------------------------------------------------- model
def std_norm(x, eps=1e-5):
    return x / (x.std(dim=-1, keepdim=True) + eps)


class Model(nn.Module):
    def __init__(self, vocab_size: int, cfg: Config):
        super().__init__()
        E, K = cfg.embed, cfg.components
        self.head = cfg.head
        self.embed = nn.Embedding(vocab_size, E)  # N(0, 1); also the output matrix (tied)
        self.bos = data.BOS
        self.rnn = nn.GRU(E, E, batch_first=True)
        # <unit-std vector, N(0,1) row> has std sqrt(E): start the temperatures at 1/sqrt(E)
        # so the first predictions are soft, not one-hot.
        if self.head == "mos":
            self.mix = nn.Linear(E, K)
            self.k_vectors = nn.Parameter(torch.empty(K, E).uniform_(-1, 1) / math.sqrt(K))
            self.k_log_temp = nn.Parameter(torch.full((K, 1), -0.5 * math.log(E)))
        else:
            self.log_temp = nn.Parameter(torch.tensor(-0.5 * math.log(E)))
            self.bias = nn.Parameter(torch.zeros(vocab_size))

    def features(self, x, h=None):
        """x (B, T) ids of the *inputs* -> y (B, T, E) normalised GRU states, and the last state."""
        out, h = self.rnn(self.embed(x), h)
        return std_norm(out), h

    def component_log_probs(self):
        """(K, V) log q_k(c): K fixed distributions over the vocabulary."""
        logits = torch.exp(self.k_log_temp) * (std_norm(self.k_vectors) @ self.embed.weight.t())
        return F.log_softmax(logits, dim=-1)

    def log_probs_of(self, y, targets):
        """y (B, T, E), targets (B, T) -> (B, T) log p(target | context). The mos head gathers the K
        component probabilities of the target only: a (B, T, K, V) tensor would be ~1 GB a batch."""
        if self.head == "softmax":
            return self.all_log_probs(y).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        log_pi = F.log_softmax(self.mix(y), dim=-1)                       # (B, T, K)
        log_q_target = self.component_log_probs().t()[targets]              # (B, T, K)
        return torch.logsumexp(log_pi + log_q_target, dim=-1)

    def all_log_probs(self, y):
        """y (..., E) -> (..., V) log p over the whole vocabulary (used by the sampler)."""
        if self.head == "softmax":
            return F.log_softmax(torch.exp(self.log_temp) * (y @ self.embed.weight.t()) + self.bias, dim=-1)
        log_pi = F.log_softmax(self.mix(y), dim=-1).unsqueeze(-1)          # (..., K, 1)
        return torch.logsumexp(log_pi + self.component_log_probs(), dim=-2)  # (..., V)

    def loss(self, x):
        """x (B, 100) captions -> (B,) -log p(x) in nats, all 100 slots scored: the exact NLPPS."""
        inputs = torch.cat([torch.full_like(x[:, :1], self.bos), x[:, :-1]], dim=1)  # shift right
        y, _ = self.features(inputs)
        return -self.log_probs_of(y, x).sum(dim=1)


def build_model(vocab, train, cfg):
    return Model(len(vocab), cfg)


# ----------------------------------------------------------------------------- evaluate, sample
@torch.no_grad()
def evaluate(model, x, cfg, device, final=True):
    """-log p(x) of every caption of a split, in file order (exact; no noise, so `final` changes nothing)."""
    model.eval()
    batches = data.batches(x, cfg.eval_batch_size)
    nll = [model.loss(b.to(device)).float().cpu()
           for b in common.progress(batches, math.ceil(len(x) / cfg.eval_batch_size), "evaluating")]
    model.train()
    return common.Evaluation(torch.cat(nll), "exact")


@torch.no_grad()
def sample(model, n, temperature, device, generator):
    """Ancestral sampling, one slot at a time, from p(x_t | x_<t, x_t != BOS); once a caption draws PAD the
    rest is PAD."""
    model.eval()
    x = torch.full((n, 1), model.bos, dtype=torch.long, device=device)
    h, out = None, []
    done = torch.zeros(n, dtype=torch.bool, device=device)
    for _ in range(data.SLOTS):
        y, h = model.features(x, h)
        probs = torch.softmax(data.emittable(model.all_log_probs(y[:, -1])) / temperature, dim=-1)
        x = torch.multinomial(probs.cpu(), 1, generator=generator).to(device)
        x[done] = data.PAD
        done |= x[:, 0] == data.PAD
        out.append(x)
    model.train()
    return torch.cat(out, dim=1)


def eval_split(model, vocab, splits, split, cfg, device, run, step, epoch):
    t0 = time.time()
    ev = evaluate(model, splits[split], cfg, device, final=split == "test")
    run.report_eval(split, ev, splits[split], step, epoch, time.time() - t0)
    return ev


def write_samples(model, vocab, splits, cfg, device, run, epoch):
    if cfg.show_samples:
        generator = torch.Generator().manual_seed(cfg.seed + epoch)  # own RNG: sampling never shifts training
        run.write_samples([f"[SAMPLE] {vocab.decode(s)}" for s in
                           sample(model, cfg.show_samples, cfg.temperature, device, generator)], epoch)


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

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

SCRIPT = "dlm100_rnn"


@dataclass
class Config:
    # model
    embed: int = arg(128, "embedding and GRU width E", low=1)
    head: str = arg("mos", "output head: mixture of softmaxes or a plain softmax", choices=("mos", "softmax"))
    components: int = arg(400, "mixture components K of the mos head", low=1)
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
    out_dir: str = arg("out", "runs are written to OUT_DIR/dlm100_rnn/RUN_NAME")
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
             "sample_only", "num_samples", "temperature", "log_every", "max_steps", "eval_batch_size"}


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

    def nll(self, x):
        """x (B, 100) captions -> (B,) -log p(x) in nats, all 100 slots scored."""
        inputs = torch.cat([torch.full_like(x[:, :1], self.bos), x[:, :-1]], dim=1)  # shift right
        y, _ = self.features(inputs)
        return -self.log_probs_of(y, x).sum(dim=1)


# ----------------------------------------------------------------------------- evaluate, sample
@torch.no_grad()
def evaluate(model, x, cfg, device):
    """(N,) -log p(x) of every caption of a split, in file order."""
    model.eval()
    out = [model.nll(batch.to(device)).float().cpu() for batch in data.batches(x, cfg.eval_batch_size)]
    model.train()
    return torch.cat(out)


@torch.no_grad()
def sample(model, n, temperature, device, generator):
    """Ancestral sampling, one slot at a time; once a caption draws PAD the rest is PAD."""
    model.eval()
    x = torch.full((n, 1), model.bos, dtype=torch.long, device=device)
    h, out = None, []
    done = torch.zeros(n, dtype=torch.bool, device=device)
    for _ in range(data.SLOTS):
        y, h = model.features(x, h)
        probs = torch.softmax(model.all_log_probs(y[:, -1]) / temperature, dim=-1)
        x = torch.multinomial(probs.cpu(), 1, generator=generator).to(device)
        x[done] = data.PAD
        done |= x[:, 0] == data.PAD
        out.append(x)
    model.train()
    return torch.cat(out, dim=1)


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
    nll = evaluate(model, splits[split], cfg, device)
    nlpps = nll.mean().item()
    bpc = common.bits_per_char(nlpps, data.num_chars(splits[split]).float().mean().item())
    report(run_dir, f"eval {split} | epoch {epoch:.2f} | step {step} | nlpps {nlpps:.2f} | bpc {bpc:.4f} (exact)")
    common.log_metrics(run_dir, dict(kind=split, step=step, epoch=epoch, nlpps=nlpps, bpc=bpc, bound="exact"))
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
    run_dir.mkdir(parents=True, exist_ok=True)
    device = common.pick_device(cfg.device)
    torch.manual_seed(cfg.seed)

    vocab, splits = data.load(cfg.data_dir or None)
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
    forward = torch.compile(model.nll) if cfg.compile else model.nll
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

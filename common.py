"""The code the four model scripts share.

Part 1, probability: log-densities, entropies and KLs of Gaussians, `logmeanexp` for
importance-weighted bounds, a REINFORCE surrogate with a leave-one-out baseline, bits per char.
Part 2, bookkeeping every run does the same way: flags from a dataclass, device choice,
atomic checkpoints, metrics.jsonl and the loss-curve plot. Everything a model *is* stays in
its own script.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch

LOG_2PI = math.log(2 * math.pi)


# torch seeds are 32-bit (2**32 + s replays seed s); --seed is below 2**31, so the evaluation noise,
# drawn from a generator of its own seeded here, never repeats a training stream for any --seed.
EVAL_SEED = 2**31 + 1234


def eval_generator() -> torch.Generator:
    """The CPU generator every evaluation draws its noise from: the same draws at every evaluation,
    independent of --seed, of the device and of where training is (so a resumed run evaluates alike)."""
    return torch.Generator().manual_seed(EVAL_SEED)


@dataclasses.dataclass
class Evaluation:
    """What every script's `evaluate` returns."""
    nll: torch.Tensor          # (N,) nats per caption: exact -log p(x), or an upper bound on it
    bound: str                 # what `nll` is, e.g. "exact", "-elbo", "-iw64 bound"
    extra: dict = dataclasses.field(default_factory=dict)   # more metrics (floats or lists) for metrics.jsonl
    detail: dict = dataclasses.field(default_factory=dict)  # tensors for the script's plots (not written)


class UserError(Exception):
    """Bad input (missing data, bad checkpoint, non-finite loss): reported in one line, exit 1."""


# ----------------------------------------------------------------------------- probability
def gaussian_log_prob(x, mean, log_std):
    """log N(x; mean, diag(exp(log_std)^2)), summed over the last dim:
    -sum_d [ (x_d - m_d)^2 / (2 s_d^2) + log s_d + log(2 pi) / 2 ]."""
    z = (x - mean) * torch.exp(-log_std)
    return -(0.5 * z.pow(2) + log_std + 0.5 * LOG_2PI).sum(-1)


def mixture_log_prob(x, means, log_stds, log_weights=None):
    """log sum_k w_k N(x; mu_k, diag(s_k^2)) for x (..., D), means (K, D), log_stds (K, D) or (D,),
    log_weights (K,) (uniform when None). Computed with logsumexp over k. When the components share
    one scale s (log_stds (D,)), sum_d (x_d - mu_kd)^2 / s_d^2 = |x/s|^2 - 2 <x/s, mu_k/s> + |mu_k/s|^2
    is a matmul, and no (..., K, D) tensor is built (10x faster for a VAE's per-slot prior)."""
    K = means.shape[0]
    if log_weights is None:
        log_weights = torch.full((K,), -math.log(K), device=x.device)
    if log_stds.dim() == 1:
        xs, ms = x * torch.exp(-log_stds), means * torch.exp(-log_stds)          # (..., D), (K, D)
        square = xs.pow(2).sum(-1, keepdim=True) - 2 * xs @ ms.t() + ms.pow(2).sum(-1)  # (..., K)
        comp = -0.5 * square - (log_stds + 0.5 * LOG_2PI).sum()
    else:
        comp = gaussian_log_prob(x.unsqueeze(-2), means, log_stds)              # (..., K)
    return torch.logsumexp(comp + log_weights, dim=-1)


def gaussian_entropy(log_std):
    """H[N(m, diag(s^2))] = sum_d [ log s_d + (1 + log 2 pi) / 2 ]."""
    return (log_std + 0.5 * (1 + LOG_2PI)).sum(-1)


def gaussian_kl(mean_q, log_std_q, mean_p, log_std_p):
    """KL(N(m_q, s_q^2) || N(m_p, s_p^2)) = sum_d [ log s_p/s_q + (s_q^2 + (m_q-m_p)^2) / (2 s_p^2) - 1/2 ]."""
    var_ratio = torch.exp(2 * (log_std_q - log_std_p))
    mean_term = ((mean_q - mean_p) * torch.exp(-log_std_p)).pow(2)
    return (log_std_p - log_std_q + 0.5 * (var_ratio + mean_term) - 0.5).sum(-1)


def logmeanexp(x, dim=0):
    """log (1/K) sum_k exp(x_k): with x_k = log p(x, z_k) - log q(z_k|x) this is the
    importance-weighted bound, which tightens towards log p(x) as K grows."""
    return torch.logsumexp(x, dim=dim) - math.log(x.shape[dim])


def reinforce_surrogate(log_q, reward, dim=0):
    """A scalar-per-item surrogate whose gradient is the score-function estimate of grad E_q[reward]:
    mean_k (r_k - b_k) * grad log q(z_k), with the leave-one-out baseline b_k = mean_{j != k} r_j
    (unbiased, since b_k does not depend on z_k). Needs K >= 2 samples along `dim`.
    The value is zero-mean noise; only its gradient means something."""
    k = reward.shape[dim]
    if k < 2:
        raise ValueError("the leave-one-out baseline needs at least 2 samples")
    reward = reward.detach()
    baseline = (reward.sum(dim, keepdim=True) - reward) / (k - 1)
    return ((reward - baseline) * log_q).mean(dim)


def bits_per_char(nlpps: float, mean_chars: float) -> float:
    """NLPPS in nats per caption -> bits per predicted symbol (its characters + the closing PAD)."""
    return nlpps / math.log(2) / (mean_chars + 1)


# ============================================================================= the run section
# Bookkeeping that is the same for every model: flags, the run folder, checkpoints, logs and records.
# Each script's training loop calls these; nothing here knows what a model is.

# ----------------------------------------------------------------------------- flags
def arg(default, help, *, choices=None, low=None, high=None, low_open=False, odd=False, run=False):
    """A dataclass field that knows its command-line help and its valid range. run=True marks a flag that
    steers this run only (where to write, how long, what to print): --resume and --eval-only take every
    other setting from the checkpoint."""
    return dataclasses.field(default=default, metadata=dict(help=help, choices=choices, low=low, high=high,
                                                            low_open=low_open, odd=odd, run=run))


@dataclasses.dataclass
class BaseConfig:
    """The flags every script has. A script's Config extends it with its model's flags and may re-declare
    a field to change its default (e.g. batch_size)."""
    # optimisation
    epochs: int = arg(20, "training epochs", low=1, run=True)
    batch_size: int = arg(100, "captions per step", low=1)
    lr: float = arg(2e-3, "peak learning rate", low=0, low_open=True)
    lr_schedule: str = arg("cosine", "cosine decays the lr to 10% of its peak over training", choices=("cosine", "constant"))
    optimizer: str = arg("adamw", "adamw, or rmsprop with eps 0.01 as the original research code", choices=("adamw", "rmsprop"))
    weight_decay: float = arg(0.0, "AdamW weight decay", low=0)
    grad_clip: float = arg(1.0, "clip the gradient norm to this (0: off)", low=0)
    seed: int = arg(0, "seed of the initialisation, the data order and the training noise (evaluation noise has its own)",
                    low=0, high=2**31 - 1)
    # run control
    device: str = arg("auto", "where to run", choices=("auto", "cuda", "mps", "cpu"), run=True)
    dtype: str = arg("float32", "compute dtype (bfloat16 autocasts on CUDA)", choices=("float32", "bfloat16"), run=True)
    compile: bool = arg(False, "torch.compile the model's loss", run=True)
    data_dir: str = arg("", "folder with the Multi30k .gz files (else $DLM_DATA_DIR, else download)", run=True)
    custom_data: bool = arg(False, "use data files that differ from the published Multi30k ones (no checksum check); "
                            "such runs are labelled and compare.py keeps them apart", run=True)
    out_dir: str = arg("out", "runs are written to OUT_DIR/SCRIPT/RUN_NAME", run=True)
    run_name: str = arg("default", "name of the run folder (no path separators)", run=True)
    overwrite: bool = arg(False, "start afresh in a run folder that already holds a run (deletes it)", run=True)
    resume: bool = arg(False, "continue from the run folder's ckpt_last.pt with its model and optimisation settings and its --epochs (unless given anew)", run=True)
    eval_only: bool = arg(False, "evaluate the run folder's ckpt_best.pt on val and test, then stop", run=True)
    sample_only: bool = arg(False, "print samples from the run folder's ckpt_best.pt, then stop", run=True)
    show_samples: int = arg(8, "samples printed and saved at each evaluation", low=0, run=True)
    temperature: float = arg(1.0, "sampling temperature", low=0.01, run=True)
    log_every: int = arg(50, "steps between train log lines (the first step is always logged)", low=1, run=True)
    max_steps: int = arg(0, "stop after this many steps in total (0: no limit)", low=0, run=True)
    limit_train: int = arg(0, "train on the first N captions only (0: all), for quick tests", low=0)
    eval_batch_size: int = arg(500, "captions per evaluation batch", low=1, run=True)


def run_flags(config_cls) -> set[str]:
    """The names of the run-control flags (arg(..., run=True)) of a Config."""
    return {f.name for f in dataclasses.fields(config_cls) if f.metadata.get("run")}


def _checked(kind, m):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        low, high = m["low"], m["high"]
        if low is not None and (value <= low if m["low_open"] else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if m['low_open'] else '>='} {low}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {text}")
        if m["odd"] and value % 2 == 0:
            raise argparse.ArgumentTypeError(f"must be odd, got {text}")
        return value
    return parse


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block: the message names the flag
        self.exit(2, f"{self.prog}: error: {message} (see -h)\n")


def _parser(config_cls, description, suppress_defaults=False):
    parser = _OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    # the script's own (model) flags first, then the ones every script shares
    shared = {f.name for f in dataclasses.fields(BaseConfig)}
    fields = sorted(dataclasses.fields(config_cls), key=lambda f: f.name in shared)
    for f in fields:
        m, flag = f.metadata, "--" + f.name.replace("_", "-")
        default = argparse.SUPPRESS if suppress_defaults else f.default
        help = m["help"].replace("%", "%%")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            parser.add_argument(flag, default=default, choices=m["choices"], help=help + " (default: %(default)s)",
                                type=_checked(kind, m))
    return parser


def parse_config(config_cls, description, argv=None):
    """Build argparse from the dataclass and parse argv. Returns (config, names given explicitly)."""
    args = _parser(config_cls, description).parse_args(argv)
    given = set(vars(_parser(config_cls, description, suppress_defaults=True).parse_args(argv)))
    return config_cls(**vars(args)), given


def data_label(cfg) -> str:
    """'' for the published data as data.py encodes it; else what differs (shown in eval lines, kept apart by compare.py)."""
    return ", ".join(label for on, label in ((cfg.custom_data, "custom data"),
                                             (getattr(cfg, "no_spaces", False), "spaces removed")) if on)


# ----------------------------------------------------------------------------- training helpers
def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for but MPS is not available")
    return torch.device(name)


def make_optimizer(model, cfg):
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(model.parameters(), lr=cfg.lr, eps=0.01)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def set_lr(optimizer, cfg, step, total_steps) -> float:
    """The learning rate of this step (cosine from the peak down to 10% of it, or constant), set and returned."""
    lr = cfg.lr
    if cfg.lr_schedule == "cosine":
        lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step / total_steps, 1.0)))
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def progress(items, total, what, every_s=10.0):
    """Yield from items; once `every_s` seconds have passed, print progress at every further 10%."""
    start, shown = time.time(), 0
    for i, item in enumerate(items):
        yield item
        done = (i + 1) / total
        if time.time() - start > every_s and done >= (shown + 1) / 10 and done < 1:
            shown = int(done * 10)
            print(f"  {what}: {done:.0%} after {time.time() - start:.0f} s", flush=True)


def save_checkpoint(state: dict, path: Path) -> None:
    """Write to a temp file, then rename: a crash mid-write never leaves a half-written checkpoint,
    and a failed write (disk full) leaves no temp file behind."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not write {path} ({str(e).splitlines()[0][:150]}); the previous checkpoint is kept") from None


def load_checkpoint(path: Path, script: str) -> dict:
    """Load with weights_only=True (tensors and plain containers only) and check it belongs to `script`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty (0 bytes): not a checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # truncated, random bytes or a pickle with code in it: never a traceback, never unsafe advice
        raise UserError(f"{path} is not a readable checkpoint (truncated, corrupt or not made by this project)") from None
    if not isinstance(state, dict) or state.get("script") != script:
        owner = state.get("script") if isinstance(state, dict) else None
        raise UserError(f"{path} is not a {script} checkpoint (it is from {owner or 'something else'})")
    return state


def log_metrics(run_dir: Path, record: dict) -> None:
    with open(Path(run_dir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_curves(run_dir: Path, title: str, side=None) -> None:
    """curves.png: train and val NLPPS against epoch, from metrics.jsonl. `side` = (title, [(kind, key), ...])
    adds a panel of other per-record metrics beside it (e.g. a segmenter's cut rate and boundary F1)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    fig, axes = plt.subplots(1, 2 if side else 1, figsize=(11 if side else 6, 4), squeeze=False)
    panels = [(axes[0, 0], [("train", "nlpps"), ("val", "nlpps")])] + ([(axes[0, 1], side[1])] if side else [])
    for ax, series in panels:
        for kind, key in series:
            pts = [(r["epoch"], r[key]) for r in records if r["kind"] == kind and r.get(key) is not None]
            if pts:  # markers: a run with one record still shows it
                ax.plot(*zip(*pts), ".-" if kind == "train" else "o-", markersize=3,
                        label=kind if key == "nlpps" else f"{kind} {key}")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    axes[0, 0].set(xlabel="epoch", ylabel="NLPPS (nats per caption)", title=title, yscale="log")
    if side:
        axes[0, 1].set(xlabel="epoch", title=side[0])
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- the run folder
class Interrupted(UserError):
    """Ctrl-C or SIGTERM: the loop stops after the current step and saves a checkpoint first."""


RUN_FILES = ("args.json", "log.txt", "metrics.jsonl", "ckpt_last.pt", "ckpt_best.pt", "samples.txt", "test_nlpps.txt")


class Run:
    """OUT_DIR/SCRIPT/RUN_NAME while a process uses it: held by a lock file with the pid, so that two
    processes never write one folder; a new run never mixes with an old one (--resume or --overwrite)."""

    def __init__(self, script: str, cfg, folder: Path):
        self.script, self.cfg, self.dir = script, cfg, folder
        self.ckpt = None  # the checkpoint open_run read, if any
        self.lock = folder / ".lock"
        self.interrupted = False
        self.clock = None

    # --- records
    def report(self, text: str) -> None:
        print(text, flush=True)
        with open(self.dir / "log.txt", "a") as f:
            f.write(text + "\n")

    def log_metrics(self, record: dict) -> None:
        log_metrics(self.dir, record)

    def start(self, model, train, device, steps_per_epoch, total_steps, step) -> None:
        """args.json and the first log line of a training run (fresh or resumed)."""
        (self.dir / "args.json").write_text(json.dumps(dataclasses.asdict(self.cfg), indent=2) + "\n")
        n_params = sum(p.numel() for p in model.parameters())
        how = f"resumed at step {step}" if step else "new run"
        self.report(f"{self.script} | {how} | {self.cfg.epochs} epochs | {n_params:,} parameters | "
                    f"{len(train):,} training captions | {device} | {steps_per_epoch} steps/epoch | run folder {self.dir}")
        self.clock = dict(t0=time.time(), start_step=step, total=total_steps, epoch_t0=time.time(),
                          seen=0, loss_sum=0.0, n=0, window_t0=time.time())

    def log_step(self, step, steps_per_epoch, batch_size, loss, lr) -> None:
        """Averages the loss between log lines; logs the first step of a session and every log_every-th."""
        c = self.clock
        if (step - 1) % steps_per_epoch == 0:
            c["epoch_t0"] = time.time()
        c["seen"], c["loss_sum"], c["n"] = c["seen"] + batch_size, c["loss_sum"] + loss, c["n"] + 1
        if step % self.cfg.log_every and step != c["start_step"] + 1:
            return
        now = time.time()
        rate = c["seen"] / max(now - c["window_t0"], 1e-9)
        per_step = (now - c["t0"]) / (step - c["start_step"])
        last = min(c["total"], self.cfg.max_steps or c["total"])
        self.report(f"step {step} | epoch {step / steps_per_epoch:.2f} | train nlpps {c['loss_sum'] / c['n']:.2f} | "
                    f"{rate:.0f} seq/s | lr {lr:.2e} | epoch time {now - c['epoch_t0']:.0f} s | "
                    f"ETA {_duration(per_step * (last - step))} (training steps)")
        self.log_metrics(dict(kind="train", step=step, epoch=step / steps_per_epoch, nlpps=c["loss_sum"] / c["n"],
                              seq_per_s=rate))
        c.update(seen=0, loss_sum=0.0, n=0, window_t0=now)

    def report_eval(self, split, ev: Evaluation, x, step, epoch, seconds) -> None:
        """The eval line, its metrics record, and for test the per-caption file compare.py reads."""
        nlpps = ev.nll.mean().item()
        import data  # here, not at the top: data.py imports UserError from this file
        bpc = bits_per_char(nlpps, data.num_chars(x).float().mean().item())
        label = ", ".join(filter(None, [ev.bound, data_label(self.cfg)]))
        scalars = "".join(f" | {k} {v:.4g}" for k, v in ev.extra.items() if isinstance(v, (int, float)))
        self.report(f"eval {split} | epoch {epoch:.2f} | step {step} | nlpps {nlpps:.2f} | bpc {bpc:.4f} ({label})"
                    f"{scalars} | {seconds:.1f} s")
        self.log_metrics(dict(kind=split, step=step, epoch=epoch, nlpps=nlpps, bpc=bpc, bound=ev.bound,
                              data=data_label(self.cfg) or "multi30k", seconds=seconds, **ev.extra))
        if split == "test":  # per caption, file order: compare.py lines models up caption by caption
            (self.dir / "test_nlpps.txt").write_text("".join(f"{v:.4f}\n" for v in ev.nll.tolist()))

    def write_samples(self, lines, epoch) -> None:
        with open(self.dir / "samples.txt", "a") as f:
            f.write(f"# epoch {epoch}, temperature {self.cfg.temperature}\n" + "".join(t + "\n" for t in lines))
        for t in lines:
            self.report(t)

    def plot_curves(self, side=None) -> None:
        plot_curves(self.dir, f"{self.script} ({self.cfg.run_name})", side)

    # --- checkpoints
    def restore(self, model, optimizer, generator, vocab) -> tuple[int, float]:
        """Load the checkpoint opened with the run (if any) into model, optimizer and the data-order
        generator; returns (step, best val NLPPS). A fresh run clears the folder if --overwrite."""
        ckpt = self.ckpt
        if ckpt is None:
            if self.cfg.overwrite:
                for name in RUN_FILES + tuple(p.name for p in self.dir.glob("*.png")):
                    (self.dir / name).unlink(missing_ok=True)
            return 0, math.inf
        if ckpt.get("vocab") != vocab.itos:
            raise UserError("the checkpoint's vocabulary differs from this data's: wrong --data-dir?")
        try:
            model.load_state_dict(ckpt["model"])
            if self.cfg.resume:
                optimizer.load_state_dict(ckpt["optimizer"])
                generator.set_state(ckpt["epoch_rng"])
                torch.set_rng_state(ckpt["torch_rng"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise UserError(f"the checkpoint in {self.dir} does not fit this model "
                            f"({str(e).splitlines()[0][:120]})") from None
        if self.cfg.resume:  # records past the checkpoint are replayed now: drop them, so no step shows twice
            records = [r for r in read_metrics(self.dir) if r["step"] <= ckpt["step"]]
            (self.dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return ckpt["step"], ckpt["best_val"]

    def save(self, model, optimizer, vocab, step, epoch_rng, best_val, is_best) -> None:
        state = dict(script=self.script, model=model.state_dict(), optimizer=optimizer.state_dict(), step=step,
                     n_params=sum(p.numel() for p in model.parameters()),
                     args=dataclasses.asdict(self.cfg), vocab=vocab.itos, epoch_rng=epoch_rng,
                     torch_rng=torch.get_rng_state(), best_val=best_val)
        save_checkpoint(state, self.dir / "ckpt_last.pt")
        if is_best:
            save_checkpoint(state, self.dir / "ckpt_best.pt")

    def load_best(self, model) -> int:
        """Load ckpt_best.pt into the model (for the test evaluation); returns its step."""
        best = load_checkpoint(self.dir / "ckpt_best.pt", self.script)
        model.load_state_dict(best["model"])
        return best["step"]

    def nan_stop(self, step):
        last = self.dir / "ckpt_last.pt"
        return UserError(f"non-finite loss at step {step}: stopped; the last good checkpoint "
                         f"{last if last.exists() else '(none yet)'} is kept")

    def interrupt_stop(self, step):
        return Interrupted(f"interrupted at step {step}: saved {self.dir / 'ckpt_last.pt'}; "
                           f"add --resume to continue from it")

    # --- the lock
    def acquire(self) -> None:
        """Hold the folder: a lock file with our pid. A lock whose process is gone is taken over."""
        for _ in range(2):
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.lock.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and _alive(pid):
                    raise UserError(f"run folder {self.dir} is in use by process {pid}; wait for it, or pick "
                                    "another --run-name") from None
                self.lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            _HELD.append(self)
            return
        raise UserError(f"could not lock run folder {self.dir}")

    def release(self) -> None:
        try:
            if self.lock.read_text().strip() == str(os.getpid()):
                self.lock.unlink()
        except OSError:
            pass

    def catch_interrupts(self) -> None:
        """Ctrl-C / SIGTERM set a flag the loop checks after each step (a second Ctrl-C stops at once)."""
        def handler(signum, frame):
            if self.interrupted:
                raise KeyboardInterrupt
            self.interrupted = True
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)


_HELD: list[Run] = []  # run folders this process holds: released when main() returns, however it ends


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


MODE_FLAGS = ("resume", "eval_only", "sample_only", "overwrite")


def open_run(config_cls, script: str, description: str, argv=None):
    """Parse the flags, lock the run folder, read its checkpoint. Writes nothing but the lock (removed on exit),
    so a refused command leaves the folder exactly as it was. Returns (config, Run).
    With a checkpoint (--resume, --eval-only, --sample-only) the model and optimisation settings come from it
    (typing a different one is refused); the run-control flags (arg(run=True): --epochs, --device, ...) are
    this command line's, except that --resume without --epochs keeps the checkpoint's."""
    cfg, given = parse_config(config_cls, description, argv)
    if not cfg.run_name or cfg.run_name in (".", "..") or any(sep in cfg.run_name for sep in ("/", "\\", os.sep)):
        raise UserError(f"--run-name {cfg.run_name!r} must be a plain folder name (no path separators)")
    modes = [flag for flag in MODE_FLAGS if getattr(cfg, flag)]
    if len(modes) > 1:
        raise UserError("use only one of " + ", ".join("--" + m.replace("_", "-") for m in modes))
    folder = Path(cfg.out_dir) / script / cfg.run_name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the run folder {folder}: {e.strerror or e}") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"cannot write to the run folder {folder}")
    run = Run(script, cfg, folder)
    run.acquire()  # first: a second process on this folder is told so, whatever else it asked for
    if cfg.resume or cfg.eval_only or cfg.sample_only:
        run.ckpt = load_checkpoint(folder / ("ckpt_last.pt" if cfg.resume else "ckpt_best.pt"), script)
        saved, run_only = run.ckpt.get("args", {}), run_flags(config_cls)  # run flags may differ
        clash = [k for k in sorted(given - run_only) if k in saved and saved[k] != getattr(cfg, k)]
        if clash:
            k = clash[0]
            raise UserError(f"--{k.replace('_', '-')} {getattr(cfg, k)} contradicts the checkpoint's {saved[k]}: "
                            "a checkpoint keeps its settings; drop the flag, or train a new --run-name")
        if cfg.resume and "epochs" not in given:
            # --epochs is a run flag (--resume --epochs 40 extends a run), but it also shapes the lr schedule:
            # a plain --resume must not quietly turn a 40-epoch run into a 20-epoch one
            run_only -= {"epochs"}
        names = {f.name for f in dataclasses.fields(config_cls)}
        cfg = dataclasses.replace(cfg, **{k: v for k, v in saved.items() if k in names and k not in run_only})
        run.cfg = cfg
    elif any((folder / name).exists() for name in RUN_FILES) and not cfg.overwrite:
        raise UserError(f"{folder} already holds a run: add --resume to continue it, pick a new --run-name, "
                        "or --overwrite to start it afresh")
    run.catch_interrupts()
    return cfg, run


def main(script: str, run, argv=None):
    """Every script's entry point: bad input of any kind ends in one line on stderr, never a traceback."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        run(argv)
    except Interrupted as e:
        sys.exit(f"{script}: {e}")  # exit status 1 with the message; the checkpoint is on disk
    except KeyboardInterrupt:
        sys.exit(f"{script}: interrupted; add --resume to continue from the last checkpoint")
    except UserError as e:
        sys.exit(f"{script}: error: {e}")
    except OSError as e:  # disk full, read-only folder, ... : say which file
        sys.exit(f"{script}: error: {e.strerror or e}" + (f": {e.filename}" if getattr(e, "filename", None) else ""))
    finally:
        while _HELD:
            _HELD.pop().release()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)

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
    extra: dict = dataclasses.field(default_factory=dict)  # more metrics (floats or lists) for metrics.jsonl


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


# ----------------------------------------------------------------------------- flags
def arg(default, help, *, choices=None, low=None, high=None, low_open=False):
    """A dataclass field that knows its command-line help and its valid range."""
    return dataclasses.field(default=default, metadata=dict(help=help, choices=choices, low=low,
                                                            high=high, low_open=low_open))


def _checked(kind, low, high, low_open):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {text}")
        return value
    return parse


def _parser(config_cls, description, suppress_defaults=False):
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(config_cls):
        m, flag = f.metadata, "--" + f.name.replace("_", "-")
        default = argparse.SUPPRESS if suppress_defaults else f.default
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=m["help"])
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            parser.add_argument(flag, default=default, choices=m["choices"], help=m["help"] + " (default: %(default)s)",
                                type=_checked(kind, m["low"], m["high"], m["low_open"]))
    return parser


def parse_config(config_cls, description, argv=None):
    """Build argparse from the dataclass and parse argv. Returns (config, names given explicitly);
    the second lets --resume keep a checkpoint's settings except those typed on this command line."""
    args = _parser(config_cls, description).parse_args(argv)
    given = set(vars(_parser(config_cls, description, suppress_defaults=True).parse_args(argv)))
    return config_cls(**vars(args)), given


# ----------------------------------------------------------------------------- runs
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


def save_checkpoint(state: dict, path: Path) -> None:
    """Write to a temp file, then rename: a crash mid-write never leaves a half-written checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, script: str) -> dict:
    """Load with weights_only=True (tensors and plain containers only) and check it belongs to `script`."""
    if not Path(path).is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: report, never a traceback
        raise UserError(f"cannot read checkpoint {path}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(state, dict) or state.get("script") != script:
        owner = state.get("script") if isinstance(state, dict) else None
        raise UserError(f"{path} is not a {script} checkpoint (it is from {owner or 'something else'})")
    return state


def log_metrics(run_dir: Path, record: dict) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
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
            if pts:
                ax.plot(*zip(*pts), "-" if kind == "train" else "o-", markersize=3,
                        label=kind if key == "nlpps" else f"{kind} {key}")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    axes[0, 0].set(xlabel="epoch", ylabel="NLPPS (nats per caption)", title=title, yscale="log")
    if side:
        axes[0, 1].set(xlabel="epoch", title=side[0])
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=100)
    plt.close(fig)

"""The math the four model scripts share, and what makes their numbers comparable.

Log-densities and entropies of Gaussians, `logmeanexp` for importance-weighted bounds, a REINFORCE
surrogate with a leave-one-out baseline, NLPPS and bits per character from per-caption nats, the
evaluation noise of each caption; and the helpers that build the command line from a script's Config.
Everything else a script does (its model, its training loop, its run folder) is written in the script.
"""
from __future__ import annotations

import argparse
import dataclasses
import math

import torch

LOG_2PI = math.log(2 * math.pi)


# ----------------------------------------------------------------------------- log-densities
def gaussian_log_prob(x, mean, log_std):
    """log N(x; mean, diag(exp(log_std)^2)), summed over the last dim:
    -sum_d [ (x_d - m_d)^2 / (2 s_d^2) + log s_d + log(2 pi) / 2 ]."""
    z = (x - mean) * torch.exp(-log_std)
    return -(0.5 * z.pow(2) + log_std + 0.5 * LOG_2PI).sum(-1)


def mixture_log_prob(x, means, log_std):
    """log (1/C) sum_k N(x; m_k, diag(s^2)) for x (..., D), means (C, D) of C equally weighted components that
    share one scale s = exp(log_std) (D,), by logsumexp over k. sum_d (x_d - m_kd)^2 / s_d^2 =
    |x/s|^2 - 2 <x/s, m_k/s> + |m_k/s|^2 is a matmul, so no (..., C, D) tensor is built (10x faster for a
    VAE's per-slot prior)."""
    xs, ms = x * torch.exp(-log_std), means * torch.exp(-log_std)               # (..., D), (C, D)
    square = xs.pow(2).sum(-1, keepdim=True) - 2 * xs @ ms.t() + ms.pow(2).sum(-1)  # (..., C)
    per_component = -0.5 * square - (log_std + 0.5 * LOG_2PI).sum()
    return torch.logsumexp(per_component, dim=-1) - math.log(means.shape[0])


def gaussian_entropy(log_std):
    """H[N(m, diag(s^2))] = sum_d [ log s_d + (1 + log 2 pi) / 2 ]."""
    return (log_std + 0.5 * (1 + LOG_2PI)).sum(-1)


# ----------------------------------------------------------------------------- bounds and gradients
def logmeanexp(x, dim=0):
    """log (1/n) sum_i exp(x_i) over n samples: with x_i = log p(x, z_i) - log q(z_i|x) this is the
    importance-weighted bound, which tightens towards log p(x) as n grows."""
    return torch.logsumexp(x, dim=dim) - math.log(x.shape[dim])


def reinforce_surrogate(log_q, reward, dim=0):
    """A per-item surrogate whose gradient is the score-function estimate of grad E_q[reward] from n samples
    along `dim`: mean_i (r_i - b_i) grad log q(z_i), with the leave-one-out baseline b_i = mean_{j != i} r_j
    (unbiased, since b_i does not depend on z_i). Needs n >= 2. The value is zero-mean noise; only its
    gradient means something."""
    n_samples = reward.shape[dim]
    if n_samples < 2:
        raise ValueError("the leave-one-out baseline needs at least 2 samples")
    reward = reward.detach()
    baseline = (reward.sum(dim, keepdim=True) - reward) / (n_samples - 1)
    return ((reward - baseline) * log_q).mean(dim)


# ----------------------------------------------------------------------------- the metric
# torch seeds are 32-bit (2**32 + s replays seed s); --seed is below 2**31, so the evaluation noise,
# drawn from generators seeded at or above EVAL_SEED, never repeats a training stream for any --seed.
EVAL_SEED = 2**31 + 1234


def eval_generator() -> torch.Generator:
    """A CPU generator for an evaluation's noise that belongs to no caption (a diagnostic's draws)."""
    return torch.Generator().manual_seed(EVAL_SEED)


def caption_noise(first, count, draw):
    """The evaluation noise of captions first .. first + count - 1 of a split, stacked (count, ...):
    caption i's `draw(generator)` from its own CPU generator seeded EVAL_SEED + 1 + i, so a caption's number
    never depends on the batch it is scored in (--eval-batch-size), on --seed, on the device, or on where
    training is."""
    return torch.stack([draw(torch.Generator().manual_seed(EVAL_SEED + 1 + i))
                        for i in range(first, first + count)])


def nlpps_and_bpc(nll: torch.Tensor, n_chars: torch.Tensor) -> tuple[float, float]:
    """Per-caption nats (N,) and characters (N,) -> NLPPS (mean nats per caption) and bits per predicted
    symbol (a caption's characters and its closing PAD)."""
    nlpps = nll.mean().item()
    return nlpps, nlpps / math.log(2) / (n_chars.float().mean().item() + 1)


# ----------------------------------------------------------------------------- flags from a dataclass
# The last section of every Config: a checkpoint keeps every flag above it, and none of these.
RUN_CONTROL = "run control (how this command runs, not what the run is: a checkpoint keeps none of these)"


def flag(default, help, *, choices=None, low=None, high=None, above=None, part=None, resume_may_change=False):
    """A Config field with its -h text and its valid values (low <= v <= high, v > above, v in choices).
    `part` opens a section of -h: this flag and the ones after it, up to the next part; from the part
    RUN_CONTROL on, a checkpoint keeps no flag. resume_may_change: a kept flag that --resume may give anew."""
    return dataclasses.field(default=default, metadata=dict(help=help, choices=choices, low=low, high=high,
                                                            above=above, part=part,
                                                            resume_may_change=resume_may_change))


def run_flags(config_cls) -> set[str]:
    """The flags of the RUN_CONTROL section: how a command runs, which a checkpoint does not keep."""
    fields = dataclasses.fields(config_cls)
    first = next(i for i, f in enumerate(fields) if f.metadata["part"] == RUN_CONTROL)
    return {f.name for f in fields[first:]}


def _kind(f):  # a field's type, from its annotation (a string under `from __future__ import annotations`)
    return {"int": int, "float": float, "str": str, "bool": bool}.get(f.type, f.type)


def _checked(kind, m):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        for bad, rule in ((m["low"] is not None and value < m["low"], f">= {m['low']}"),
                          (m["high"] is not None and value > m["high"], f"<= {m['high']}"),
                          (m["above"] is not None and value <= m["above"], f"> {m['above']}")):
            if bad:
                raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    return parse


def invalid_settings(config_cls, settings) -> list[str]:
    """The flags (as --name) a checkpoint keeps that `settings` (its args) lacks or holds with a value the
    flag would refuse: another type, out of range, not one of its choices."""
    def valid(f, value):
        kind, m = _kind(f), f.metadata
        if type(value) is not kind and not (kind is float and type(value) is int):
            return False
        try:
            _checked(kind, m)(value)
        except argparse.ArgumentTypeError:
            return False
        return m["choices"] is None or value in m["choices"]

    kept = [f for f in dataclasses.fields(config_cls) if f.name not in run_flags(config_cls)]
    return ["--" + f.name.replace("_", "-") for f in kept
            if not (f.name in settings and valid(f, settings[f.name]))]


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block: the message names the flag
        self.exit(2, f"{self.prog}: error: {message} (see -h)\n")


def parse_flags(config_cls, description, argv=None):
    """argparse built from the dataclass (a --flag per field, --x/--no-x for booleans, in sections by `part`);
    parses argv once. Returns (config, the names of the flags given on the command line)."""
    parser = _OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                            argument_default=argparse.SUPPRESS)  # absent flags stay absent: `given` is exact
    section = parser
    for f in dataclasses.fields(config_cls):
        m, name = f.metadata, "--" + f.name.replace("_", "-")
        section = parser.add_argument_group(m["part"]) if m["part"] else section
        help = m["help"].replace("%", "%%") + f" (default: {f.default})"
        if _kind(f) is bool:
            section.add_argument(name, action=argparse.BooleanOptionalAction, help=help)
        else:
            section.add_argument(name, choices=m["choices"], type=_checked(_kind(f), m), help=help)
    given = vars(parser.parse_args(argv))
    return config_cls(**given), set(given)

"""Compare finished runs caption by caption: which captions each model is good at.

    python compare.py out/dlm100_rnn/default out/dlm142_diffusion/default [...] [--baseline RUN]

Reads each run folder's args.json, metrics.jsonl, test_nlpps.txt (per-caption test NLPPS in file
order) and the vocabulary in ckpt_best.pt; refuses runs whose test files do not line up. Prints
one table, the captions with the largest differences both ways and the win rates of each pair (or
of each run against --baseline), NLPPS by caption length; writes comparison.md and comparison.png
(per-caption scatter, length buckets, all learning curves and, for runs that log them, the test bound
by diffusion step) into --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch

import data

LENGTH_BUCKETS = [(0, 30), (30, 45), (45, 60), (60, 80), (80, 100)]


class UserError(Exception):
    """Runs that cannot be compared, or bad arguments: one line for the user."""


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's records; a torn line (a run killed while writing it) is left out."""
    records = []
    for line in (path / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


@dataclasses.dataclass
class Run:
    path: Path
    name: str
    script: str
    args: dict
    metrics: list
    nlpps: torch.Tensor  # (N,) per test caption
    vocab: list
    params: int

    @property
    def test(self) -> dict:
        return [r for r in self.metrics if r["kind"] == "test"][-1]


def load_run(path: Path) -> Run:
    path = Path(path)
    for name in ("args.json", "metrics.jsonl", "test_nlpps.txt", "ckpt_best.pt"):
        if not (path / name).is_file():
            raise UserError(f"{path} has no {name}: is it a finished run folder?")
    script = path.parent.name
    try:
        ckpt = torch.load(path / "ckpt_best.pt", map_location="cpu", weights_only=True)
    except Exception:
        raise UserError(f"{path / 'ckpt_best.pt'} is not a readable checkpoint") from None
    if not isinstance(ckpt, dict) or ckpt.get("script") != script:
        raise UserError(f"{path / 'ckpt_best.pt'} is not a {script} checkpoint")
    metrics = read_metrics(path)
    if not any(r["kind"] == "test" for r in metrics):
        raise UserError(f"{path}/metrics.jsonl has no test record")
    nlpps = torch.tensor([float(v) for v in (path / "test_nlpps.txt").read_text().split()])
    params = ckpt.get("n_params") or sum(v.numel() for v in ckpt["model"].values())  # buffers are not parameters
    return Run(path, f"{script}/{path.name}", script, json.loads((path / "args.json").read_text()), metrics,
               nlpps, ckpt["vocab"], params)


def data_of(run: Run) -> str:
    """'multi30k' for the published files as data.py encodes them; else what differs (custom files, no spaces)."""
    labels = {r.get("data", "multi30k") for r in run.metrics if r["kind"] == "test"}
    if run.args.get("custom_data"):
        labels.add("custom data")
    if run.args.get("spaces") is False:  # dlm107 --no-spaces
        labels.add("spaces removed")
    return ", ".join(sorted(labels - {"multi30k"})) or "multi30k"


def check_comparable(runs: list[Run]) -> None:
    first = runs[0]
    for run in runs[1:]:
        if data_of(run) != data_of(first):
            raise UserError(f"{run.name} was scored on {data_of(run)}, {first.name} on {data_of(first)}: "
                            "different strings, not comparable")
        if run.vocab != first.vocab:
            raise UserError(f"{run.name} and {first.name} used different vocabularies (different data): not comparable")
        checksums = run.args.get("data_sha256"), first.args.get("data_sha256")
        if None not in checksums and checksums[0] != checksums[1]:
            raise UserError(f"{run.name} and {first.name} were made from different data files (SHA-256): not comparable")
        if len(run.nlpps) != len(first.nlpps):
            raise UserError(f"{run.name} has {len(run.nlpps)} test values, {first.name} {len(first.nlpps)}: "
                            "the files do not line up")


# A script's RUN_FLAGS say how a run ran, not what it is; these few change its number.
RUN_FLAGS_SHOWN = {"epochs", "dtype", "iw_samples"}


def key_hyperparameters(run: Run) -> str:
    """The settings that differ from the script's defaults, e.g. 'depth=11 lr=0.0001'."""
    try:
        script = importlib.import_module(run.script)
        defaults, skip = dataclasses.asdict(script.Config()), script.RUN_FLAGS - RUN_FLAGS_SHOWN
    except (ImportError, AttributeError):
        defaults, skip = {}, set()
    diff = [f"{k}={v}" for k, v in run.args.items() if k not in skip | {"data_sha256"} and defaults.get(k, v) != v]
    return " ".join(diff) or "defaults"


def table(runs: list[Run]) -> list[str]:
    lines = ["| run | key hyper-parameters | parameters | epochs | test NLPPS | bpc | exact or bound | train seq/s |",
             "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        t = run.test
        rates = [r["seq_per_s"] for r in run.metrics if r["kind"] == "train" and "seq_per_s" in r]
        rate = f"{statistics.median(rates):.0f}" if rates else "?"
        lines.append(f"| {run.name} | {key_hyperparameters(run)} | {run.params:,} | {t['epoch']:.3g} | "
                     f"{t['nlpps']:.2f} | {t['bpc']:.4f} | {t['bound']} | {rate} |")
    return lines


def pair_report(a: Run, b: Run, captions: list[str], top: int) -> list[str]:
    diff = a.nlpps - b.nlpps  # > 0: b is better on that caption
    lines = [f"### {a.name} vs {b.name}", "",
             f"{a.name} wins on {(diff < 0).float().mean():.1%} of the captions, {b.name} on "
             f"{(diff > 0).float().mean():.1%} (mean difference {diff.mean():+.2f} nats).", ""]
    for better, worse, wins in ((a, b, -diff), (b, a, diff)):
        order = torch.argsort(wins, descending=True)
        if not (wins > 0).any():  # a model that wins nowhere has no best captions to list
            continue
        lines += [f"Captions where {better.name} is best (nats: {better.name} / {worse.name}):", ""]
        for i in order[: min(top, int((wins > 0).sum()))].tolist():
            lines.append(f"- {better.nlpps[i]:.1f} / {worse.nlpps[i]:.1f}  `{captions[i]}`")
        lines.append("")
    return lines


def length_report(runs: list[Run], lengths: torch.Tensor) -> list[str]:
    lines = ["| characters | captions | " + " | ".join(r.name for r in runs) + " |",
             "|---|---|" + "---|" * len(runs)]
    for lo, hi in LENGTH_BUCKETS:
        sel = (lengths >= lo) & (lengths < hi)
        if sel.any():
            cells = [f"{r.nlpps[sel].mean():.1f}" for r in runs]
            lines.append(f"| {lo}–{hi - 1} | {int(sel.sum())} | " + " | ".join(cells) + " |")
    return lines


def plot(runs: list[Run], pairs, lengths: torch.Tensor, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [(run, run.test["per_step"]) for run in runs if run.test.get("per_step")]
    fig, axes = plt.subplots(1, 3 + bool(steps), figsize=(16 + 5 * bool(steps), 4.5))
    ax_s, ax_l, ax_c = axes[:3]
    a, b = pairs[0]
    ax_s.scatter(a.nlpps.numpy(), b.nlpps.numpy(), s=4, alpha=0.5)
    hi = float(max(a.nlpps.max(), b.nlpps.max()))
    ax_s.plot([0, hi], [0, hi], "k--", lw=0.8)
    ax_s.set(xlabel=f"{a.name} NLPPS", ylabel=f"{b.name} NLPPS", title="per test caption")
    centres = [f"{lo}–{hi_ - 1}" for lo, hi_ in LENGTH_BUCKETS]
    for run in runs:
        means = [run.nlpps[(lengths >= lo) & (lengths < hi_)].mean().item() for lo, hi_ in LENGTH_BUCKETS]
        ax_l.plot(centres, means, "o-", label=run.name)
        val = [(r["epoch"], r["nlpps"]) for r in run.metrics if r["kind"] == "val"]
        if val:
            ax_c.plot(*zip(*val), "o-", markersize=3, label=run.name)
    for run, per_step in steps:  # diffusion runs: where along the noise schedule each one loses its nats
        T = len(per_step)
        axes[3].plot([(t + 1) / T for t in range(T)], per_step, ".-", markersize=2,
                     label=f"{run.name} ({sum(per_step):.1f})")
    if steps:
        axes[3].set(xlabel="fraction of slots noised, t / T", ylabel="nats per caption in step t",
                    title="test bound by noise level")
        axes[3].grid(alpha=0.3)
        axes[3].legend(fontsize=7)
    ax_l.set(xlabel="caption length (characters)", ylabel="mean test NLPPS", title="by length")
    ax_c.set(xlabel="epoch", ylabel="val NLPPS", title="learning curves", yscale="log")
    for ax in (ax_l, ax_c):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=100)
    plt.close(fig)


def compare(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders, e.g. out/dlm100_rnn/default")
    parser.add_argument("--baseline", default="", help="compare every run against this one instead of all pairs")
    parser.add_argument("--out", default="out/compare", help="folder for comparison.md and comparison.png")
    parser.add_argument("--data-dir", default="", help="folder with the Multi30k files (else $DLM_DATA_DIR / cache)")
    parser.add_argument("--top", type=int, default=5, help="captions listed each way per pair")
    args = parser.parse_args(argv)
    paths = list(dict.fromkeys([args.baseline] * bool(args.baseline) + args.runs))
    if len(paths) < 2:
        raise UserError("give at least two run folders")
    runs = [load_run(p) for p in paths]
    check_comparable(runs)
    captions = data.read_captions(data.find_file(data.FILES["test"], args.data_dir or None))
    if len(captions) != len(runs[0].nlpps):
        raise UserError(f"the test file has {len(captions)} captions but the runs have {len(runs[0].nlpps)} values")
    lengths = torch.tensor([min(len(c), data.SLOTS - 1) for c in captions])
    pairs = [(runs[0], r) for r in runs[1:]] if args.baseline else list(itertools.combinations(runs, 2))
    lines = ["## Test NLPPS (nats per caption; lower is better)", ""] + table(runs) + [""]
    for a, b in pairs:
        lines += pair_report(a, b, captions, args.top)
    lines += ["## Mean test NLPPS by caption length", ""] + length_report(runs, lengths)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write to --out {out}: {e.strerror or e}") from None
    text = "\n".join(lines) + "\n"
    (out / "comparison.md").write_text(text)
    plot(runs, pairs, lengths, out)
    print(text + f"\nwrote {out / 'comparison.md'} and {out / 'comparison.png'}")
    return text


def main(argv=None):
    try:
        compare(argv)
    except (UserError, data.DataError) as e:
        sys.exit(f"compare: error: {e}")


if __name__ == "__main__":
    main()

"""Compare finished runs caption by caption: which captions each model is good at.

    python compare.py out/dlm100_rnn/default out/dlm142_diffusion/default [...] [--baseline RUN]

Reads each run folder's args.json, metrics.jsonl, test_nlpps.txt (per-caption test NLPPS in file
order) and the vocabulary in ckpt_best.pt; refuses runs whose test files do not line up. The test
captions come from the layout the runs were made on (data.py): Multi30k's test_2016_flickr.en.gz, or a
plain-text folder's test.txt with its blank lines skipped, as the runs scored it (--data-dir names it). Prints
one table, the captions with the largest differences both ways and the win rates of each pair (or
of each run against --baseline), NLPPS by caption length and what each run cost; writes comparison.md,
comparison.png (per-caption scatter, length buckets, all learning curves and, for runs that log them, the
test bound by diffusion step) and budget.png (test NLPPS against parameters and against training
CPU-minutes, one line per script) into --out.

What a run cost comes from its newest test record's n_params and train_cpu_seconds (the CPU time of its
training steps, summed across resumes: with OMP_NUM_THREADS=1 the one-thread minutes, however busy the
machine was; its wall-clock train_seconds would not be). Runs made before those were recorded: the parameter
count in the first line of log.txt (else the checkpoint's), and no training time, so they stay out of the
time panel.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading


def interrupted():
    """Ctrl-C: one line and the shell's status for it (128 + SIGINT), never a traceback."""
    print("compare: interrupted", file=sys.stderr)
    sys.exit(130)


@contextlib.contextmanager
def ctrl_c_held_back():
    """A Ctrl-C pressed in the block is raised when the block ends: pressed while a C++ extension loads
    (torch, matplotlib) it could abort the interpreter instead ('terminate called ... KeyboardInterrupt')."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
    if pressed:
        raise KeyboardInterrupt


try:  # importing torch takes a second or two: a Ctrl-C then is answered like one later on
    import argparse
    import dataclasses
    import importlib
    import itertools
    import json
    import math
    import os
    import re
    import statistics
    from pathlib import Path

    with ctrl_c_held_back():
        import torch

        import data
except KeyboardInterrupt:
    if __name__ != "__main__":  # imported, e.g. by the tests: the importer decides
        raise
    interrupted()

LENGTH_BUCKETS = [(0, 30), (30, 45), (45, 60), (60, 80), (80, 100)]


class UserError(Exception):
    """Runs that cannot be compared, or bad arguments: one line for the user."""


RECORD_FIELDS = dict(kind=str, step=int, epoch=(int, float), nlpps=(int, float))  # of every record
EVAL_FIELDS = RECORD_FIELDS | dict(bpc=(int, float), bound=str)  # of every val and test record


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's records; a torn line (a run killed while writing it), or anything else that is not a
    whole record, is left out."""
    records = []
    for line in (path / "metrics.jsonl").read_text("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict):
            continue
        fields = EVAL_FIELDS if record.get("kind") in ("val", "test") else RECORD_FIELDS
        if all(isinstance(record.get(k), expected) for k, expected in fields.items()):
            records.append(record)
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


def read_nlpps(path: Path) -> torch.Tensor:
    """test_nlpps.txt: one float per line (blank lines skipped); anything else is an error naming the line."""
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a text file") from None
    values = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                values.append(float(line))
            except ValueError:
                raise UserError(f"{path} line {number} is not a number: {line.strip()[:40]!r}") from None
            if not 0 <= values[-1] < math.inf:  # nats of a caption: never negative, NaN or infinite
                raise UserError(f"{path} line {number} is not a caption's nats (finite, >= 0): {values[-1]}")
    if not values:
        raise UserError(f"{path} holds no values")
    return torch.tensor(values)


def load_run(path: Path) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a folder: give run folders, e.g. out/dlm100_rnn/default")
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
    try:
        args = json.loads((path / "args.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path / 'args.json'} is not valid JSON") from None
    nlpps = read_nlpps(path / "test_nlpps.txt")
    # buffers are not parameters
    params = ckpt.get("n_params") or sum(v.numel() for v in ckpt["model"].values())
    run = Run(path, f"{script}/{path.name}", script, args, metrics, nlpps, ckpt["vocab"], params)
    recorded, mean = run.test["nlpps"], nlpps.mean().item()
    if not math.isclose(mean, recorded, rel_tol=1e-5, abs_tol=1e-3):  # (test_nlpps.txt: 4 decimals)
        raise UserError(f"{path}: the test record's NLPPS {recorded:.4f} is not the mean of test_nlpps.txt, "
                        f"{mean:.4f}: two evaluations; --eval-only redoes both")
    return run


PLAIN_TEXT_NAMES = {name + gz for name in data.PLAIN_TEXT.values() for gz in ("", ".gz")}


def layout_of(run: Run) -> str:
    """data.py's layout the run was made on: "plain text" when the files it recorded (data_sha256) are a
    plain-text folder's, else "multi30k" (runs made before plain text was read are all Multi30k)."""
    return "plain text" if set(run.args.get("data_sha256") or {}) & PLAIN_TEXT_NAMES else "multi30k"


def data_of(run: Run) -> str:
    """'multi30k' for the published files as data.py encodes them; else what differs (custom files, plain
    text, no spaces)."""
    labels = {r.get("data", "multi30k") for r in run.metrics if r["kind"] == "test"}
    if run.args.get("custom_data"):
        labels.add("custom data")
    if layout_of(run) == "plain text":  # custom data too, but never the same strings as Multi30k's
        labels |= {"custom data", "plain text"}
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
            raise UserError(f"{run.name} and {first.name} used different vocabularies (different data): "
                            "not comparable")
        checksums = run.args.get("data_sha256"), first.args.get("data_sha256")
        if None not in checksums and checksums[0] != checksums[1]:
            raise UserError(f"{run.name} and {first.name} were made from different data files (SHA-256): "
                            "not comparable")
        if len(run.nlpps) != len(first.nlpps):
            raise UserError(f"{run.name} has {len(run.nlpps)} test values, {first.name} {len(first.nlpps)}: "
                            "the files do not line up")


def read_test_captions(runs: list[Run], data_dir: str | None) -> list[str]:
    """The test lines the runs scored, in file order, read as data.load() reads them: Multi30k's test file
    (found as data.find_file finds it), or the plain-text folder's test file (data.find_splits) without its
    blank lines. A plain-text folder must be named (--data-dir or $DLM_DATA_DIR: the cache holds only
    Multi30k), and a test file whose SHA-256 differs from the one the runs recorded is refused."""
    run = runs[0]  # check_comparable: the same data for all
    if layout_of(run) == "multi30k":
        path = data.find_file(data.FILES["test"], data_dir)
    else:
        if not (data_dir or os.environ.get(data.ENV_VAR)):
            recorded = (f" (they recorded --data-dir {run.args['data_dir']})"
                        if run.args.get("data_dir") else "")
            raise UserError(f"{run.name} was made on a plain-text folder{recorded}: "
                            "pass --data-dir with that folder")
        layout, paths = data.find_splits(data_dir)
        if layout != "plain text":
            raise UserError(f"{run.name} was made on a plain-text folder, but {paths['test'].parent} "
                            "is read as Multi30k: pass --data-dir with the runs' plain-text folder")
        path = paths["test"]
    recorded = (run.args.get("data_sha256") or {}).get(path.name)
    if recorded is not None and data._sha256(path) != recorded:
        raise UserError(f"{path} is not the test file {run.name} scored (SHA-256 differs): "
                        "not comparable")
    return data.read_split(path, layout_of(run))


# A script's RUN_FLAGS say how a run ran, not what it is; these few change its number.
RUN_FLAGS_SHOWN = {"epochs", "dtype", "iw_samples"}


def key_hyperparameters(run: Run) -> str:
    """The settings that differ from the script's defaults, e.g. 'depth=11 lr=0.0001'."""
    try:
        script = importlib.import_module(run.script)
        defaults, skip = dataclasses.asdict(script.Config()), script.RUN_FLAGS - RUN_FLAGS_SHOWN
    except (ImportError, AttributeError):
        defaults, skip = {}, set()
    diff = [f"{k}={v}" for k, v in run.args.items()
            if k not in skip | {"data_sha256"} and defaults.get(k, v) != v]
    return " ".join(diff) or "defaults"


def table(runs: list[Run]) -> list[str]:
    lines = ["| run | key hyper-parameters | parameters | epochs | test NLPPS | bpc | exact or bound "
             "| train seq/s |",
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


# ----------------------------------------------------------------------------- what each run cost
@dataclasses.dataclass
class Cost:
    """A run's test NLPPS beside what it cost: parameters and training time."""
    run: Run
    params: int
    minutes: float | None  # training CPU-minutes; None: made before runs recorded train_cpu_seconds

    @property
    def nlpps(self) -> float:
        return self.run.test["nlpps"]


# log.txt's first line: `dlm100_rnn | new run | 20 epochs | 212,896 parameters | ...`
LOG_PARAMS = re.compile(r"\| ([\d,]+) parameters \|")


def newest_test_field(run: Run, field: str):
    """The field of the newest test record that has it (an older script's --eval-only record may lack it)."""
    for record in reversed(run.metrics):
        if record["kind"] == "test" and record.get(field) is not None:
            return record[field]
    return None


def params_from_log(path: Path) -> int | None:
    """The parameter count in the first line of log.txt, for runs made before n_params was recorded."""
    try:
        with open(path / "log.txt", encoding="utf-8") as f:
            match = LOG_PARAMS.search(f.readline())
    except (OSError, UnicodeDecodeError):
        return None
    return int(match.group(1).replace(",", "")) if match else None


def costs_of(runs: list[Run]) -> list[Cost]:
    """What each run cost, by script and then by parameter count (the order of the table and the lines)."""
    result = []
    for run in runs:
        params = newest_test_field(run, "n_params") or params_from_log(run.path) or run.params
        seconds = newest_test_field(run, "train_cpu_seconds")
        result.append(Cost(run, int(params), None if seconds is None else float(seconds) / 60))
    return sorted(result, key=lambda s: (s.run.script, s.params, s.run.name))


def budget_table(costs: list[Cost]) -> list[str]:
    lines = ["| run | script | parameters | CPU-minutes | test NLPPS |", "|---|---|---|---|---|"]
    for s in costs:
        minutes = "–" if s.minutes is None else f"{s.minutes:.1f}"
        lines.append(f"| {s.run.path.name} | {s.run.script} | {s.params:,} | {minutes} | {s.nlpps:.2f} |")
    untimed = [s.run.name for s in costs if s.minutes is None]
    if untimed:
        lines += ["", "Left out of the time panel (no train_cpu_seconds in a test record): "
                  + ", ".join(untimed)]
    return lines


# One colour and marker per script, the same whatever runs are given; other scripts take the rest in turn.
SCRIPT_STYLES = {"dlm100_rnn": ("tab:blue", "o"), "dlm107_vae_seg": ("tab:orange", "s"),
                 "dlm123_gmmvae": ("tab:green", "^"), "dlm142_diffusion": ("tab:red", "D")}
OTHER_STYLES = [("tab:purple", "v"), ("tab:brown", "P"), ("tab:pink", "X"), ("tab:olive", "*")]


def plot_budget(costs: list[Cost], out: Path) -> None:
    """budget.png: test NLPPS against parameters (log x) and against training CPU-minutes; a line a script."""
    plt = pyplot()
    fig, (ax_p, ax_t) = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    others = itertools.cycle(OTHER_STYLES)
    for script in sorted({s.run.script for s in costs}):
        colour, marker = SCRIPT_STYLES.get(script) or next(others)
        mine = [s for s in costs if s.run.script == script]
        timed = [s for s in mine if s.minutes is not None]
        for ax, points in ((ax_p, [(s.params, s.nlpps, s.run.path.name) for s in mine]),
                           (ax_t, [(s.minutes, s.nlpps, s.run.path.name) for s in timed])):
            if not points:
                continue
            points.sort()  # joined in order of x
            xs, ys, names = zip(*points)
            ax.plot(xs, ys, "-", marker=marker, color=colour, lw=1, markersize=5, label=script)
            for x, y, name in points:
                ax.annotate(name, (x, y), xytext=(3, 3), textcoords="offset points", fontsize=6, alpha=0.6)
    ax_p.set(xscale="log", xlabel="parameters", ylabel="test NLPPS (nats per caption)",
             title="test NLPPS against model size")
    ax_t.set(xlabel="training CPU-minutes (one thread, training steps only)",
             title="test NLPPS against training time")
    if all(s.minutes is None for s in costs):
        ax_t.text(0.5, 0.5, "no run records train_cpu_seconds yet", ha="center", va="center",
                  transform=ax_t.transAxes)
    for ax in (ax_p, ax_t):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "budget.png", dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- the report
def pyplot():
    """matplotlib.pyplot drawing into files (no window), loaded on first use with a Ctrl-C held back."""
    with ctrl_c_held_back():
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot
    return matplotlib.pyplot


def plot(runs: list[Run], pairs, lengths: torch.Tensor, out: Path) -> None:
    plt = pyplot()
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
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders, e.g. out/dlm100_rnn/default")
    parser.add_argument("--baseline", default="",
                        help="compare every run against this one instead of all pairs")
    parser.add_argument("--out", default="out/compare",
                        help="folder for comparison.md, comparison.png and budget.png")
    parser.add_argument("--data-dir", default="",
                        help="the runs' data folder: Multi30k files or plain text (else $DLM_DATA_DIR; "
                             "Multi30k: else the cache)")
    parser.add_argument("--top", type=int, default=5, help="captions listed each way per pair")
    args = parser.parse_args(argv)
    given = [args.baseline] * bool(args.baseline) + args.runs
    paths = list(dict.fromkeys(os.path.normpath(p) for p in given))  # (RUN and RUN/ are one folder)
    if len(paths) < 2:
        raise UserError("give at least two different run folders")
    runs = [load_run(p) for p in paths]
    check_comparable(runs)
    captions = read_test_captions(runs, args.data_dir or None)
    if len(captions) != len(runs[0].nlpps):
        raise UserError(f"the test file has {len(captions)} captions "
                        f"but the runs have {len(runs[0].nlpps)} values")
    lengths = torch.tensor([min(len(c), data.SLOTS - 1) for c in captions])
    pairs = [(runs[0], r) for r in runs[1:]] if args.baseline else list(itertools.combinations(runs, 2))
    costs = costs_of(runs)
    lines = ["## Test NLPPS (nats per caption; lower is better)", ""] + table(runs) + [""]
    lines += ["## What each run cost", ""] + budget_table(costs) + [""]
    for a, b in pairs:
        lines += pair_report(a, b, captions, args.top)
    lines += ["## Mean test NLPPS by caption length", ""] + length_report(runs, lengths)
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    try:  # a file in the way, a read-only folder, a full disk: one line naming --out
        out.mkdir(parents=True, exist_ok=True)
        (out / "comparison.md").write_text(text)
        plot(runs, pairs, lengths, out)
        plot_budget(costs, out)
    except OSError as e:
        raise UserError(f"cannot write to --out {out}: {e.strerror or e}") from None
    print(text + f"\nwrote {out / 'comparison.md'}, {out / 'comparison.png'} and {out / 'budget.png'}")
    return text


def main(argv=None):
    try:
        compare(argv)
    except (UserError, data.DataError) as e:
        sys.exit(f"compare: error: {e}")
    except KeyboardInterrupt:
        interrupted()


if __name__ == "__main__":
    main()

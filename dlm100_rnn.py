"""DLM100: an autoregressive character GRU. The exact-likelihood baseline of the family.

A caption x = (x_1 .. x_100) (characters, then PAD; see data.py) is scored exactly:

    log p(x) = sum_t log p(x_t | x_<t),      h_t = GRU(h_{t-1}, e[x_{t-1}]),  x_0 = BOS
    y_t = h_t / std(h_t)                      (divide by the std over features, as the original)
--dropout p drops features of e[x_{t-1}] and of y_t in training (the usual regulariser of a char LM).

Head "mos" (default), a mixture of C softmaxes over the tied embedding e (C = --components):
    p(x_t = c | x_<t) = sum_k pi_k(y_t) q_k(c),   pi(y) = softmax(W y + b),
    q_k(c) = softmax_c( exp(s_k) <v_k / std(v_k), e_c> )    (C fixed distributions, context picks the mix)
Head "softmax": p(x_t = c | x_<t) = softmax_c( exp(s) <y_t, e_c> + b_c ).

NLPPS = -log p(x) in nats, averaged over the test captions; exact for this model.
Results row:  python dlm100_rnn.py                 (and --head softmax --run-name softmax)
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

SCRIPT = "dlm100_rnn"


class RunError(Exception):
    """Bad input, or a stop the user must hear about: main() prints it in one line, never a traceback."""


@dataclasses.dataclass
class Config:
    embed: int = flag(128, "embedding and GRU width E", low=1, part="the model")
    head: str = flag("mos", "a mixture of softmaxes, or a plain softmax", choices=("mos", "softmax"))
    components: int = flag(400, "mixture components C of the mos head", low=1)
    dropout: float = flag(0.0, "dropout on the GRU's input embeddings and on its normalised output before "
                          "the head (training only; 0: off)", low=0, high=0.9)
    epochs: int = flag(20, "training epochs (a plain --resume keeps the run's, or takes a new value)", low=1,
                       resume_may_change=True, part="optimisation and data (a checkpoint keeps these too)")
    batch_size: int = flag(100, "captions per step", low=1)
    lr: float = flag(2e-3, "peak learning rate", above=0)
    lr_schedule: str = flag("cosine", "cosine decays the lr to 10% of its peak over training",
                            choices=("cosine", "constant"))
    optimizer: str = flag("adamw", "adamw, or rmsprop with eps 0.01 as the original research code",
                          choices=("adamw", "rmsprop"))
    weight_decay: float = flag(0.0, "AdamW weight decay", low=0)
    grad_clip: float = flag(1.0, "clip the gradient norm to this (0: off)", low=0)
    seed: int = flag(0, "seed of the initialisation, the data order and the training noise (evaluation noise "
                     "has its own)", low=0, high=2**31 - 1)
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
    eval_batch_size: int = flag(500, "captions per evaluation batch", low=1)


# ----------------------------------------------------------------------------- model
def std_norm(x, eps=1e-5):
    return x / (x.std(dim=-1, keepdim=True) + eps)


class Model(nn.Module):
    def __init__(self, vocab_size: int, cfg: Config):
        super().__init__()
        E, C = cfg.embed, cfg.components
        self.head = cfg.head
        self.embed = nn.Embedding(vocab_size, E)  # N(0, 1); also the output matrix (tied)
        self.rnn = nn.GRU(E, E, batch_first=True)
        # nn.Identity when p = 0: draws no noise, so the model and its training are as without the flag
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        # <unit-std vector, N(0,1) row> has std sqrt(E): start the temperatures at 1/sqrt(E)
        # so the first predictions are soft, not one-hot.
        if self.head == "mos":
            self.mix = nn.Linear(E, C)
            self.k_vectors = nn.Parameter(torch.empty(C, E).uniform_(-1, 1) / math.sqrt(C))
            self.k_log_temp = nn.Parameter(torch.full((C, 1), -0.5 * math.log(E)))
        else:
            self.log_temp = nn.Parameter(torch.tensor(-0.5 * math.log(E)))
            self.bias = nn.Parameter(torch.zeros(vocab_size))

    def features(self, x, h=None):
        """x (B, T) ids of the *inputs* -> y (B, T, E) normalised GRU states, and the last state."""
        out, h = self.rnn(self.dropout(self.embed(x)), h)
        return self.dropout(std_norm(out)), h

    def component_log_probs(self):
        """(C, V) log q_k(c): C fixed distributions over the vocabulary."""
        logits = torch.exp(self.k_log_temp) * (std_norm(self.k_vectors) @ self.embed.weight.t())
        return F.log_softmax(logits, dim=-1)

    def log_probs_of(self, y, targets):
        """y (B, T, E), targets (B, T) -> (B, T) log p(target | context). The mos head gathers the C
        component probabilities of the target only: a (B, T, C, V) tensor would be ~1 GB a batch."""
        if self.head == "softmax":
            return self.all_log_probs(y).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        log_pi = F.log_softmax(self.mix(y), dim=-1)                       # (B, T, C)
        log_q_target = self.component_log_probs().t()[targets]              # (B, T, C)
        return torch.logsumexp(log_pi + log_q_target, dim=-1)

    def all_log_probs(self, y):
        """y (..., E) -> (..., V) log p over the whole vocabulary (used by the sampler)."""
        if self.head == "softmax":
            return F.log_softmax(torch.exp(self.log_temp) * (y @ self.embed.weight.t()) + self.bias, dim=-1)
        log_pi = F.log_softmax(self.mix(y), dim=-1).unsqueeze(-1)          # (..., C, 1)
        return torch.logsumexp(log_pi + self.component_log_probs(), dim=-2)  # (..., V)

    def loss(self, x):
        """x (B, 100) captions -> (B,) -log p(x) in nats, all 100 slots scored: the exact NLPPS."""
        inputs = torch.cat([torch.full_like(x[:, :1], data.BOS), x[:, :-1]], dim=1)  # shift right
        y, _ = self.features(inputs)
        return -self.log_probs_of(y, x).sum(dim=1)


def build_model(vocab, train, cfg):
    """The family's constructor (a model may read its training captions, as DLM107's lexicon does)."""
    return Model(len(vocab), cfg)


# ----------------------------------------------------------------------------- evaluate, sample
@torch.no_grad()
def evaluate(model, x, cfg, device, full=True):
    """-log p(x) of every caption of x (N, L), in file order, and extra metrics (the family's contract; `full`
    is False for the per-epoch val check, where a latent model may estimate more cheaply). Exact here."""
    model.eval()
    nll = torch.cat([model.loss(batch.to(device)).float().cpu()
                     for batch in data.batches(x, cfg.eval_batch_size)])
    model.train()
    return nll, {"bound": "exact"}


@torch.no_grad()
def sample(model, n, cfg, device, generator):
    """Ancestral sampling, one slot at a time, from p(x_t | x_<t, x_t != BOS) at --temperature; once a caption
    draws PAD the rest is PAD. Returns the captions (n, L) and extras (none here)."""
    model.eval()
    x = torch.full((n, 1), data.BOS, dtype=torch.long, device=device)
    h, out = None, []
    done = torch.zeros(n, dtype=torch.bool, device=device)
    for _ in range(data.SLOTS):
        y, h = model.features(x, h)
        probs = torch.softmax(data.emittable(model.all_log_probs(y[:, -1])) / cfg.temperature, dim=-1)
        x = torch.multinomial(probs.cpu(), 1, generator=generator).to(device)
        x[done] = data.PAD
        done |= x[:, 0] == data.PAD
        out.append(x)
    model.train()
    return torch.cat(out, dim=1), {}


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

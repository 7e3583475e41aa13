"""Character sequences as 100-slot id rows (Multi30k English captions, or your own text): the one data loader.

The data folder is (1) `--data-dir`, else (2) the folder in $DLM_DATA_DIR, else (3) a cache folder
`.data/multi30k/` next to this file, which holds Multi30k, downloaded on first use. A local folder holds
one of two layouts:
  Multi30k:   train.en.gz, val.en.gz, test_2016_flickr.en.gz (gzipped UTF-8, one caption a line, kept as they
              are), each checked against its published SHA-256 so that numbers stay comparable; --custom-data
              (custom=True) accepts other files under these names on purpose.
  plain text: train.txt, valid.txt, test.txt (each may be gzipped as .txt.gz instead; the .txt wins if both),
              UTF-8, one sequence a line, blank lines skipped. Your own data: never checksum-checked.
A folder holding all three Multi30k files is read as Multi30k, even if it holds plain text too; the plain-text
layout is read only when a Multi30k file is missing. A folder with neither full layout is an error.

Encoding, the same for every model so their numbers are comparable:
  vocabulary = PAD, BOS, UNK, then the sorted characters of the *training* split only;
  a sequence becomes exactly SLOTS=100 ids: its first <= 99 characters, then PAD up to 100,
  so every sequence ends with at least one PAD (the end is part of what a model predicts).
"""
from __future__ import annotations

import gzip
import hashlib
import math
import os
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import torch

SLOTS = 100
PAD, BOS, UNK = 0, 1, 2
SPECIALS = ["<pad>", "<bos>", "<unk>"]
URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/"
FILES = {"train": "train.en.gz", "val": "val.en.gz", "test": "test_2016_flickr.en.gz"}
PLAIN_TEXT = {"train": "train.txt", "val": "valid.txt", "test": "test.txt"}  # each may be NAME.gz instead
SHA256 = {
    "train.en.gz": "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f",
    "val.en.gz": "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28",
    "test_2016_flickr.en.gz": "611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9",
}
CACHE_DIR = Path(__file__).resolve().parent / ".data" / "multi30k"
ENV_VAR = "DLM_DATA_DIR"


class DataError(Exception):
    """Data that cannot be had or used (missing, not the published files, unreadable): one line
    for the user."""


def emittable(log_probs: torch.Tensor) -> torch.Tensor:
    """log_probs (..., V) with BOS ruled out and renormalised: BOS is an input symbol only, and a sampler
    must never write a symbol a caption cannot hold (the models give it a little mass before training)."""
    return torch.log_softmax(
        log_probs.index_fill(-1, torch.tensor([BOS], device=log_probs.device), -math.inf), -1)


class Vocab:
    """Characters <-> ids. Built from the training captions only: building it from all
    splits would tell the model which characters the test set holds."""

    def __init__(self, chars: list[str]):
        self.itos = SPECIALS + sorted(set(chars) - set(SPECIALS))
        self.stoi = {c: i for i, c in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        ids = [self.stoi.get(c, UNK) for c in text[: SLOTS - 1]]
        return ids + [PAD] * (SLOTS - len(ids))

    def decode(self, ids) -> str:
        out = []
        for i in ids.tolist() if torch.is_tensor(ids) else ids:
            if i == PAD:
                break
            out.append(self.itos[i] if i >= len(SPECIALS) else SPECIALS[i])
        return "".join(out)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _download(name: str, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path, tmp = folder / name, folder / (name + ".part")
    try:
        urllib.request.urlretrieve(URL + name, tmp)
    except (urllib.error.URLError, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{name} is not in {folder} and downloading {URL + name} failed ({e}); "
                        f"pass --data-dir or set {ENV_VAR} to a folder holding {name}") from None
    if _sha256(tmp) != SHA256[name]:
        tmp.unlink()
        raise DataError(f"downloaded {name} does not match its SHA-256 checksum; deleted it, not used")
    tmp.replace(path)
    return path


def find_file(name: str, data_dir: str | None = None) -> Path:
    """A local folder (flag, then environment variable) is used as is; only the cache downloads."""
    local = data_dir or os.environ.get(ENV_VAR)
    if local:
        path = Path(local) / name
        if not path.is_file():
            raise DataError(f"{name} not found in {local} (from {'--data-dir' if data_dir else ENV_VAR}); "
                            f"it can be downloaded from {URL + name}")
        return path
    path = CACHE_DIR / name
    return path if path.is_file() else _download(name, CACHE_DIR)


def find_splits(data_dir: str | None = None) -> tuple[str, dict[str, Path]]:
    """("multi30k" or "plain text", {split: path}) by the rule of the module docstring."""
    local = data_dir or os.environ.get(ENV_VAR)
    if not local:
        return "multi30k", {split: find_file(name) for split, name in FILES.items()}
    folder = Path(local)
    multi30k = {split: folder / name for split, name in FILES.items()}
    if all(path.is_file() for path in multi30k.values()):
        return "multi30k", multi30k
    plain_text = {split: next((p for p in (folder / name, folder / (name + ".gz")) if p.is_file()), None)
                  for split, name in PLAIN_TEXT.items()}
    if all(plain_text.values()):
        return "plain text", plain_text
    missing = next(path.name for path in multi30k.values() if not path.is_file())
    source = "--data-dir" if data_dir else ENV_VAR
    raise DataError(f"{missing} not found in {local} (from {source}); a data folder holds either Multi30k "
                    f"({', '.join(FILES.values())}; downloadable from {URL}) or plain text "
                    f"({', '.join(PLAIN_TEXT.values())}, each may be .txt.gz; one sequence a line)")


def read_captions(path: Path) -> list[str]:
    """The lines of a UTF-8 file, gzipped if its name ends in .gz; an unreadable file is a one-line error."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f]
    except (EOFError, gzip.BadGzipFile, UnicodeDecodeError, zlib.error, OSError) as e:
        why = {EOFError: "truncated", gzip.BadGzipFile: "not a gzip file",
               UnicodeDecodeError: "not UTF-8 text"}
        raise DataError(f"cannot read {path}: "
                        f"{why.get(type(e), str(e).splitlines()[0][:100] or 'corrupt')}") from None


def read_split(path: Path, layout: str) -> list[str]:
    """A split's sequences: every line of a Multi30k file, the non-blank lines of a plain-text one."""
    lines = read_captions(path)
    return [line for line in lines if line.strip()] if layout == "plain text" else lines


def removed_spaces(lines: list[str]) -> torch.Tensor:
    """(N, SLOTS) bool: True at slot t when a space followed character t of the caption without its spaces."""
    gold = torch.zeros(len(lines), SLOTS, dtype=torch.bool)
    for row, line in enumerate(lines):
        t = -1
        for c in line:
            if c != " ":
                t += 1
            elif 0 <= t < SLOTS:
                gold[row, t] = True
    return gold


def summary(source: str, lines: dict[str, list[str]], vocab: Vocab) -> str:
    """One line: the data's source, lines per split, lines cut to fit, val/test characters read as <unk>."""
    sizes = " / ".join(f"{split} {len(split_lines):,}" for split, split_lines in lines.items())
    cut = sum(len(line) > SLOTS - 1 for split_lines in lines.values() for line in split_lines)
    unseen = sorted({c for split in ("val", "test") for line in lines[split] for c in line} - set(vocab.stoi))
    named = ", ".join(map(repr, unseen[:10])) + (", ..." if len(unseen) > 10 else "")
    return (f"data: {source} | {sizes} lines | {cut:,} lines cut at {SLOTS - 1} characters | "
            f"{len(unseen)} val/test characters unseen in train (<unk>)" + (f": {named}" if unseen else ""))


def load(data_dir: str | None = None, custom: bool = False,
         no_spaces: bool = False) -> tuple[Vocab, dict[str, torch.Tensor], dict[str, str], dict]:
    """Returns the vocabulary, {split: LongTensor (N, SLOTS)} for train / val / test, {file: SHA-256} of the
    files read (a run records them, so that --resume and compare.py can tell when the data changed), and
    info = {"layout": "multi30k" or "plain text", "custom": bool, "summary": one line for the log}.
    Multi30k files must match the published SHA-256 (local folders and the cache alike), so that numbers stay
    comparable; custom=True accepts other files on purpose. Plain text is custom by construction (never
    checked) and its blank lines are skipped. no_spaces removes the spaces of every sequence (the segmentation
    papers' protocol; a different string, so a different vocabulary and NLPPS) and adds
    {split + "_spaces": removed_spaces(...)}, where they were, to score a segmentation against."""
    layout, paths = find_splits(data_dir)
    custom = custom or layout == "plain text"
    lines, sha256 = {}, {}
    for split, path in paths.items():
        sha256[path.name] = _sha256(path)
        if not custom and sha256[path.name] != SHA256[path.name]:
            raise DataError(f"{path} is not the published {path.name} (SHA-256 mismatch), so its numbers "
                            "would not be comparable; pass --custom-data to use other files on purpose")
        lines[split] = read_split(path, layout)
        if not any(line.strip() for line in lines[split]):
            raise DataError(f"{path} holds no {'captions' if layout == 'multi30k' else 'sequences'}")
    spaces = {}
    if no_spaces:
        spaces = {split + "_spaces": removed_spaces(lines[split]) for split in lines}
        lines = {split: [line.replace(" ", "") for line in lines[split]] for split in lines}
    vocab = Vocab([c for line in lines["train"] for c in line])
    tensors = {split: torch.tensor([vocab.encode(line) for line in split_lines], dtype=torch.long)
               for split, split_lines in lines.items()}
    label = "plain text" if layout == "plain text" else "Multi30k (custom data)" if custom else "Multi30k"
    source = f"{label} in {paths['train'].parent}" + (", spaces removed" if no_spaces else "")
    info = {"layout": layout, "custom": custom, "summary": summary(source, lines, vocab)}
    return vocab, tensors | spaces, sha256, info


def num_chars(x: torch.Tensor) -> torch.Tensor:
    """(N, SLOTS) -> (N,) characters before the first PAD."""
    return (x != PAD).long().cumprod(dim=1).sum(dim=1)


def batches(x: torch.Tensor, batch_size: int, generator: torch.Generator | None = None, skip: int = 0):
    """Yields (B, SLOTS) batches: shuffled by `generator` (a new order on every call), else in file
    order. `skip` drops the first batches of that order (resuming in the middle of an epoch)."""
    order = torch.randperm(len(x), generator=generator) if generator is not None else torch.arange(len(x))
    for start in range(skip * batch_size, len(x), batch_size):
        yield x[order[start:start + batch_size]]

"""Datasets in upstream's folder format (SPEC §3): reading, validation split, errors.

A folder holds ``id2name4Rec.json`` (item id -> title), ``train.csv`` and ``test.csv`` with the
columns ``user_id,item_ids,timestamp``; ``item_ids`` is a list whose last id is the target and the
rest the history, oldest first. The validation split is ``valid.csv`` when it exists, else the last
10% of the training rows by timestamp. Every problem raises ``DataError`` naming the file and row.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from bear.prompts import domain_from_folder

__all__ = ["DataError", "Example", "Dataset", "load_dataset", "TITLES_FILE", "VALID_FRACTION"]

TITLES_FILE = "id2name4Rec.json"
COLUMNS = ("user_id", "item_ids", "timestamp")
# SPEC §3: the validation split is the last 10% of the training rows by timestamp.
VALID_FRACTION = 0.1


class DataError(ValueError):
    """A dataset folder that cannot be read; the message names the file and, if known, the row."""


@dataclass(frozen=True)
class Example:
    """One recommendation case: the user's history (oldest first) and the next item."""

    user_id: str
    history: tuple[int, ...]  # item ids, oldest first, truncated to the newest max_history
    target: int  # the item id to recommend
    timestamp: int
    source: str  # "file:line" of the CSV row, for messages


@dataclass
class Dataset:
    """A loaded dataset folder: the catalogue and the three splits."""

    folder: Path
    domain: str  # instruction domain (bear.prompts)
    titles: dict[int, str]  # item id -> title
    train: list[Example] = field(default_factory=list)
    valid: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)

    @property
    def item_ids(self) -> list[int]:
        """All catalogue item ids, ascending."""
        return sorted(self.titles)


def _load_titles(path: Path) -> dict[int, str]:
    if not path.is_file():
        raise DataError(f"{path}: missing file (the item id -> title map)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{path}: expected a non-empty JSON object mapping item id to title")
    titles = {}
    for key, title in raw.items():
        try:
            item = int(key)
        except ValueError:
            raise DataError(f"{path}: item id {key!r} is not an integer") from None
        if not isinstance(title, str) or not title.strip():
            raise DataError(f"{path}: item {key}: empty or non-string title {title!r}")
        titles[item] = title.strip()
    return titles


def _parse_ids(text: str, where: str) -> list[int]:
    body = text.strip()
    if not (body.startswith("[") and body.endswith("]")):
        raise DataError(f"{where}: item_ids {text!r} is not a list like [1, 2, 3]")
    try:
        ids = [int(x) for x in body[1:-1].split(",") if x.strip()]
    except ValueError:
        raise DataError(f"{where}: item_ids {text!r} holds a non-integer id") from None
    if len(ids) < 2:
        raise DataError(f"{where}: item_ids {text!r} needs at least one history id and a target")
    return ids


def _load_rows(path: Path, titles: dict[int, str], max_history: int) -> list[Example]:
    if not path.is_file():
        raise DataError(f"{path}: missing file")
    examples = []
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != COLUMNS:
            raise DataError(f"{path}:1: header {header!r}, expected {','.join(COLUMNS)}")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not row:
                continue
            if len(row) != len(COLUMNS):
                raise DataError(f"{where}: {len(row)} fields, expected {len(COLUMNS)} {COLUMNS}")
            user, ids_text, ts_text = row
            ids = _parse_ids(ids_text, where)
            try:
                timestamp = int(float(ts_text))
            except ValueError:
                raise DataError(f"{where}: timestamp {ts_text!r} is not a number") from None
            for item in ids:
                if item not in titles:
                    raise DataError(f"{where}: item id {item} has no title in {TITLES_FILE}")
            history = tuple(ids[:-1][-max_history:])
            examples.append(Example(user.strip(), history, ids[-1], timestamp, where))
    if not examples:
        raise DataError(f"{path}: no data rows")
    return examples


def split_valid(train: list[Example], fraction: float = VALID_FRACTION):
    """(train, valid): the last ``fraction`` of rows by timestamp (stable on ties) is validation."""
    order = sorted(range(len(train)), key=lambda i: (train[i].timestamp, i))
    n_valid = max(1, math.ceil(fraction * len(train))) if len(train) > 1 else 0
    cut = len(train) - n_valid
    keep, valid = sorted(order[:cut]), sorted(order[cut:])
    return [train[i] for i in keep], [train[i] for i in valid]


def load_dataset(
    folder: str | Path,
    train_file: str = "train.csv",
    test_file: str = "test.csv",
    valid_file: str = "valid.csv",
    max_history: int = 10,
    domain: str | None = None,
) -> Dataset:
    """Read a dataset folder in upstream's format; ``DataError`` names the file and row at fault.

    ``max_history``: keep the newest ids of each history (upstream: 10).
    ``domain``: the instruction domain; default inferred from the folder name (bear.prompts).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: dataset folder does not exist")
    if max_history < 1:
        raise ValueError(f"max_history: got {max_history}, expected >= 1")
    titles = _load_titles(folder / TITLES_FILE)
    train = _load_rows(folder / train_file, titles, max_history)
    test = _load_rows(folder / test_file, titles, max_history)
    if (folder / valid_file).is_file():
        valid = _load_rows(folder / valid_file, titles, max_history)
    else:
        train, valid = split_valid(train)
    return Dataset(folder, domain or domain_from_folder(folder), titles, train, valid, test)

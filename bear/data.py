"""Datasets in upstream's folder format (SPEC §3): reading, validation split, errors.

A folder holds ``id2name4Rec.json`` (item id -> title), ``train.csv`` and ``test.csv`` with the
columns ``user_id,item_ids,timestamp``; ``item_ids`` is a list whose last id is the target and the
rest the history, oldest first; extra columns (some published test files have six) are ignored.
Titles are kept verbatim: the published catalogues hold an empty title and titles of several
hundred characters (``UPSTREAM.md`` §2). The validation split is ``valid.csv`` when it exists,
else the last 10% of the training rows by timestamp (none under upstream's protocol). Every problem
raises ``DataError`` naming the file and row.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bear.prompts import PromptText, domain_from_folder, prompt_text

__all__ = [
    "DataError",
    "Example",
    "Dataset",
    "load_dataset",
    "load_titles",
    "filter_catalogue",
    "trained_subset",
    "TITLES_FILE",
    "VALID_FRACTION",
]

TITLES_FILE = "id2name4Rec.json"
COLUMNS = ("user_id", "item_ids", "timestamp")
# SPEC §3: the validation split is the last 10% of the training rows by timestamp.
VALID_FRACTION = 0.1
# Item ids are decimal digits (an optional minus is read so that its error can say "negative")
# and must fit torch's int64.
_ID = re.compile(r"\s*-?[0-9]+\s*")
MAX_ITEM_ID = 2**63 - 1


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
    prompt: PromptText  # the domain's prompt strings, or the user's own
    train: list[Example] = field(default_factory=list)
    valid: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)

    @property
    def item_ids(self) -> list[int]:
        """All catalogue item ids, ascending."""
        return sorted(self.titles)


def _decode(path: Path) -> str:
    """The UTF-8 text of ``path``; a byte that is not UTF-8 is a DataError naming its line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 ({exc.reason} at byte {exc.start})") from None


def _item_id(text: str, where: str, what: str) -> int:
    """An item id written in decimal digits, in [0, MAX_ITEM_ID]; DataError otherwise."""
    if not _ID.fullmatch(text):
        raise DataError(f"{where}: {what} {text!r} is not an integer item id")
    item = int(text)
    if not 0 <= item <= MAX_ITEM_ID:
        raise DataError(f"{where}: {what} {text!r} is outside [0, 2^63 - 1]")
    return item


class _Pairs(list):
    """A JSON object as its (key, value) pairs, in order, repeated keys kept."""


def _load_titles(path: Path) -> dict[int, str]:
    """Item id -> title, verbatim (empty and long titles included, as the published data)."""
    if not path.is_file():
        raise DataError(f"{path}: missing file (the item id -> title map)")
    text = _decode(path)
    try:
        pairs = json.loads(text, object_pairs_hook=_Pairs)  # keeps repeated keys
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(pairs, _Pairs) or not pairs:
        raise DataError(f"{path}: expected a non-empty JSON object mapping item id to title")
    titles: dict[int, str] = {}
    keys: dict[int, str] = {}
    for key, title in pairs:
        item = _item_id(key, str(path), "item id")
        if item in keys:
            raise DataError(f"{path}: item ids {keys[item]!r} and {key!r} are the same id {item}")
        if not isinstance(title, str):
            raise DataError(f"{path}: item {key}: title {title!r} is not a string")
        titles[item], keys[item] = title, key
    return titles


def _parse_ids(text: str, where: str) -> list[int]:
    body = text.strip()
    if not (body.startswith("[") and body.endswith("]")):
        raise DataError(f"{where}: item_ids {text!r} is not a list like [1, 2, 3]")
    parts = body[1:-1].split(",")
    if any(not p.strip() for p in parts):
        raise DataError(f"{where}: item_ids {text!r} has an empty entry")
    ids = [_item_id(p.strip(), where, f"item_ids {text!r}: entry") for p in parts]
    if len(ids) < 2:
        raise DataError(f"{where}: item_ids {text!r} needs at least one history id and a target")
    return ids


def _timestamp(text: str, where: str) -> int:
    """A finite number, in whole seconds (integers kept exact)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{where}: timestamp {text!r} is not a number") from None
    if not math.isfinite(value):
        raise DataError(f"{where}: timestamp {text!r} is not finite")
    return int(value)


def _columns(header: list[str] | None, path: Path) -> dict[str, int]:
    """Position of each needed column; extra columns are allowed (and ignored)."""
    names = [h.strip() for h in header or []]
    missing = [c for c in COLUMNS if c not in names]
    if missing or len(set(names)) != len(names):
        raise DataError(
            f"{path}:1: header {header!r}, expected the columns {','.join(COLUMNS)} "
            "(extra columns are ignored), each once"
        )
    return {c: names.index(c) for c in COLUMNS}


def _load_rows(path: Path, titles: dict[int, str], max_history: int) -> list[Example]:
    if not path.is_file():
        raise DataError(f"{path}: missing file")
    examples = []
    reader = csv.reader(io.StringIO(_decode(path), newline=""))
    try:
        header = next(reader, None)
        rows = [(f"{path}:{reader.line_num}", row) for row in reader]
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: not readable as CSV ({exc})") from None
    column = _columns(header, path)
    for where, row in rows:
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(f"{where}: {len(row)} fields, expected {len(header)} as the header")
        ids = _parse_ids(row[column["item_ids"]], where)
        timestamp = _timestamp(row[column["timestamp"]], where)
        for item in ids:
            if item not in titles:
                raise DataError(f"{where}: item id {item} has no title in {TITLES_FILE}")
        history = tuple(ids[:-1][-max_history:])
        examples.append(Example(row[column["user_id"]].strip(), history, ids[-1], timestamp, where))
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


def filter_catalogue(data: Dataset, min_count: int) -> Dataset:
    """``data`` with the items seen fewer than ``min_count`` times in its training rows (as a
    target or in a history) removed: from the catalogue, from every history, and with the rows
    (of every split) whose target is one of them or whose history is left empty.

    Raises DataError when no item or no training row is left.
    """
    counts = Counter(i for e in data.train for i in (e.target, *e.history))
    keep = {i for i in data.titles if counts[i] >= min_count}

    def kept(rows: list[Example]) -> list[Example]:
        out = []
        for e in rows:
            history = tuple(i for i in e.history if i in keep)
            if e.target in keep and history:
                out.append(dataclasses.replace(e, history=history))
        return out

    train = kept(data.train)
    if not keep or not train:
        raise DataError(
            f"--min-item-count {min_count}: leaves {len(keep)} of {len(data.titles)} items and "
            f"{len(train)} training rows in {data.folder}; lower it"
        )
    titles = {i: t for i, t in data.titles.items() if i in keep}
    valid, test = kept(data.valid), kept(data.test)
    return dataclasses.replace(data, titles=titles, train=train, valid=valid, test=test)


def trained_subset(data: Dataset, limit_train: int | None, min_count: int | None) -> Dataset:
    """What a run trains and tests on (``--limit-train``, ``--min-item-count``): the first
    ``limit_train`` training rows (None: all), then ``filter_catalogue`` counted over those rows
    (None: no filter), so that the model decodes only items it trained on.

    Raises DataError as ``filter_catalogue``.
    """
    data = dataclasses.replace(data, train=data.train[:limit_train])
    return data if min_count is None else filter_catalogue(data, min_count)


def load_titles(folder: str | Path) -> dict[int, str]:
    """The catalogue of a dataset folder: item id -> title (``DataError`` as ``load_dataset``)."""
    return _load_titles(Path(folder) / TITLES_FILE)


def load_dataset(
    folder: str | Path,
    train_file: str = "train.csv",
    test_file: str = "test.csv",
    valid_file: str = "valid.csv",
    max_history: int = 10,
    domain: str | None = None,
    validation: bool = True,
    instruction: str | None = None,
    history_prefix: str | None = None,
) -> Dataset:
    """Read a dataset folder in upstream's format; ``DataError`` names the file and row at fault.

    ``max_history``: keep the newest ids of each history (upstream: 10).
    ``domain``: the instruction domain; default inferred from the folder name (bear.prompts).
    ``validation``: False keeps every training row for training and leaves ``valid`` empty
    (upstream's protocol).
    ``instruction``, ``history_prefix``: the user's own prompt strings instead of the domain's.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: dataset folder does not exist")
    if max_history < 1:
        raise ValueError(f"max_history: got {max_history}, expected >= 1")
    titles = _load_titles(folder / TITLES_FILE)
    train = _load_rows(folder / train_file, titles, max_history)
    test = _load_rows(folder / test_file, titles, max_history)
    if not validation:
        valid = []
    elif (folder / valid_file).is_file():
        valid = _load_rows(folder / valid_file, titles, max_history)
    else:
        train, valid = split_valid(train)
    domain = domain or domain_from_folder(folder)
    prompt = prompt_text(domain, instruction, history_prefix)
    return Dataset(folder, domain, titles, prompt, train, valid, test)

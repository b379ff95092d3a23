"""A synthetic dataset in upstream's format where beam pruning matters (``python -m bear synth``).

The catalogue has two kinds of items:

- *popular* items, "<Brand> <Category> <Line> <Colour>", from a dozen brands: many items share each
  brand and brand + category prefix, and brands, categories and lines follow Zipf laws;
- *niche* items, "<Maker> <Name> <Mark> <k>", k = 1..NICHE_ITEMS, one small maker per category.

Each user has a favourite category (visible in their history). Each purchase is, with probability
``p_niche``, an item of the favourite category's maker (k = 1 mostly), else a popular item, in the
favourite category with probability ``p_favourite``. Given a history, the niche item k = 1 is
then the single most likely next item (about p_niche · 0.9), while its first token (the maker)
carries less probability than each of the popular brands (about (1 - p_niche) / num_brands,
spread over many items). A width-B beam with B < num_brands prunes it at step one although its
full probability ranks first: the over-pruning of paper §4.2 that BEAR targets. Rows are sliding
windows of up to 11 ids; each user's last purchase is their test row; timestamps increase along a
user's purchases.

Prefix structure (``shared_words``, ``lines_per_brand``): ``shared_words`` D > 0 puts D words
after the first word of every title, the same for every popular item of a (brand, category) and
for every item of a niche maker, so that titles share longer prefixes and branch D words later;
``lines_per_brand`` is how wide a (brand, category) branches. With D = 0 the catalogue is the
one above, draw for draw.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["SynthConfig", "make_synth", "write_synth"]

_ONSETS = ["b", "c", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "io"]
_CATEGORIES = [
    "Stapler",
    "Notebook",
    "Pen Set",
    "Desk Lamp",
    "Binder",
    "Marker",
    "Folder",
    "Calculator",
    "Envelope",
    "Label Maker",
    "Organizer",
    "Scissors",
]
_LINES = ["Pro", "Classic", "Ultra", "Mini", "Max", "Lite"]
_COLOURS = ["Black", "Blue", "Red", "Green", "White", "Silver"]
_MARKS = ["Series", "Edition", "Volume", "Model"]
NICHE_ITEMS = 3  # items per niche maker, k = 1..NICHE_ITEMS
NICHE_K_P = (0.9, 0.05, 0.05)  # probability of each k in a niche purchase
SHARED_WORDS_SEED = 7919  # offsets the seed of the shared words (the other draws stay as they are)
SYNTH_FILES = ("id2name4Rec.json", "train.csv", "test.csv", "synth_config.json")  # all synth writes
WINDOW = 11  # ids per row: up to 10 history ids and the target (upstream's sliding window)


@dataclass(frozen=True)
class SynthConfig:
    """Size and shape of the synthetic dataset."""

    seed: int = 0  # everything is drawn from this seed
    num_users: int = 600  # users; each gives train windows and one test row
    min_events: int = 5  # purchases per user, drawn uniformly in [min_events, max_events]
    max_events: int = 12
    num_brands: int = 16  # popular brands: more than the beam width B = 10, so they crowd step one
    lines_per_brand: int = 3  # product lines per (brand, category)
    brand_zipf: float = 0.1  # popularity skew of brands (Zipf exponent)
    line_zipf: float = 1.0  # popularity skew of the lines within (brand, category)
    category_zipf: float = 0.8  # popularity skew of the users' favourite categories
    p_niche: float = 0.045  # probability that a purchase is the favourite category's niche item
    p_favourite: float = 0.8  # probability that a popular purchase is in the favourite category
    shared_words: int = 0  # words every title of a (brand, category) or niche maker shares

    def __post_init__(self):
        if not 1 <= self.lines_per_brand <= len(_LINES):
            raise ValueError(
                f"lines_per_brand: got {self.lines_per_brand}, expected 1 to {len(_LINES)} (the "
                "product lines there are)"
            )
        if self.shared_words < 0:
            raise ValueError(f"shared_words: got {self.shared_words}, expected an integer >= 0")


def _names(rng: np.random.Generator, count: int, taken: set[str]) -> list[str]:
    out = []
    while len(out) < count:
        syllables = rng.integers(2, 4)
        name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
        name = name.capitalize()
        if name not in taken:
            taken.add(name)
            out.append(name)
    return out


def _zipf(count: int, exponent: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, count + 1) ** exponent
    return weights / weights.sum()


def _share_prefixes(titles, popular, niche, cfg: SynthConfig) -> None:
    """Insert ``cfg.shared_words`` words after each title's first word, one draw per group: a
    (brand, category)'s popular items, a maker's niche items (their own generator, so that the
    rest of the dataset is drawn as without them)."""
    rng = np.random.default_rng(cfg.seed + SHARED_WORDS_SEED)
    taken = {w for t in titles.values() for w in t.split()}
    for group in [*popular.values(), *niche]:
        words = " ".join(_names(rng, cfg.shared_words, taken)).lower()
        for item in group:
            first, rest = titles[item].split(" ", 1)
            titles[item] = f"{first} {words} {rest}"


def make_synth(cfg: SynthConfig):
    """(titles {id: title}, train rows, test rows); a row is (user, [item ids], timestamp)."""
    rng = np.random.default_rng(cfg.seed)
    taken: set[str] = set()
    brands = _names(rng, cfg.num_brands, taken)
    makers = _names(rng, len(_CATEGORIES), taken)
    titles: dict[int, str] = {}
    popular: dict[tuple[int, int], list[int]] = {}  # (brand, category) -> item ids
    for b, brand in enumerate(brands):
        for c, category in enumerate(_CATEGORIES):
            lines = rng.choice(_LINES, size=cfg.lines_per_brand, replace=False)
            for line in lines:
                item = len(titles) + 1
                titles[item] = f"{brand} {category} {line} {rng.choice(_COLOURS)}"
                popular.setdefault((b, c), []).append(item)
    niche: list[list[int]] = []  # category -> the ids of its maker's items
    for maker in makers:
        name, mark = _names(rng, 1, taken)[0], rng.choice(_MARKS)
        niche.append([])
        for k in range(1, NICHE_ITEMS + 1):
            item = len(titles) + 1
            titles[item] = f"{maker} {name} {mark} {k}"
            niche[-1].append(item)
    if cfg.shared_words:
        _share_prefixes(titles, popular, niche, cfg)
    brand_p = _zipf(len(brands), cfg.brand_zipf)
    line_p = _zipf(cfg.lines_per_brand, cfg.line_zipf)
    category_p = _zipf(len(_CATEGORIES), cfg.category_zipf)
    train, test = [], []
    clock = 1_000_000_000
    for user in range(cfg.num_users):
        favourite = int(rng.choice(len(_CATEGORIES), p=category_p))
        events = []
        for _ in range(int(rng.integers(cfg.min_events, cfg.max_events + 1))):
            if rng.random() < cfg.p_niche:
                events.append(int(rng.choice(niche[favourite], p=NICHE_K_P)))
                continue
            c = favourite if rng.random() < cfg.p_favourite else int(rng.integers(len(_CATEGORIES)))
            b = int(rng.choice(len(brands), p=brand_p))
            events.append(int(rng.choice(popular[(b, c)], p=line_p)))
        times = clock + np.sort(rng.integers(0, 10_000_000, size=len(events)))
        for end in range(2, len(events) + 1):
            row = (str(user), events[max(0, end - WINDOW) : end], int(times[end - 1]))
            (test if end == len(events) else train).append(row)
    return titles, train, test


def _write_csv(path: Path, rows) -> None:
    with path.open("w", encoding="utf-8") as fh:
        fh.write("user_id,item_ids,timestamp\n")
        for user, ids, ts in rows:
            fh.write(f'{user},"[{", ".join(map(str, ids))}]",{ts}\n')


def write_synth(out: str | Path, cfg: SynthConfig, overwrite: bool = False) -> Path:
    """Write the dataset folder: its files (``SYNTH_FILES``) written to a temporary folder, then
    moved into place. ``overwrite`` replaces those files of a folder synth wrote (its
    synth_config.json), and only those: anything else in it stays. Raises FileExistsError for a
    folder that is not empty without ``overwrite``, or that synth did not write."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{out}: exists and is not empty; pass --overwrite to replace it")
        if not (out / "synth_config.json").is_file():
            raise FileExistsError(
                f"{out}: --overwrite replaces a dataset synth wrote (it has synth_config.json); "
                "this folder is not one and is left as it is: give another --out"
            )
    titles, train, test = make_synth(cfg)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "id2name4Rec.json").write_text(json.dumps({str(k): v for k, v in titles.items()}))
        _write_csv(tmp / "train.csv", train)
        _write_csv(tmp / "test.csv", test)
        (tmp / "synth_config.json").write_text(json.dumps(cfg.__dict__, indent=2))
        for name in SYNTH_FILES:  # the marker last: a folder with it is complete
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

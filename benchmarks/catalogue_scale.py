"""Decoding cost against catalogue size: the trie's build and memory, the constraint step at each
depth, beam search and exact top-K per user, the training mask (``labels_allowed_mask``) per row,
for catalogues of 10^3 ... 10^6 items (--sizes; 10^7 too when asked).

Catalogue: random titles of 4-12 tokens over a VOCAB-token vocabulary, their first tokens drawn
from a Zipf law (so the root's fan-out grows with the catalogue, as real titles' first words do).
Model: bear's tiny Llama with random weights and VOCAB = 50,000 tokens (the model's cost does not
depend on the catalogue; the constraint step's should not either). USERS prompts of PROMPT_LEN
tokens, beam width B, "after" scoring (every step runs the model: none is deferred).

``score_items`` teacher-forces SCORED random items per user (reported per item). The constraint step
is ``bear.decoding.beam.expand_beams`` (the trie's children of every beam, their log-probabilities,
the top 2B): timed per call in SEARCHES searches after a discarded one, the median reported per
depth (step 0 is the root), and the searches' median per user. ``--baseline PATH`` runs the same
measurements on another checkout's ``bear`` (its ``PATH/bear``), for a before/after table on one
machine in one run.

Writes results/catalogue_scale_<device>[_<tag>].{csv,json,png} (log-log: seconds against items).

    python benchmarks/catalogue_scale.py                         # 1e3 1e4 1e5 1e6
    python benchmarks/catalogue_scale.py --sizes 1000 10000 --tag smoke
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import (  # noqa: E402
    add_results_args,
    device_label,
    results_stem,
    write_csv,
    write_json,
)

VOCAB = 50_000
PAD_ID, EOS_ID = 0, 1
FIRST_TOKEN = 2
USERS = 8
PROMPT_LEN = 150  # about the paper's prompts (10 history titles)
B = 10
SCORED = 16  # items teacher-forced per user (score_items)
SEARCHES = 5  # measured beam searches per size: each step's and the search's median is reported
WARM_UP_ITEMS = 1000  # catalogue of the discarded first measurement


def titles(n: int, seed: int) -> list[list[int]]:
    """n distinct-enough random titles: Zipf first tokens, uniform later ones, 4-12 tokens."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 13, n)
    first = np.minimum(rng.zipf(1.3, n), VOCAB - FIRST_TOKEN - 1) + FIRST_TOKEN
    rest = rng.integers(FIRST_TOKEN, VOCAB, (n, 12))
    rest[:, 0] = first
    return [row[:k].tolist() for row, k in zip(rest, lengths, strict=True)]


def trie_bytes(trie) -> int:
    """Bytes of the trie's tensors."""
    return sum(getattr(trie, name).nbytes for name in trie._TENSORS)


def measure(bear, n: int, model, prompts, seed: int, topk_items: int) -> dict:
    """One catalogue size on one ``bear`` package: build, memory, steps, searches."""
    seqs = titles(n, seed)
    start = time.perf_counter()
    trie = bear.trie.ItemTrie(seqs, range(n), EOS_ID, vocab_size=VOCAB)
    build = time.perf_counter() - start
    beam_module = bear.beam_module
    original = beam_module.expand_beams
    steps: list[list[float]] = []

    def timed_expand(*args, **kwargs):
        t0 = time.perf_counter()
        out = original(*args, **kwargs)
        steps[-1].append(time.perf_counter() - t0)
        return out

    beam_module.expand_beams = timed_expand
    try:
        searches = []
        for _ in range(1 + SEARCHES):  # the first warms the allocator and is not reported
            steps.append([])
            start = time.perf_counter()
            beam_module.beam_search(model, *prompts, trie, B, scoring="after")
            searches.append(time.perf_counter() - start)
    finally:
        beam_module.expand_beams = original
    # the same prompts and catalogue: every search runs the same steps; each depth's median
    per_step = [statistics.median(times) for times in zip(*steps[1:], strict=True)]
    picks = torch.randint(0, n, (USERS, SCORED), generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    bear.decoding.score_items(model, *prompts, trie, picks, scoring="after")
    scored = time.perf_counter() - start
    labels = trie.item_tokens(picks.reshape(-1))  # (USERS * SCORED, L + 1): tokens, EOS, -100
    start = time.perf_counter()
    trie.labels_allowed_mask(labels)
    masked = time.perf_counter() - start
    topk = None
    if n <= topk_items:
        start = time.perf_counter()
        bear.decoding.exact_topk(model, *prompts, trie, k=B, scoring="after")
        topk = time.perf_counter() - start
    return {
        "items": n,
        "nodes": trie.num_nodes,
        "root_fanout": trie.depth_fanout_list[0],
        "build_s": round(build, 3),
        "trie_mb": round(trie_bytes(trie) / 2**20, 1),
        "bytes_per_node": round(trie_bytes(trie) / trie.num_nodes, 1),
        "root_step_ms": round(1e3 * per_step[0], 2),
        "later_step_ms_max": round(1e3 * max(per_step[1:] or [0.0]), 2),
        "later_step_ms_median": round(1e3 * statistics.median(per_step[1:] or [0.0]), 2),
        "step_ms_by_depth": [round(1e3 * s, 2) for s in per_step],
        "beam_search_ms_per_user": round(1e3 * statistics.median(searches[1:]) / USERS, 1),
        "score_items_ms_per_item": round(1e3 * scored / picks.numel(), 2),
        "labels_mask_ms_per_row": round(1e3 * masked / labels.shape[0], 3),
        "exact_topk_ms_per_user": None if topk is None else round(1e3 * topk / USERS, 1),
    }


def load_bear(path: str | None):
    """The ``bear`` package of this checkout, or of the checkout at ``path``."""
    if path is not None:
        sys.path.insert(0, str(Path(path).resolve()))
        for name in [m for m in sys.modules if m == "bear" or m.startswith("bear.")]:
            del sys.modules[name]
    bear = importlib.import_module("bear")
    for name in ("bear.trie", "bear.decoding", "bear.model"):
        importlib.import_module(name)
    try:  # where beam search lives: bear.decoding.beam (a package now), bear.beam (before)
        bear.beam_module = importlib.import_module("bear.decoding.beam")
    except ModuleNotFoundError:
        bear.beam_module = importlib.import_module("bear.beam")
    if path is not None:
        sys.path.pop(0)
    return bear


def plot(rows: list[dict], out: Path, device: str) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for version in sorted({r["version"] for r in rows}):
        mine = [r for r in rows if r["version"] == version]
        x = [r["items"] for r in mine]
        for key, style in (("root_step_ms", "o-"), ("later_step_ms_max", "s--"),
                           ("beam_search_ms_per_user", "^-")):  # fmt: skip
            ax.plot(x, [r[key] for r in mine], style, label=f"{version}: {key}")
    ax.set(xscale="log", yscale="log", xlabel="catalogue items", ylabel="ms",
           title=f"constraint step and beam search against catalogue size\n{device}")  # fmt: skip
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10**3, 10**4, 10**5, 10**6],
                        help="catalogue sizes (default 1e3 1e4 1e5 1e6)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of catalogue and model")
    parser.add_argument("--baseline", help="another checkout whose bear is measured too")
    parser.add_argument(
        "--topk-items",
        type=int,
        default=10**4,
        help="time exact_topk only up to this many items (default 1e4: with random weights every "
        "prefix scores alike, and the exact search visits a share of the catalogue)",
    )
    add_results_args(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = device_label("cpu")
    versions = [("this", None)] + ([("baseline", args.baseline)] if args.baseline else [])
    rows = []
    for version, path in versions:
        bear = load_bear(path)
        config = bear.model.TinyConfig(hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=2)  # fmt: skip
        model = bear.model.build_tiny_model(VOCAB, PAD_ID, EOS_ID, config, seed=args.seed).eval()
        g = torch.Generator().manual_seed(args.seed)
        prompts = (torch.randint(FIRST_TOKEN, VOCAB, (USERS, PROMPT_LEN), generator=g),
                   torch.ones(USERS, PROMPT_LEN, dtype=torch.int64))  # fmt: skip
        # a discarded run first: the first searches of a process pay its allocator's and
        # kernels' warm-up (the first size read about 2x slow per step without it)
        measure(bear, WARM_UP_ITEMS, model, prompts, args.seed, 0)
        for n in args.sizes:
            measured = measure(bear, n, model, prompts, args.seed, args.topk_items)
            row = {"version": version, **measured}
            print({k: v for k, v in row.items() if k != "step_ms_by_depth"}, flush=True)
            rows.append(row)
    stem = results_stem(args.results_dir, "catalogue_scale", device, args.tag)
    flat = [{k: v for k, v in r.items() if k != "step_ms_by_depth"} for r in rows]
    write_csv(stem.with_suffix(".csv"), flat)
    meta = {"device": device, "threads": args.threads, "users": USERS, "beam_width": B}
    write_json(stem.with_suffix(".json"), {**meta, "rows": rows})
    plot(rows, stem.with_suffix(".png"), device)
    print(f"wrote {stem}.{{csv,json,png}}")


if __name__ == "__main__":
    main()

"""Exact top-K time against title length: bear.decoding.exact_topk on catalogues with long titles.

A hostile catalogue (SPEC §10): SHORT_ITEMS short random titles plus LONG_ITEMS titles of L
tokens each, for L in --lengths, and K = the whole catalogue, so the best-first search walks
every long title to its end. Its cost must grow about linearly with L (each expansion feeds one
token on the stored KV entries of its prefix, as a decoding step does), not quadratically (as
when every expansion re-ran its whole prefix).
Model: bear's tiny Llama (random weights, bear.model.TinyConfig), prompts of PROMPT_LEN tokens.

Writes benchmarks/results/topk_title_length_<device>.csv and .json (names from _common).

    python benchmarks/topk_title_length.py --threads 1     # L = 50, 200, 400
    python benchmarks/topk_title_length.py --lengths 50 100 --reps 1 --tag smoke
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _common import (
    add_results_args,
    device_label,
    resolve_device,
    results_stem,
    timed,
    write_csv,
    write_json,
)

from bear.decoding import exact_topk
from bear.model import TinyConfig, build_tiny_model
from bear.trie import ItemTrie

VOCAB = 512  # model vocabulary
PAD_ID, EOS_ID = 0, 1
FIRST_TOKEN = 2  # item and prompt tokens are drawn from [FIRST_TOKEN, VOCAB)
SHORT_ITEMS = 28  # titles of 2-8 tokens
LONG_ITEMS = 4  # titles of L tokens (the hostile ones)
PROMPT_LEN = 32  # tokens per prompt


def catalogue(length: int, seed: int) -> ItemTrie:
    """SHORT_ITEMS short random titles plus LONG_ITEMS titles of `length` tokens."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for _ in range(SHORT_ITEMS):
        n = int(torch.randint(2, 9, (1,), generator=g))
        seqs.append(torch.randint(FIRST_TOKEN, VOCAB, (n,), generator=g).tolist())
    for _ in range(LONG_ITEMS):
        seqs.append(torch.randint(FIRST_TOKEN, VOCAB, (length,), generator=g).tolist())
    return ItemTrie(seqs, range(len(seqs)), EOS_ID, vocab_size=VOCAB)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", nargs="+", type=int, default=[50, 200, 400], help="title lengths")
    p.add_argument("--users", type=int, default=4, help="prompts per exact_topk call")
    p.add_argument("--k", type=int, default=SHORT_ITEMS + LONG_ITEMS, help="K (default: all)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model and catalogue")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    add_results_args(p)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    label = device_label(device)
    model = build_tiny_model(VOCAB, PAD_ID, EOS_ID, TinyConfig(), args.seed).to(device).eval()
    g = torch.Generator().manual_seed(args.seed + 1)
    input_ids = torch.randint(FIRST_TOKEN, VOCAB, (args.users, PROMPT_LEN), generator=g)
    input_ids, mask = input_ids.to(device), torch.ones_like(input_ids).to(device)
    rows = []
    for length in args.lengths:
        trie = catalogue(length, args.seed).to(device)
        exact_topk(model, input_ids, mask, trie, k=args.k, scoring="before")  # warm-up
        times = [
            timed(lambda t=trie: exact_topk(model, input_ids, mask, t, k=args.k), device)[1]
            for _ in range(args.reps)
        ]
        rows.append(
            {
                "title_tokens": length,
                "seconds": statistics.median(times),
                "users": args.users,
                "k": args.k,
                "items": SHORT_ITEMS + LONG_ITEMS,
                "device": label,
            }
        )
        print(f"L = {length:4d}: {rows[-1]['seconds']:.3f} s per call", flush=True)
    stem = results_stem(args.results_dir, "topk_title_length", label, args.tag)
    write_csv(stem.with_suffix(".csv"), rows)
    settings = {k: v for k, v in vars(args).items() if k not in ("tag", "results_dir")}
    write_json(stem.with_suffix(".json"), {"device": label, "settings": settings, "rows": rows})
    print(f"wrote {stem}.csv and .json")


if __name__ == "__main__":
    main()

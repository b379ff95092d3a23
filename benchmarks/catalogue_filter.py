"""What `--min-item-count K` leaves of a dataset when training on its first N rows: the items, the
training, validation and test rows, and how many of the first `--limit-eval` test users' targets
occur in the training rows left (as the study's coverage counts them).

`bear train` applies `--limit-train N` first and counts each item over those N rows
(`bear.data.trained_subset`, called here too), so that the model is asked to decode only items
it trained on; this table says what that leaves for a study of a given size. No model, no
tokenizer: the data files only (seconds).

    python benchmarks/catalogue_filter.py --data ../shared/data/amazon/Office

Writes results/catalogue_filter_<data>[_tag].{csv,md} (the rows depend on the data only).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _common import add_results_args, results_stem, write_csv

from bear.data import DataError, load_dataset, trained_subset


def _row(data, limit: int | None, min_count: int, limit_eval: int) -> dict:
    """One (N, K) cell: what the filter leaves of ``data`` trained on its first ``limit`` rows
    (None: all)."""
    row = {"train_rows_limit": limit or len(data.train), "min_item_count": min_count}
    try:
        kept = trained_subset(data, limit, min_count)
    except DataError as err:  # nothing left: the row says so
        return row | {"items": 0, "train_rows": 0, "valid_rows": 0, "test_users": 0,
                      "tested": 0, "target_seen_in_training": 0, "note": str(err)}  # fmt: skip
    seen = {i for e in kept.train for i in (e.target, *e.history)}
    tested = kept.test[:limit_eval]
    return row | {
        "items": len(kept.titles),
        "train_rows": len(kept.train),
        "valid_rows": len(kept.valid),
        "test_users": len(kept.test),
        "tested": len(tested),
        "target_seen_in_training": sum(e.target in seen for e in tested),
        "note": "",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="dataset folder (upstream format)")
    p.add_argument(
        "--limits",
        nargs="+",
        type=int,
        default=[1024, 2048, 4096, 0],
        help="--limit-train values N to try (0: every training row)",
    )
    p.add_argument(
        "--min-counts", nargs="+", type=int, default=[2, 3, 5], help="--min-item-count values K"
    )
    p.add_argument("--max-history", type=int, default=5, help="history items per prompt")
    p.add_argument("--limit-eval", type=int, default=300, help="test users a study would test")
    add_results_args(p)
    args = p.parse_args()
    if min(args.limits) < 0:
        p.error(f"--limits: got {args.limits}; each N must be >= 0 (0: every training row)")
    if min(args.min_counts) < 1:
        p.error(f"--min-counts: got {args.min_counts}; each K must be >= 1")
    data = load_dataset(args.data, max_history=args.max_history)
    rows = [
        _row(data, limit or None, k, args.limit_eval)
        for limit in args.limits
        for k in args.min_counts
    ]
    name = Path(args.data).resolve().name.lower()
    stem = results_stem(args.results_dir, f"catalogue_filter_{name}", "", args.tag)  # no device
    write_csv(stem.with_suffix(".csv"), rows)
    columns = list(rows[0])
    lines = [
        f"Unfiltered: {len(data.titles)} items, {len(data.train)} training rows, "
        f"{len(data.valid)} validation rows, {len(data.test)} test users.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + " --- |" * len(columns),
    ]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

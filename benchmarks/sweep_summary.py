"""A sweep's table (OUT/sweep.csv of ``python -m bear sweep``) as a Markdown table: one row per
group of cells that share the --by columns, each metric as mean ± standard error over the rest
(the seeds), with the number of cells n. Cells that failed are counted and left out.

    python benchmarks/sweep_summary.py runs/sweep_first --by loss reg_weight reg_temperature
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
from collections import defaultdict
from pathlib import Path

from bear.sweep_report import ordered

METRICS = ("ndcg@10", "hr@10", "pr@10", "violation_share", "reg_grad_ratio")


def _number(text: str):
    """A CSV cell as a number where it is one ("" and text stay as they are)."""
    try:
        return float(text)
    except ValueError:
        return text


def _mean_se(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.4f}"
    return f"{mean:.4f} ± {statistics.stdev(values) / math.sqrt(len(values)):.4f}"


def summary(rows: list[dict], by: list[str], metrics: tuple[str, ...]) -> str:
    """Markdown: one line per distinct value of ``by`` (numbers in numeric order)."""
    groups = defaultdict(list)
    for row in rows:
        groups[tuple(_number(row.get(k, "")) for k in by)].append(row)

    def order(key):
        return tuple((0, v, "") if isinstance(v, float) else (1, 0, str(v)) for v in key)

    head = [*by, "n", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for key in sorted(groups, key=order):
        cells = groups[key]
        stats = []
        for metric in metrics:
            values = [float(c[metric]) for c in cells if c.get(metric) not in (None, "")]
            stats.append(_mean_se(values))
        shown = [f"{v:g}" if isinstance(v, float) else (v or "-") for v in key]
        lines.append("| " + " | ".join([*shown, str(len(cells)), *stats]) + " |")
    return "\n".join(lines)


def pivot(rows: list[dict], row_key: str, col_key: str, metric: str) -> str:
    """Markdown: ``metric`` (mean ± SE over the cells that share a pair) with ``row_key``
    values down and ``col_key`` values across."""
    groups = defaultdict(list)
    for row in rows:
        if row.get(metric) not in (None, ""):
            groups[(_number(row[row_key]), _number(row[col_key]))].append(float(row[metric]))
    down, across = ordered(k[0] for k in groups), ordered(k[1] for k in groups)
    shown = [f"{v:g}" if isinstance(v, float) else v for v in across]
    lines = [f"| {row_key} \\ {col_key} | " + " | ".join(shown) + " |",
             "|" + " --- |" * (len(across) + 1)]  # fmt: skip
    for r in down:
        cells = [_mean_se(groups.get((r, c), [])) for c in across]
        lines.append(f"| {r:g} | " + " | ".join(cells) + " |")
    return f"{metric}:\n\n" + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the sweep's folder (holds sweep.csv)")
    parser.add_argument(
        "--by", nargs="+", required=True, help="columns that define a group (e.g. loss reg_weight)"
    )
    parser.add_argument(
        "--metrics", nargs="+", default=list(METRICS), help=f"columns reported (default {METRICS})"
    )
    parser.add_argument(
        "--pivot",
        nargs=2,
        metavar=("ROW", "COLUMN"),
        help="also one table per metric with ROW values down and COLUMN values across (e.g. "
        "reg_weight reg_temperature), over the cells of the loss given by --pivot-loss",
    )
    parser.add_argument("--pivot-loss", default="bear", help="loss of the pivot tables (bear)")
    args = parser.parse_args()
    table = args.out / "sweep.csv"
    if not table.is_file():
        parser.error(f"{table} does not exist: give the folder a `bear sweep` wrote (its --out)")
    with table.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    unknown = [
        c for c in [*args.by, *args.metrics, *(args.pivot or [])] if rows and c not in rows[0]
    ]
    if unknown:
        parser.error(f"{table} has no column {unknown[0]!r}; its columns: {list(rows[0])}")
    done = [r for r in rows if r.get("status") == "done"]
    print(summary(done, args.by, tuple(args.metrics)))
    if args.pivot:
        part = [r for r in done if r.get("loss") == args.pivot_loss]
        for metric in args.metrics:
            print("\n" + pivot(part, *args.pivot, metric))
    if len(done) < len(rows):
        print(f"\n({len(rows) - len(done)} of {len(rows)} cells not done: left out)")


if __name__ == "__main__":
    main()

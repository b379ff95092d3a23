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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the sweep's folder (holds sweep.csv)")
    parser.add_argument(
        "--by", nargs="+", required=True, help="columns that define a group (e.g. loss reg_weight)"
    )
    parser.add_argument(
        "--metrics", nargs="+", default=list(METRICS), help=f"columns reported (default {METRICS})"
    )
    args = parser.parse_args()
    table = args.out / "sweep.csv"
    if not table.is_file():
        parser.error(f"{table} does not exist: give the folder a `bear sweep` wrote (its --out)")
    with table.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    unknown = [c for c in [*args.by, *args.metrics] if rows and c not in rows[0]]
    if unknown:
        parser.error(f"{table} has no column {unknown[0]!r}; its columns: {list(rows[0])}")
    done = [r for r in rows if r.get("status") == "done"]
    print(summary(done, args.by, tuple(args.metrics)))
    if len(done) < len(rows):
        print(f"\n({len(rows) - len(done)} of {len(rows)} cells not done: left out)")


if __name__ == "__main__":
    main()

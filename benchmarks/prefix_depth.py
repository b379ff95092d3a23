"""Pruning as title prefixes lengthen: msl and bear on synthetic catalogues whose titles share
0, 2, 4 or 8 more words before they branch (``bear synth --shared-words``).

For each depth a dataset is written (the same users and purchases: only the titles change), and
one ``bear sweep`` runs msl and bear over the datasets and seeds with the pruning anatomy on. The
question: as prefixes interact longer, does pruning move from "some target token falls outside
the top-B" (a violation of the necessary condition (3.2), which BEAR's regulariser addresses) to
"every token inside its top-B, yet the prefix lost to other beams" (which it does not), and does
BEAR's gain over msl shrink with it? Writes results/prefix_depth_<device>[_tag].{json,md,png}:
per depth and loss, NDCG@10, PR@10 and the violation share (mean ± SE over seeds), BEAR's gain,
and the anatomy's counts; the sweep's own table is in OUT/sweep.csv. Resumable as the sweep is.

    PYTHONPATH=. python benchmarks/prefix_depth.py --out runs/prefix_depth --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from _common import add_results_args, device_label, results_stem, write_json  # noqa: E402

from bear.metrics import ANATOMY_KEYS  # noqa: E402
from bear.sweep import cells_of, run_sweep  # noqa: E402
from bear.sweep_report import write_sweep  # noqa: E402
from bear.synth import SynthConfig, write_synth  # noqa: E402

METRICS = ("ndcg@10", "pr@10", "violation_share")


def _mean_se(xs: list) -> list | None:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return [statistics.fmean(xs), statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0]


def summarise(cells, depth_of: dict[str, int]) -> dict:
    """depth -> loss -> metric -> [mean, SE] over seeds, with the anatomy's counts summed, and
    BEAR's gain over msl (paired by seed)."""
    out: dict = {}
    for cell in cells:
        metrics_file = Path(cell.config.out) / "metrics.json"
        if not metrics_file.is_file():
            continue
        test = json.loads(metrics_file.read_text())["test"]
        entry = out.setdefault(depth_of[cell.config.data], {}).setdefault(cell.config.loss, {})
        entry.setdefault("runs", {})[cell.config.seed] = test
    for losses in out.values():
        for entry in losses.values():
            runs = entry["runs"]
            for key in METRICS:
                entry[key] = _mean_se([r[key] for r in runs.values()])
            entry["anatomy"] = {k: sum(r["anatomy"][k] for r in runs.values())
                                for k in ("cases", *ANATOMY_KEYS)}  # fmt: skip
        if {"msl", "bear"} <= set(losses):
            seeds = sorted(set(losses["msl"]["runs"]) & set(losses["bear"]["runs"]))
            for key in ("ndcg@10", "pr@10"):
                gain = [_diff(losses["bear"]["runs"][s][key], losses["msl"]["runs"][s][key])
                        for s in seeds]  # fmt: skip
                losses.setdefault("gain", {})[key] = _mean_se(gain)
    return out


def _diff(a, b):
    return None if a is None or b is None else a - b


def table(summary: dict) -> str:
    lines = ["| shared words | loss | NDCG@10 | PR@10 | violation share | pruned: violation / "
             "other (cases) |", "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    cell = lambda v: "n/a" if v is None else f"{v[0]:.4f} ± {v[1]:.4f}"  # noqa: E731
    for depth in sorted(summary):
        for loss in ("msl", "bear"):
            e = summary[depth].get(loss)
            if e is None:
                continue
            a = e["anatomy"]
            lines.append(f"| {depth} | {loss} | {cell(e['ndcg@10'])} | {cell(e['pr@10'])} | "
                         f"{cell(e['violation_share'])} | {a['pruned_violation']} / "
                         f"{a['pruned_other']} ({a['cases']}) |")  # fmt: skip
        gain = summary[depth].get("gain")
        if gain:
            lines.append(f"| {depth} | bear − msl | {cell(gain['ndcg@10'])} | "
                         f"{cell(gain['pr@10'])} | | |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(summary: dict, out: Path) -> None:
    depths = sorted(summary)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, key in zip(axes, METRICS, strict=True):
        for loss in ("msl", "bear"):
            points = [(d, summary[d][loss][key]) for d in depths
                      if loss in summary[d] and summary[d][loss][key]]  # fmt: skip
            if points:
                xs, values = zip(*points, strict=True)
                ax.errorbar(xs, [v[0] for v in values], yerr=[v[1] for v in values],
                            marker="o", capsize=3, label=loss)  # fmt: skip
        ax.set(xlabel="shared words before titles branch", ylabel=f"test {key}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/prefix_depth", help="datasets and the sweep's runs")
    p.add_argument("--depths", nargs="+", type=int, default=[0, 2, 4, 8], help="shared words")
    p.add_argument("--users", type=int, default=500, help="synthetic users")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run")
    p.add_argument("--limit-eval", type=int, default=150, help="validation and test users")
    p.add_argument("--max-history", type=int, default=5, help="history items per prompt")
    p.add_argument("--vocab-size", type=int, default=2048, help="tiny model's BPE vocabulary")
    p.add_argument("--hidden-size", type=int, default=128, help="tiny model width")
    p.add_argument("--limit-train", type=int, help="training rows (default all)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    add_results_args(p)
    args = p.parse_args()
    out = Path(args.out)
    depth_of = {}
    for depth in args.depths:
        folder = out / f"data_d{depth}"
        if not (folder / "synth_config.json").is_file():
            write_synth(folder, SynthConfig(num_users=args.users, shared_words=depth))
        depth_of[str(folder)] = depth
    grid = {"data": list(depth_of), "loss": ["msl", "bear"], "seed": args.seeds,
            "epochs": [args.epochs], "limit_eval": [args.limit_eval],
            "max_history": [args.max_history], "vocab_size": [args.vocab_size],
            "hidden_size": [args.hidden_size], "limit_train": [args.limit_train],
            "pruning_anatomy": [True], "device": [args.device], "progress": [False]}  # fmt: skip
    sweep = out / "sweep"
    cells = cells_of(grid, sweep)
    errors = run_sweep(cells, sweep, args.jobs)
    write_sweep(cells, errors, sweep)
    summary = summarise(cells, depth_of)
    device = device_label(args.device)
    stem = results_stem(args.results_dir, "prefix_depth", device, args.tag)
    settings = {k: v for k, v in vars(args).items() if k not in ("tag", "results_dir")}
    failed = {name: e for name, e in errors.items() if e}
    write_json(stem.with_suffix(".json"), {"device": device, "settings": settings,
                                           "summary": summary, "failed": failed})  # fmt: skip
    stem.with_suffix(".md").write_text(table(summary))
    plot(summary, stem.with_suffix(".png"))
    print(table(summary))
    print(f"wrote {stem}.json, .md and .png")


if __name__ == "__main__":
    main()

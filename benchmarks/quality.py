"""Test quality of sft, msl and bear with the tiny model on an upstream dataset, over seeds.

For each seed and loss: train (model selection by validation NDCG@10), then the test metrics of
that one epoch. Reports mean ± std over seeds of NDCG@5/10, HR@5/10, PR@5/10 and the violation
share, in results/quality_<name>_tiny_<device>.json and a markdown table (.md) beside it.

    python benchmarks/quality.py --data ../shared/data/amazon/Office --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from _common import add_results_args, device_label, results_stem, write_json

from bear.config import TrainConfig
from bear.train import train

KEYS = ("ndcg@5", "ndcg@10", "hr@5", "hr@10", "pr@5", "pr@10", "violation_share")


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict[str, list[float]]]:
    """loss -> metric -> [mean, std] over seeds (std 0 for a single seed)."""
    out = {}
    for loss, metrics in runs.items():
        out[loss] = {}
        for k in KEYS:
            xs = [m["test"][k] for m in metrics]
            out[loss][k] = [statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0]
    return out


def table(summary: dict, n_seeds: int) -> str:
    head = "| loss | " + " | ".join(KEYS) + " |"
    lines = [head, "|" + " --- |" * (len(KEYS) + 1)]
    for loss, row in summary.items():
        cells = [f"{m:.4f} ± {s:.4f}" for m, s in (row[k] for k in KEYS)]
        lines.append(f"| {loss} | " + " | ".join(cells) + " |")
    return (
        "\n".join(lines)
        + f"\n\nmean ± std over {n_seeds} seeds, test split, best epoch by validation NDCG@10.\n"
    )


def write(args, stem: Path, name: str, device: str, runs: dict, wall: float) -> str:
    """Write stem.json and stem.md, the results of the runs finished so far; return the table."""
    done = {loss: ms for loss, ms in runs.items() if ms}
    summary = summarise(done)
    result = {
        "device": device,
        "data": name,
        "settings": {k: v for k, v in vars(args).items() if k not in ("tag", "results_dir")},
        "summary": summary,
        "seeds_done": {loss: len(ms) for loss, ms in done.items()},
        "runs": done,
        "wall_seconds": wall,
    }
    write_json(stem.with_suffix(".json"), result)
    md = table(summary, max(len(ms) for ms in done.values()))
    stem.with_suffix(".md").write_text(md)
    return md


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="dataset folder (upstream format)")
    p.add_argument("--out", default="runs/quality", help="folder for the training runs")
    p.add_argument("--losses", nargs="+", default=["sft", "msl", "bear"], help="losses")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run")
    p.add_argument("--limit-train", type=int, help="training rows (default all)")
    p.add_argument("--limit-eval", type=int, default=500, help="validation/test rows evaluated")
    p.add_argument("--max-history", type=int, default=10, help="history items per prompt")
    p.add_argument("--vocab-size", type=int, default=4096, help="tiny model's BPE vocabulary")
    p.add_argument("--batch-size", type=int, default=32, help="examples per optimiser step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    add_results_args(p)
    args = p.parse_args()
    name = Path(args.data).resolve().name.lower()
    device = device_label(args.device)
    stem = results_stem(args.results_dir, f"quality_{name}_tiny", device, args.tag)
    runs: dict[str, list[dict]] = {loss: [] for loss in args.losses}
    t0 = time.perf_counter()
    for seed in args.seeds:
        for loss in args.losses:
            cfg = TrainConfig(data=args.data, out=f"{args.out}/{name}_{loss}_s{seed}", loss=loss,
                              epochs=args.epochs, limit_train=args.limit_train,
                              limit_eval=args.limit_eval, max_history=args.max_history,
                              vocab_size=args.vocab_size, batch_size=args.batch_size, lr=args.lr,
                              seed=seed, device=args.device, overwrite=True,
                              progress=False)  # fmt: skip
            m = train(cfg)
            runs[loss].append(m)
            print(f"seed {seed} {loss}: test {json.dumps(m['test'])} best epoch {m['best_epoch']}"
                  f" ({time.perf_counter() - t0:.0f} s so far)", flush=True)  # fmt: skip
            # partial results too, after every run
            md = write(args, stem, name, device, runs, time.perf_counter() - t0)
    print(md)
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()

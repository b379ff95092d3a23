"""Test quality of sft, msl and bear (and sdpo, sdpo-bear) with the tiny model on an upstream
dataset, over seeds, under one or both protocols (``--protocols ours upstream``), labelled side
by side. The preference losses start (``--init``) from the sft run of their seed and protocol,
at ``--preference-lr``, as S-DPO's release trains from its SFT checkpoint.

For each seed, protocol and loss: train, then what the protocol reports — ours: the test metrics
of the epoch best on validation NDCG@10; upstream: the per-metric maximum over epochs on test.
Reports mean ± std over seeds of NDCG@5/10, HR@5/10, PR@5/10 and the violation share (upstream:
HR/NDCG only), in results/quality_<name>_tiny_<device>.json and a markdown table (.md) beside it.

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
from bear.losses import get_loss
from bear.metrics import TABLE_KEYS
from bear.train import train

KEYS = TABLE_KEYS + ("violation_share", "seconds_per_epoch")


def reported(metrics: dict) -> dict:
    """The test metrics a protocol reports: ours, the epoch chosen on validation; upstream, the
    per-metric maximum over epochs on test (HR@K, NDCG@K only: PR@K and the violation share
    are not maxima the paper reports, so they are absent); with the seconds per epoch."""
    per_epoch = {"seconds_per_epoch": metrics["seconds_per_epoch"]}
    if metrics["protocol"] == "upstream":
        return metrics["test_max"] | per_epoch
    return metrics["test"] | per_epoch


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict[str, list[float] | None]]:
    """label -> metric -> [mean, std] over seeds (std 0 for a single seed); None where no run
    reports a number (a null metric, or one the protocol does not report)."""
    out = {}
    for label, metrics in runs.items():
        out[label] = {}
        for k in KEYS:
            xs = [v for m in metrics if (v := reported(m).get(k)) is not None]
            out[label][k] = (
                [statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0] if xs else None
            )
    return out


def _cell(key: str, mean: float, std: float) -> str:
    return f"{mean:.1f} ± {std:.1f}" if key == "seconds_per_epoch" else f"{mean:.4f} ± {std:.4f}"


def table(summary: dict, n_seeds: int) -> str:
    head = "| protocol | loss | " + " | ".join(KEYS) + " |"
    lines = [head, "|" + " --- |" * (len(KEYS) + 2)]
    for label, row in summary.items():
        protocol, loss = label.split("/")
        cells = ["-" if row[k] is None else _cell(k, *row[k]) for k in KEYS]
        lines.append(f"| {protocol} | {loss} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + (
        f"\n\nmean ± std over {n_seeds} seed(s), test split. ours: the epoch with the best "
        "validation NDCG@10. upstream: the per-metric maximum over epochs on test (the paper's "
        "rule; HR/NDCG only). The two rows of a loss are different protocols, not comparable.\n"
    )


def write(args, stem: Path, name: str, device: str, runs: dict, wall: float) -> str:
    """Write stem.json and stem.md, the results of the runs finished so far; return the table."""
    done = {label: ms for label, ms in runs.items() if ms}
    summary = summarise(done)
    result = {
        "device": device,
        "data": name,
        "settings": {k: v for k, v in vars(args).items() if k not in ("tag", "results_dir")},
        "summary": summary,
        "seeds_done": {label: len(ms) for label, ms in done.items()},
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
    p.add_argument("--protocols", nargs="+", default=["ours"], choices=["ours", "upstream"],
                   help="protocols, each reported under its name (bear/protocol.py)")  # fmt: skip
    p.add_argument("--upstream-test-file",
                   help="test CSV for the upstream protocol where the folder has no "
                        "test_5000.csv (Office: test.csv)")  # fmt: skip
    p.add_argument("--hidden-size", type=int, default=128, help="tiny model width")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run")
    p.add_argument("--limit-train", type=int, help="training rows (default all)")
    p.add_argument("--limit-eval", type=int, default=500, help="validation/test rows evaluated")
    p.add_argument("--max-history", type=int, default=10, help="history items per prompt")
    p.add_argument("--vocab-size", type=int, default=4096, help="tiny model's BPE vocabulary")
    p.add_argument("--batch-size", type=int, default=32, help="examples per optimiser step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument(
        "--preference-lr",
        type=float,
        help="peak learning rate of sdpo / sdpo-bear, which start from the sft run of "
        "their seed (default: --lr / 10, S-DPO's recipe: 1e-5 after SFT at 1e-4)",
    )
    p.add_argument("--negatives", type=int, default=3, help="negatives per example (S-DPO: 3)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    add_results_args(p)
    args = p.parse_args()
    preference = [loss for loss in args.losses if get_loss(loss).needs_reference]
    if preference and "sft" not in args.losses[: args.losses.index(preference[0])]:
        p.error(f"--losses: {preference[0]} starts from the sft run of its seed: list sft first")
    name = Path(args.data).resolve().name.lower()
    device = device_label(args.device)
    stem = results_stem(args.results_dir, f"quality_{name}_tiny", device, args.tag)
    runs: dict[str, list[dict]] = {
        f"{p}/{loss}": [] for p in args.protocols for loss in args.losses
    }
    t0 = time.perf_counter()
    for seed in args.seeds:
        for protocol in args.protocols:
            test_file = args.upstream_test_file if protocol == "upstream" else None
            for loss in args.losses:
                out = f"{args.out}/{name}_{protocol}_{loss}_s{seed}"
                start = {}
                if loss in preference:  # S-DPO's recipe: from the sft run, at a lower rate
                    start = {"init": f"{args.out}/{name}_{protocol}_sft_s{seed}",
                             "lr": args.preference_lr or args.lr / 10,
                             "negatives": args.negatives}  # fmt: skip
                settings = dict(test_file=test_file, epochs=args.epochs,
                                limit_train=args.limit_train, limit_eval=args.limit_eval,
                                max_history=args.max_history, vocab_size=args.vocab_size,
                                hidden_size=args.hidden_size, batch_size=args.batch_size,
                                lr=args.lr, seed=seed, device=args.device, overwrite=True,
                                progress=False) | start  # fmt: skip
                cfg = TrainConfig(data=args.data, out=out, loss=loss, protocol=protocol, **settings)
                m = train(cfg)
                runs[f"{protocol}/{loss}"].append(m)
                print(f"seed {seed} {protocol} {loss}: reported {json.dumps(reported(m))}"
                      f" ({time.perf_counter() - t0:.0f} s so far)", flush=True)  # fmt: skip
                # partial results too, after every run
                md = write(args, stem, name, device, runs, time.perf_counter() - t0)
    print(md)
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()

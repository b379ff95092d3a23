"""Test quality of sft, msl and bear fine-tuned from SmolLM2-135M-Instruct (LoRA) on real data.

For each loss: ``bear train --model smollm2-135m`` (the paper's LoRA: r 8, alpha 16, dropout 0.05
on q_proj, v_proj; lr 1e-4) for a fixed number of epochs without per-epoch validation (the last
epoch is tested: model selection by validation would multiply the evaluation cost on a CPU), then
the test split's first ``--limit-eval`` users: HR@5/10, NDCG@5/10 from the beam search (B = 10),
PR@5/10 from the beam and the exact top-10, each with its denominator and binomial standard error
sqrt(p (1 - p) / n) (for NDCG, whose per-user gains lie in [0, 1], this is an upper bound of the
standard error). The exact rank (``bear.decoding.count_above.count_items_above``: the items
beating the target, counted up to 10) feeds at most ``--exact-budget`` prefix tokens per user;
users it leaves undecided are in no PR (their number is reported, and the range PR@10 can take
over their unknown ranks: ``bear.metrics.pruning_rate_bounds``). Each loss records its budget and
the code (commit) that tested it. Writes results/quality_<data>_smollm2_<device>[_tag].json and .md.

    python benchmarks/quality_smollm2.py --data ../shared/data/amazon/Office --limit-train 2000
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import time
from pathlib import Path

import torch
from _common import add_results_args, device_label, results_stem, write_json

from bear.checkpoints import SMOLLM2
from bear.config import TrainConfig
from bear.evaluate import EvalSettings, evaluate_split
from bear.run import build_setup, load_weights, resolve_device
from bear.train import train

KEYS = ("hr@5", "hr@10", "ndcg@5", "ndcg@10", "pr@10")
DENOMINATOR = {"pr@10": "pr@10_count"}  # other metrics: all test users


def standard_errors(test: dict) -> dict[str, dict]:
    """metric -> {"value", "n", "se"}: the binomial standard error sqrt(p (1 - p) / n) with n the
    metric's denominator (value and se None when n is 0)."""
    out = {}
    for key in KEYS:
        p, n = test[key], test[DENOMINATOR.get(key, "users")]
        out[key] = {"value": p, "n": n, "se": math.sqrt(p * (1 - p) / n) if n else None}
    return out


def _cell(entry: dict) -> str:
    if entry["value"] is None:
        return "n/a"
    return f"{entry['value']:.4f} ± {entry['se']:.4f}"


def _range(test: dict) -> str:
    """PR@10's range over the undecided users' unknown exact ranks (``pr@10_low/high``)."""
    if "pr@10_low" not in test:  # tested before the bounds were reported
        return "n/a"
    low, high = (
        f"{x:.3f}" if x is not None else "n/a" for x in (test["pr@10_low"], test["pr@10_high"])
    )
    return f"[{low}, {high}]"


def table(results: dict[str, dict]) -> str:
    """Markdown: one row per loss, value ± standard error, PR@10's denominator and range."""
    head = ("| loss | " + " | ".join(KEYS)
            + " | PR@10 n | undecided | PR@10 range | train s | test s |")  # fmt: skip
    lines = [head, "|" + " --- |" * (len(KEYS) + 6)]
    for loss, r in results.items():
        se, test = r["with_se"], r["test"]
        cells = [_cell(se[k]) for k in KEYS]
        lines.append(f"| {loss} | " + " | ".join(cells) + f" | {se['pr@10']['n']} | "
                     f"{test['exact_undecided']} | {_range(test)} | {r['train_seconds']:.0f} | "
                     f"{r['test_seconds']:.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def code_version() -> str:
    """The checkout's commit, with "+changes" when tracked files differ from it."""
    root = Path(__file__).resolve().parent.parent
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                          capture_output=True).stdout.strip() or "unknown"  # fmt: skip
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=root).returncode != 0
    return head + ("+changes" if dirty else "")


def _test_last_epoch(cfg: TrainConfig, run: Path, device: torch.device) -> dict:
    """Full test metrics (with denominators) of the run's last checkpoint, at cfg.exact_budget."""
    setup = build_setup(cfg, run, fresh=False, device=device)
    model = setup.model.to(device)
    load_weights(
        model, torch.load(run / "last.pt", map_location=device, weights_only=False)["model"]
    )
    return evaluate_split(model, setup, "test", EvalSettings.from_config(cfg), device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="dataset folder (upstream format)")
    p.add_argument("--model", default=SMOLLM2, help="--model of bear train")
    p.add_argument("--out", default="runs/quality_smollm2", help="folder for the training runs")
    p.add_argument("--losses", nargs="+", default=["sft", "msl", "bear"], help="losses")
    p.add_argument("--seed", type=int, default=0, help="seed of LoRA init and data order")
    p.add_argument("--epochs", type=int, default=1, help="training epochs (the last is tested)")
    p.add_argument("--limit-train", type=int, help="training rows (default all)")
    p.add_argument("--limit-eval", type=int, default=1000, help="test users evaluated")
    p.add_argument("--max-history", type=int, default=10, help="history items per prompt")
    p.add_argument("--batch-size", type=int, default=16, help="examples per optimiser step")
    p.add_argument("--micro-batch-size", type=int, default=4, help="examples per forward")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    p.add_argument("--eval-batch-size", type=int, default=16, help="prompts per decoding batch")
    p.add_argument("--exact-budget", type=int, default=1024,
                   help="prefix tokens the exact rank's count may feed per test user")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="base weights (auto: bf16 where the device has native bf16)")  # fmt: skip
    p.add_argument("--retest", action="store_true",
                   help="test the runs of --losses in --out again (after a change of the "
                        "evaluation code) without training; their training figures come from the "
                        "results file this command wrote before (same --tag and --results-dir), "
                        "whose other losses are kept")  # fmt: skip
    add_results_args(p)
    args = p.parse_args()
    name = Path(args.data).resolve().name.lower()
    device = device_label(args.device)
    stem = results_stem(args.results_dir, f"quality_{name}_smollm2", device, args.tag)
    trained_before = {}
    if args.retest:
        if not stem.with_suffix(".json").is_file():
            raise SystemExit(f"--retest: {stem}.json not found; run without --retest first")
        trained_before = json.loads(stem.with_suffix(".json").read_text())["results"]
    results: dict[str, dict] = dict(trained_before)  # a retest replaces the losses it tests
    t0, code = time.perf_counter(), code_version()  # the code as it was when the run started
    for loss in args.losses:
        run = Path(args.out) / f"{name}_{loss}_s{args.seed}"
        cfg = TrainConfig(data=args.data, out=str(run), loss=loss, model=args.model,
                          epochs=args.epochs, limit_train=args.limit_train,
                          limit_eval=args.limit_eval, max_history=args.max_history,
                          batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                          lr=args.lr, eval_batch_size=args.eval_batch_size, seed=args.seed,
                          exact_budget=args.exact_budget, device=args.device, dtype=args.dtype,
                          overwrite=True, validate=False, progress=False)  # fmt: skip
        t_loss = time.perf_counter()
        if args.retest:
            if loss not in trained_before or not (run / "last.pt").is_file():
                raise SystemExit(f"--retest: no trained {loss} run in {run} or {stem}.json")
            trained = trained_before[loss]
        else:
            trained = train(cfg)
        t_test = time.perf_counter()
        test = _test_last_epoch(cfg, run, resolve_device(args.device))
        results[loss] = {"test": test, "with_se": standard_errors(test),
                         "seconds_per_epoch": trained["seconds_per_epoch"],
                         "train_seconds": trained.get("train_seconds", t_test - t_loss),
                         "test_seconds": time.perf_counter() - t_test,
                         "exact_budget": cfg.exact_budget, "code": code,
                         "retested": args.retest}  # fmt: skip
        print(f"{loss}: {table({loss: results[loss]}).splitlines()[-1]} "
              f"({time.perf_counter() - t0:.0f} s so far)", flush=True)  # fmt: skip
        # after every loss, so that a run cut short keeps what it measured
        partial = loss != args.losses[-1]
        write_json(stem.with_suffix(".json"), {
            "device": device,
            "data": name,
            "settings": {k: v for k, v in vars(args).items() if k not in ("tag", "results_dir")},
            "results": results,
            "wall_seconds": time.perf_counter() - t0,
            "partial": partial,
        })  # fmt: skip
        stem.with_suffix(".md").write_text(table(results))
    print(table(results))
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()

"""``python -m bear demo``: synth -> train sft, msl, bear on the tiny model -> table and plot.

Sized to finish in under 10 minutes on a 2-core CPU: a DEMO_USERS-user synthetic catalogue where
beam pruning matters (bear.synth), prompts of the last DEMO_HISTORY purchases, a 2-layer width-128
Llama, DEMO_EPOCHS epochs, and validation / test metrics (the test's PR@K needs the exact top-K
search) on the first DEMO_EVAL users of each split.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bear.config import TrainConfig
from bear.plots import plot_comparison
from bear.synth import SynthConfig, write_synth
from bear.train import train

__all__ = ["run_demo", "format_table", "DEMO_LOSSES"]

DEMO_LOSSES = ("sft", "msl", "bear")
DEMO_USERS = 500  # synthetic users (about 3,100 training rows)
DEMO_HISTORY = 5  # history items per prompt
DEMO_EPOCHS = 3  # enough for the tiny model to learn the synthetic catalogue
DEMO_EVAL = 150  # validation and test rows evaluated per run
TABLE_KEYS = ("ndcg@5", "ndcg@10", "hr@5", "hr@10", "pr@5", "pr@10")


def _cell(value, fmt: str) -> str:
    """A table cell of width 9; "n/a" for a null value (an empty denominator, SPEC §10)."""
    return f"{'n/a':>9}" if value is None else f"{value:>9{fmt}}"


def format_table(results: dict[str, dict]) -> str:
    """A plain-text table of test metrics per loss (PR: the share of pruned positives, lower is
    better); "n/a" where a metric has no cases (its count is 0 in metrics.json)."""
    head = f"{'loss':<8}" + "".join(f"{k:>9}" for k in TABLE_KEYS) + f"{'s/epoch':>9}"
    lines = [head, "-" * len(head)]
    for name, m in results.items():
        row = "".join(_cell(m["test"][k], ".4f") for k in TABLE_KEYS)
        lines.append(f"{name:<8}{row}{_cell(m['seconds_per_epoch'], '.1f')}")
    return "\n".join(lines)


def run_demo(args) -> dict[str, dict]:
    start = time.perf_counter()
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out}: exists and is not empty; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else out / "data"
    if not args.data:
        write_synth(data, SynthConfig(seed=args.seed, num_users=DEMO_USERS), overwrite=True)
        print(f"synthetic data: {data}", flush=True)
    results = {}
    for loss in DEMO_LOSSES:
        cfg = TrainConfig(
            data=str(data),
            out=str(out / loss),
            loss=loss,
            epochs=args.epochs or DEMO_EPOCHS,
            limit_eval=args.limit_eval or DEMO_EVAL,
            max_history=DEMO_HISTORY,
            seed=args.seed,
            overwrite=True,
            progress=not args.no_progress,
        )
        t0 = time.perf_counter()
        results[loss] = train(cfg)
        print(f"{loss}: trained and evaluated in {time.perf_counter() - t0:.0f} s", flush=True)
    table = format_table(results)
    tests = {loss: m["test"] for loss, m in results.items()}
    label = data.name if args.data else "synthetic data"
    png = plot_comparison(
        tests, out / "demo.png", title=f"test metrics, {label} (PR: lower is better)"
    )
    (out / "demo.json").write_text(json.dumps(results, indent=2))
    print()
    print(table)
    print(f"\nplot: {png}   runs: {out}/<loss>   total: {time.perf_counter() - start:.0f} s")
    return results

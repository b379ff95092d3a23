"""``python -m bear demo``: synth -> train sft, msl, bear on the tiny model -> table and plot.

Sized to finish in under 10 minutes on a 2-core CPU: a DEMO_USERS-user synthetic catalogue where
beam pruning matters (bear.synth), prompts of the last DEMO_HISTORY purchases, a 2-layer width-128
Llama, DEMO_EPOCHS epochs, and validation / test metrics (the test's PR@K needs the exact top-K
search) on the first DEMO_EVAL users of each split.

``--model smollm2-135m`` (or any checkpoint ``bear train`` accepts) runs the same comparison with
LoRA on a slice of Office (``--data``, default ``OFFICE``): the first CHECKPOINT_TRAIN training
rows, prompts of the last DEMO_HISTORY purchases, one epoch, CHECKPOINT_EVAL users per split,
the exact top-10 of PR@K bounded to CHECKPOINT_EXACT expansions per user (``--exact-budget``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bear.config import TrainConfig
from bear.metrics import TABLE_KEYS
from bear.plots import plot_comparison
from bear.synth import SynthConfig, write_synth
from bear.train import train

__all__ = ["run_demo", "format_table", "DEMO_LOSSES"]

DEMO_LOSSES = ("sft", "msl", "bear")
DEMO_USERS = 500  # synthetic users (about 3,100 training rows)
DEMO_HISTORY = 5  # history items per prompt
DEMO_EPOCHS = 3  # enough for the tiny model to learn the synthetic catalogue
DEMO_EVAL = 150  # validation and test rows evaluated per run
OFFICE = Path("../shared/data/amazon/Office")  # the checkpoint demo's default data (this project)
CHECKPOINT_TRAIN = 48  # training rows of the checkpoint demo
CHECKPOINT_BATCH = 8  # examples per optimiser step (6 steps)
CHECKPOINT_LR = 5e-4  # LoRA learning rate: a few steps must move the model
CHECKPOINT_EVAL = 16  # validation and test rows evaluated per run
# prefix expansions of the exact top-10 search per test row: a few steps of LoRA leave SmolLM2's
# scores flat over the catalogue, where the exact search of one row can take thousands
CHECKPOINT_EXACT = 256


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
    tiny = args.model == "tiny"
    data = Path(args.data) if args.data else (out / "data" if tiny else OFFICE)
    if not tiny and not data.is_dir():
        raise FileNotFoundError(
            f"--data {data}: not a folder; the --model {args.model} demo "
            "needs an upstream dataset folder such as Office"
        )
    out.mkdir(parents=True, exist_ok=True)
    if tiny and not args.data:
        write_synth(data, SynthConfig(seed=args.seed, num_users=DEMO_USERS), overwrite=True)
        print(f"synthetic data: {data}", flush=True)
    sizes = (
        {}
        if tiny
        else {
            "limit_train": CHECKPOINT_TRAIN,
            "batch_size": CHECKPOINT_BATCH,
            "lr": CHECKPOINT_LR,
            "exact_budget": CHECKPOINT_EXACT,
        }
    )
    results = {}
    for loss in DEMO_LOSSES:
        cfg = TrainConfig(
            data=str(data),
            out=str(out / loss),
            loss=loss,
            model=args.model,
            epochs=args.epochs or (DEMO_EPOCHS if tiny else 1),
            limit_eval=args.limit_eval or (DEMO_EVAL if tiny else CHECKPOINT_EVAL),
            max_history=DEMO_HISTORY,
            seed=args.seed,
            overwrite=True,
            progress=not args.no_progress,
            **sizes,
        )
        t0 = time.perf_counter()
        results[loss] = train(cfg)
        print(f"{loss}: trained and evaluated in {time.perf_counter() - t0:.0f} s", flush=True)
    table = format_table(results)
    tests = {loss: m["test"] for loss, m in results.items()}
    label = data.name if (args.data or not tiny) else "synthetic data"
    png = plot_comparison(
        tests, out / "demo.png", title=f"test metrics, {label}, {args.model} (PR: lower is better)"
    )
    (out / "demo.json").write_text(json.dumps(results, indent=2))
    print()
    print(table)
    print(f"\nplot: {png}   runs: {out}/<loss>   total: {time.perf_counter() - start:.0f} s")
    return results

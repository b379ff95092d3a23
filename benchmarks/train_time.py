"""Seconds per training epoch of every loss (sft, msl, bear, bear-upstream, beam-sim, sdpo,
sdpo-bear), side by side.

All run in one invocation on the same data, model and batch settings, with validation off
(`validate=False`), so the numbers are training time only. Each loss first runs a short warm-up
(a few optimiser steps, not timed) and then `--epochs` timed epochs; the preference losses start
(`--init`) from an sft run of the warm-up's length, trained once, untimed. Writes
results/train_time_<device>.json and .csv with the ratio to msl (the paper: bear/msl 1.003,
beam-sim/msl 4.45, S-DPO/MSL 4.6 (Fig. 9, 358 s against 78 on Toy)).

    python benchmarks/train_time.py                      # synthetic data, tiny model
    python benchmarks/train_time.py --data ../shared/data/amazon/Office --limit-train 2000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _common import add_results_args, device_label, results_stem, write_csv, write_json

from bear.config import TrainConfig
from bear.losses import get_loss, loss_names
from bear.synth import SynthConfig, write_synth
from bear.train import train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="dataset folder (default: a synthetic one)")
    p.add_argument("--losses", nargs="+", default=list(loss_names()), help="losses to time")
    p.add_argument("--epochs", type=int, default=1, help="timed epochs per loss")
    p.add_argument("--limit-train", type=int, default=1024, help="training rows per epoch")
    p.add_argument("--batch-size", type=int, default=32, help="examples per optimiser step")
    p.add_argument("--beam-width", type=int, default=10, help="B")
    p.add_argument("--max-history", type=int, default=10, help="history items per prompt")
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--model", default="tiny", help="--model of bear train (e.g. smollm2-135m)")
    p.add_argument("--micro-batch-size", type=int, help="examples per forward (default: batch)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    add_results_args(p)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bear_train_time_"))
    data = Path(args.data) if args.data else write_synth(work / "data", SynthConfig(seed=0))
    device = device_label(args.device)
    rows, start = [], None
    for loss in args.losses:
        common = dict(data=str(data), loss=loss, limit_train=args.limit_train,
                      batch_size=args.batch_size, beam_width=args.beam_width,
                      max_history=args.max_history, validate=False, progress=False,
                      device=args.device, overwrite=True, model=args.model,
                      micro_batch_size=args.micro_batch_size)  # fmt: skip
        if get_loss(loss).needs_reference:  # S-DPO starts from a trained policy (untimed)
            if start is None:
                start = work / "start"
                starting = common | {"loss": "sft", "max_steps": args.warmup_steps}
                train(TrainConfig(out=str(start), epochs=1, **starting))
            common["init"] = str(start)
        train(TrainConfig(out=str(work / f"warm_{loss}"), epochs=1, max_steps=args.warmup_steps,
                          **common))  # fmt: skip
        t0 = time.perf_counter()
        metrics = train(TrainConfig(out=str(work / loss), epochs=args.epochs, **common))
        wall = time.perf_counter() - t0
        rows.append({"loss": loss, "seconds_per_epoch": metrics["seconds_per_epoch"],
                     "wall_seconds": wall})  # fmt: skip
        print(f"{loss:>14}: {metrics['seconds_per_epoch']:.2f} s/epoch", flush=True)
    base = next((r["seconds_per_epoch"] for r in rows if r["loss"] == "msl"), None)
    for r in rows:
        r["ratio_to_msl"] = r["seconds_per_epoch"] / base if base else None
    result = {
        "device": device,
        "data": str(data) if args.data else "synthetic (bear.synth, seed 0)",
        "settings": {
            k: v for k, v in vars(args).items() if k not in ("data", "tag", "results_dir")
        },
        "torch": torch.__version__,
        "rows": rows,
        "paper": {"bear/msl": 1.003, "beam-sim/msl": 4.45, "sdpo/msl": 358 / 78},
    }
    stem = results_stem(args.results_dir, "train_time", device, args.tag)
    write_json(stem.with_suffix(".json"), result)
    columns = ["loss", "seconds_per_epoch", "ratio_to_msl", "wall_seconds"]
    write_csv(stem.with_suffix(".csv"), rows, columns)
    print(f"device: {device}\nwrote {stem}.json and .csv")


if __name__ == "__main__":
    main()

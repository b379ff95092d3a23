"""Where a training step's time goes with a real checkpoint: bear's step against the bare model.

On the first ``--rows`` training rows of a dataset (real prompts, real tokenizer), for each
precision of ``--precisions``, times back to back on the same collated micro-batches:

- ``bear step``: ``bear.train``'s micro-batch building (collate, trie masks) and
  ``accumulate_gradients`` (forward of the response positions, the loss, backward);
- ``bare fwd+bwd``: the model alone on the same padded tensors, ``logits.sum().backward()``;
- ``bare fwd``: the model's forward alone, without gradients (what evaluation runs).

Precisions: ``fp32`` (float32 weights), ``autocast`` (float32 weights under bf16 CPU autocast),
``bf16`` (bfloat16 base weights, float32 LoRA adapters). Each is timed ``--repeats`` times after one
untimed warm-up, interleaved, so a machine shared with other jobs slows all of them alike. A
``torch.profiler`` table of one bear step per precision (top ops by self CPU time) is written
beside the JSON (``.txt``).

    python benchmarks/step_profile.py --data ../shared/data/amazon/Office --model smollm2-135m
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from _common import add_results_args, device_label, results_stem, write_json
from torch.profiler import ProfilerActivity, profile

from bear.config import TrainConfig
from bear.losses import build_loss
from bear.run import build_setup
from bear.train_step import StepContext, accumulate_gradients, micro_batches

PRECISIONS = ("fp32", "autocast", "bf16")
TOP_OPS = 25  # rows of each profiler table


def _context(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "autocast" else nullcontext()


def _bare(model, micro, precision: str, grad: bool) -> None:
    with _context(precision), torch.set_grad_enabled(grad):
        for m in micro:
            batch = m.batch
            out = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                logits_to_keep=batch.width,
                use_cache=False,
            )
            if grad:
                out.logits.float().sum().backward()
    model.zero_grad(set_to_none=True)


def _bear(model, setup, idx, cfg, loss, precision: str) -> None:
    ctx = StepContext(model, setup.trie, torch.device("cpu"))
    micro = micro_batches(setup, idx, loss, ctx, cfg.micro_batch_size)
    with _context(precision):
        accumulate_gradients(ctx, micro, loss)
    model.zero_grad(set_to_none=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="dataset folder (upstream format)")
    p.add_argument("--model", default="smollm2-135m", help="--model of bear train (not tiny)")
    p.add_argument("--loss", default="bear", help="training loss")
    p.add_argument("--rows", type=int, default=4, help="examples per step (one micro-batch)")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats per precision")
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--max-history", type=int, default=10, help="history items per prompt")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    add_results_args(p)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bear_step_profile_"))
    cfg = TrainConfig(data=args.data, out=str(work), model=args.model, loss=args.loss,
                      limit_train=args.rows, batch_size=args.rows,
                      max_history=args.max_history, device="cpu", dtype="fp32")  # fmt: skip
    setup = build_setup(cfg, work, fresh=True)
    loss = build_loss(cfg.loss_settings())
    idx = list(range(args.rows))
    ctx = StepContext(setup.model, setup.trie, torch.device("cpu"))
    micro = micro_batches(setup, idx, loss, ctx, cfg.micro_batch_size)
    shape = tuple(micro[0].batch.input_ids.shape)
    real = int(micro[0].batch.attention_mask.sum())
    fp32_model = setup.model
    fp32_model.train()
    models = {"fp32": fp32_model, "autocast": fp32_model}
    if "bf16" in args.precisions:  # a second copy: base weights in bf16, adapters in fp32
        models["bf16"] = copy.deepcopy(fp32_model)
        for param in models["bf16"].parameters():
            if not param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
    cases = {
        "bear step": lambda m, pr: _bear(m, setup, idx, cfg, loss, pr),
        "bare fwd+bwd": lambda m, pr: _bare(m, micro, pr, grad=True),
        "bare fwd": lambda m, pr: _bare(m, micro, pr, grad=False),
    }
    times = {(c, pr): [] for c in cases for pr in args.precisions}
    for rep in range(args.repeats + 1):  # repeat 0: warm-up
        for pr in args.precisions:
            for case, fn in cases.items():
                t0 = time.perf_counter()
                fn(models[pr], pr)
                if rep:
                    times[case, pr].append(time.perf_counter() - t0)
                print(f"rep {rep} {pr:>8} {case:>13}: {time.perf_counter() - t0:.2f} s", flush=True)
    tables = []
    for pr in args.precisions:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            cases["bear step"](models[pr], pr)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=TOP_OPS)
        tables.append(f"## {pr}: one bear step, {shape} tokens ({real} real)\n{table}")
    rows = []
    for (case, pr), ts in times.items():
        rows.append({"case": case, "precision": pr, "seconds_median": statistics.median(ts),
                     "seconds": ts})  # fmt: skip
    device = device_label("cpu")
    result = {
        "device": device,
        "data": args.data,
        "model": args.model,
        "settings": {k: v for k, v in vars(args).items() if k not in ("tag", "results_dir")},
        "batch_shape": shape,
        "real_tokens": real,
        "torch": torch.__version__,
        "rows": rows,
    }
    stem = results_stem(args.results_dir, "step_profile", device, args.tag)
    write_json(stem.with_suffix(".json"), result)
    stem.with_suffix(".txt").write_text("\n\n".join(tables))
    for r in rows:
        print(f"{r['precision']:>8} {r['case']:>13}: {r['seconds_median']:.2f} s")
    print(f"wrote {stem}.json and .txt")


if __name__ == "__main__":
    main()

"""``python -m bear {synth,train,evaluate,demo}`` (SPEC §7)."""

from __future__ import annotations

import argparse
import json
import sys

from bear.losses import LOSSES

__all__ = ["main", "build_parser"]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bear",
        description="Beam-search-aware training (BEAR) of LLM recommenders.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic dataset in upstream's format")
    p.add_argument("--out", required=True, help="dataset folder to write")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--users", type=_positive, default=600, help="number of users (default 600)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")

    p = sub.add_parser("train", help="fine-tune, select the best epoch on validation, test it")
    p.add_argument("--data", required=True, help="dataset folder (upstream format)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, log, metrics.json)")
    p.add_argument("--loss", choices=LOSSES, default="bear", help="training loss (default bear)")
    p.add_argument(
        "--model",
        default="tiny",
        help="'tiny' (small Llama + BPE trained on the data, full fine-tuning) or a local "
        "Hugging Face checkpoint folder (LoRA r 8, alpha 16, dropout 0.05) (default tiny)",
    )
    p.add_argument("--epochs", type=_positive, default=3, help="training epochs (default 3)")
    p.add_argument("--max-steps", type=_positive, help="stop after this many optimiser steps")
    p.add_argument(
        "--limit-eval", type=_positive, help="evaluate on the first N validation and test rows"
    )
    p.add_argument("--limit-train", type=_positive, help="train on the first N training rows")
    p.add_argument("--seed", type=int, default=0, help="seed of model init and data order")
    p.add_argument("--beam-width", type=_positive, default=10, help="beam width B (default 10)")
    p.add_argument("--reg-weight", type=float, default=1.0, help="λ of the regulariser (default 1)")
    p.add_argument(
        "--reg-temperature", type=float, default=1.0, help="ξ of the regulariser (default 1)"
    )
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-3 tiny, 1e-4 LoRA)")
    p.add_argument("--batch-size", type=_positive, default=32, help="examples per optimiser step")
    p.add_argument(
        "--micro-batch-size",
        type=_positive,
        help="examples per forward pass; gradients accumulate to --batch-size (default: same)",
    )
    p.add_argument("--max-history", type=_positive, default=10, help="history items per prompt")
    p.add_argument("--train-file", default="train.csv", help="training CSV inside --data")
    p.add_argument("--test-file", default="test.csv", help="test CSV inside --data")
    p.add_argument("--vocab-size", type=_positive, default=2048, help="tiny model's BPE size")
    p.add_argument("--hidden-size", type=_positive, default=128, help="tiny model width")
    p.add_argument("--num-layers", type=_positive, default=2, help="tiny model decoder blocks")
    p.add_argument(
        "--lora-targets",
        nargs="+",
        default=["q_proj", "v_proj"],
        help="LoRA target modules for a checkpoint model (default q_proj v_proj)",
    )
    p.add_argument("--eval-batch-size", type=_positive, default=32, help="prompts per decode")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--overwrite", action="store_true", help="reuse a non-empty run folder")
    p.add_argument("--resume", action="store_true", help="continue from RUN/last.pt")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--no-eval", action="store_true", help="skip validation and test (timing runs)")

    p = sub.add_parser("evaluate", help="recompute RUN/metrics.json from a saved run")
    p.add_argument("--run", required=True, help="run folder written by train")
    p.add_argument("--limit-eval", type=_positive, help="evaluate on the first N rows")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")

    p = sub.add_parser("demo", help="synth, train sft/msl/bear, evaluate, print a table, plot")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the models")
    p.add_argument("--epochs", type=_positive, help="training epochs (default: the demo's)")
    p.add_argument("--data", help="use this dataset folder instead of the synthetic one")
    p.add_argument("--limit-eval", type=_positive, help="evaluate on the first N rows")
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo folder")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; input errors (bad data, run-folder conflicts) print one line, exit 2."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"bear {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.command == "synth":
        from bear.synth import SynthConfig, write_synth

        out = write_synth(
            args.out, SynthConfig(seed=args.seed, num_users=args.users), args.overwrite
        )
        print(f"wrote {out}")
    elif args.command == "train":
        from bear.train import TrainConfig, train

        cfg = TrainConfig(
            data=args.data,
            out=args.out,
            loss=args.loss,
            model=args.model,
            epochs=args.epochs,
            max_steps=args.max_steps,
            limit_eval=args.limit_eval,
            limit_train=args.limit_train,
            seed=args.seed,
            beam_width=args.beam_width,
            reg_weight=args.reg_weight,
            reg_temperature=args.reg_temperature,
            lr=args.lr,
            batch_size=args.batch_size,
            micro_batch_size=args.micro_batch_size,
            max_history=args.max_history,
            train_file=args.train_file,
            test_file=args.test_file,
            vocab_size=args.vocab_size,
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            lora_targets=tuple(args.lora_targets),
            eval_batch_size=args.eval_batch_size,
            device=args.device,
            overwrite=args.overwrite,
            resume=args.resume,
            progress=not args.no_progress,
            validate=not args.no_eval,
        )
        metrics = train(cfg)
        print(json.dumps(metrics, indent=2))
    elif args.command == "evaluate":
        from bear.evaluate import evaluate_run

        print(json.dumps(evaluate_run(args.run, args.limit_eval, args.device), indent=2))
    else:
        from bear.demo import run_demo

        run_demo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

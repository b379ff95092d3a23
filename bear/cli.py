"""``python -m bear {synth,train,evaluate,demo}`` (SPEC §7)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import types
import typing
from pathlib import Path

from bear.config import EVALUATION_FIELDS, TrainConfig, field_choices, flag_name
from bear.protocol import PROTOCOLS
from bear.stopping import Stopped
from bear.sweep import SWEEP_MANAGED

__all__ = ["main", "build_parser", "add_config_flags", "config_from_args"]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _default_text(value) -> str:
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value)
    return str(value)


def _cli_fields(config_cls, names=None) -> list[dataclasses.Field]:
    fields = [f for f in dataclasses.fields(config_cls) if f.metadata.get("cli", True)]
    return fields if names is None else [f for f in fields if f.name in names]


def add_config_flags(
    parser: argparse.ArgumentParser,
    config_cls,
    names=None,
    defaults_from_run: bool = False,
    several: bool = False,
) -> None:
    """One flag per field of a config dataclass, from the field's name, type, default and metadata.

    ``--field-name`` (or ``metadata["flag"]``) stores into ``field_name``. A field without a
    default is required; ``X | None`` parses as X; ``tuple[X, ...]`` takes one or more values;
    ``bool`` is a switch that flips the default; ``metadata["positive"]`` parses an integer >= 1;
    ``metadata["choices"]`` restricts the values. The help text is ``metadata["help"]`` with the
    default appended (where it is not None). Fields with ``metadata["cli"] = False`` get no flag.
    ``names``: only these fields. ``defaults_from_run``: a flag not given leaves its field out
    of the parsed arguments (the run's saved value stands), and the help says so. ``several``:
    every flag but the switches and the tuple ones takes one or more values (a list; a sweep's
    axes).
    """
    hints = typing.get_type_hints(config_cls)
    for f in _cli_fields(config_cls, names):
        flag = flag_name(f)
        kind = hints[f.name]
        unset = {"default": argparse.SUPPRESS} if defaults_from_run else {}
        if kind is bool:
            action = "store_false" if f.default else "store_true"
            help_text = f.metadata["help"] + (" (default: the run's)" if defaults_from_run else "")
            parser.add_argument(flag, dest=f.name, action=action, help=help_text, **unset)
            continue
        if isinstance(kind, types.UnionType):  # X | None
            (kind,) = [k for k in typing.get_args(kind) if k is not type(None)]
        options = {"dest": f.name, "help": f.metadata["help"]}
        if typing.get_origin(kind) is tuple:  # tuple[X, ...]
            kind, options["nargs"] = typing.get_args(kind)[0], "+"
        elif several:
            options["nargs"] = "+"
            options["help"] += " (several values: an axis of the grid)"
        options["type"] = _positive if f.metadata.get("positive") else kind
        choices = field_choices(f)
        if choices is not None:
            options["choices"] = choices
        if defaults_from_run:
            options.update(unset, help=options["help"] + " (default: the run's)")
        elif f.default is dataclasses.MISSING:
            options["required"] = True
        else:
            options["default"] = f.default
            if f.default not in (None, ()):
                options["help"] += f" (default {_default_text(f.default)})"
        parser.add_argument(flag, **options)


def config_from_args(config_cls, args: argparse.Namespace):
    """The config dataclass built from the flags ``add_config_flags`` added (other fields keep
    their defaults)."""
    return config_cls(**{f.name: getattr(args, f.name) for f in _cli_fields(config_cls)})


def program() -> str:
    """How this process was started, for usage lines and messages: ``python -m bear`` or the
    console script's name (``bear``)."""
    started = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return "python -m bear" if started in ("", "__main__.py", "-c") else started


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program(),
        description="Beam-search-aware training (BEAR) of LLM recommenders.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic dataset in upstream's format")
    p.add_argument("--out", required=True, help="dataset folder to write")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--users", type=_positive, default=600, help="number of users (default 600)")
    p.add_argument(
        "--shared-words",
        type=int,
        default=0,
        help="words every title of a (brand, category) or niche maker shares after its first "
        "word: titles branch that much deeper (default 0)",
    )
    p.add_argument(
        "--lines-per-brand",
        type=_positive,
        default=3,
        help="product lines per (brand, category): how wide those prefixes branch (default 3)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the files of a dataset synth wrote there (other files stay)",
    )

    p = sub.add_parser("train", help="fine-tune, select the best epoch on validation, test it")
    add_config_flags(p, TrainConfig)

    p = sub.add_parser(
        "sweep",
        help="a grid of train runs: any train flag given several values is an axis",
        description="Every train flag; one given several values is an axis of the grid. Each "
        "cell is a run folder under --out; OUT/sweep.csv and sweep.json hold one row per cell, "
        "OUT/sweep_*.png the plots. Finished cells are skipped and killed ones resumed when the "
        "same command runs again; a failed cell is recorded with its error.",
    )
    p.add_argument("--out", required=True, help="sweep folder: one run folder per cell")
    p.add_argument("--jobs", type=_positive, default=1, help="cells run at once (default 1)")
    sweep_fields = [f.name for f in _cli_fields(TrainConfig) if f.name not in SWEEP_MANAGED]
    add_config_flags(p, TrainConfig, sweep_fields, several=True)

    p = sub.add_parser("evaluate", help="recompute RUN/metrics.json from a saved run")
    p.add_argument("--run", required=True, help="run folder written by train")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--protocol",
        choices=tuple(PROTOCOLS),
        help="the run's protocol (the default); another one is refused: train again",
    )
    add_config_flags(p, TrainConfig, EVALUATION_FIELDS, defaults_from_run=True)

    p = sub.add_parser("demo", help="synth, train sft/msl/bear, evaluate, print a table, plot")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the models")
    p.add_argument("--epochs", type=_positive, help="training epochs (default: the demo's)")
    p.add_argument("--data", help="use this dataset folder instead of the synthetic one")
    p.add_argument(
        "--model",
        default="tiny",
        help="tiny (default) or a checkpoint as for train, e.g. smollm2-135m: LoRA on an Office "
        "slice (--data, default ../shared/data/amazon/Office)",
    )
    p.add_argument("--limit-eval", type=_positive, help="evaluate on the first N rows")
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo folder")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; errors that name their cause (bad input or flag, run-folder conflicts,
    unreadable files, a non-finite training loss) print one line and exit 2."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (ValueError, OSError, FloatingPointError) as exc:
        print(f"bear {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Stopped as exc:
        given = list(sys.argv[1:] if argv is None else argv)
        again = given + ([] if args.command != "train" or "--resume" in given else ["--resume"])
        print(
            f"bear {args.command}: {exc}; continue with: {program()} {shlex.join(again)}",
            file=sys.stderr,
        )
        return 128 + exc.signum


def _run(args) -> int:
    # Each command imports what it runs, so that --help and synth do not load the model stack.
    if args.command == "synth":
        from bear.synth import SynthConfig, write_synth

        out = write_synth(
            args.out,
            SynthConfig(
                seed=args.seed,
                num_users=args.users,
                shared_words=args.shared_words,
                lines_per_brand=args.lines_per_brand,
            ),
            args.overwrite,
        )
        print(f"wrote {out}")
    elif args.command == "train":
        from bear.distributed import close_distributed
        from bear.train import train

        cfg = config_from_args(TrainConfig, args)
        metrics = train(cfg)
        close_distributed()
        if int(os.environ.get("RANK", "0")) == 0:  # one launch, one report (torchrun, accelerate)
            print(json.dumps(metrics, indent=2))
    elif args.command == "sweep":
        return _sweep(args)
    elif args.command == "evaluate":
        from bear.evaluate import evaluate_run

        changes = {k: v for k, v in vars(args).items() if k in EVALUATION_FIELDS}
        if args.protocol is not None:
            changes["protocol"] = args.protocol
        metrics = evaluate_run(args.run, changes, args.device)
        print(json.dumps(metrics, indent=2))
    else:
        from bear.demo import run_demo

        run_demo(args)
    return 0


def _sweep(args) -> int:
    """Run the grid, write its table and plots; exit 1 when a cell failed (recorded), else 0."""
    from bear.sweep import cells_of, run_sweep
    from bear.sweep_report import write_sweep

    out = Path(args.out)
    fields = [f.name for f in _cli_fields(TrainConfig) if f.name not in SWEEP_MANAGED]
    values = {name: getattr(args, name) for name in fields}
    grid = {name: v if isinstance(v, list) else [v] for name, v in values.items()}
    cells = cells_of(grid, out)
    errors = run_sweep(cells, out, args.jobs)
    rows = write_sweep(cells, errors, out)
    failed = [r for r in rows if r["status"] == "failed"]
    print(f"sweep: {len(rows) - len(failed)} of {len(rows)} cells done; {out / 'sweep.csv'}")
    for row in failed:
        print(f"  failed {row['cell']}: {row['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

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

from bear.config import EVALUATION_FIELDS, FLAG_GROUPS, TrainConfig, field_choices, flag_name
from bear.config_file import read_config_file
from bear.protocol import PROTOCOLS
from bear.stopping import Stopped
from bear.sweep import SWEEP_MANAGED

__all__ = [
    "main",
    "build_parser",
    "parse_args",
    "add_config_flags",
    "config_from_args",
    "sweep_grid",
]


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
    defaults: dict | None = None,
    groups: dict[str, tuple[str, ...]] | None = None,
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
    axes). ``defaults``: values (a ``--config`` file's) that replace the fields' defaults; a
    required field given one is no longer required. ``groups``: group name -> field names, the
    sections of ``--help`` (a field in none raises ValueError).
    """
    hints = typing.get_type_hints(config_cls)
    defaults = defaults or {}
    sections = {}
    for f in _cli_fields(config_cls, names):
        target = parser if groups is None else _group_of(parser, groups, sections, f.name)
        flag = flag_name(f)
        kind = hints[f.name]
        default = defaults.get(f.name, f.default)
        unset = {"default": argparse.SUPPRESS} if defaults_from_run else {}
        if kind is bool:  # the flag sets the opposite of the field's default, whatever the file
            action = "store_false" if f.default else "store_true"
            help_text = f.metadata["help"] + (" (default: the run's)" if defaults_from_run else "")
            if f.name in defaults:
                unset = {"default": default}
                help_text += f" (--config {default})"
            target.add_argument(flag, dest=f.name, action=action, help=help_text, **unset)
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
        elif default is dataclasses.MISSING:
            options["required"] = True
        else:
            options["default"] = default
            if default not in (None, ()):
                source = "--config" if f.name in defaults else "default"
                options["help"] += f" ({source} {_default_text(default)})"
        target.add_argument(flag, **options)


def _group_of(parser, groups, sections, name):
    """The ``--help`` section of field ``name`` (made on first use, in ``groups``' order)."""
    if not sections:
        sections.update({title: parser.add_argument_group(title) for title in groups})
    for title, members in groups.items():
        if name in members:
            return sections[title]
    raise ValueError(f"add_config_flags: field {name!r} is in no group of {sorted(groups)}")


def config_from_args(config_cls, args: argparse.Namespace, base: dict | None = None):
    """The config dataclass built from the flags ``add_config_flags`` added; the fields without a
    flag take their value from ``base`` (a ``--config`` file's) or their default."""
    flags = {f.name: getattr(args, f.name) for f in _cli_fields(config_cls)}
    return config_cls(**{**(base or {}), **flags})


def program() -> str:
    """How this process was started, for usage lines and messages: ``python -m bear`` or the
    console script's name (``bear``)."""
    started = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return "python -m bear" if started in ("", "__main__.py", "-c") else started


CONFIG_HELP = (
    "a JSON object of settings keyed by their names (reg_weight for --reg-weight; the "
    "config.json of an earlier run works as one); flags given here override it"
)


def build_parser(config_values: dict | None = None) -> argparse.ArgumentParser:
    """The parser of every command; ``config_values`` (a ``--config`` file's, see
    ``bear.config_file``) become the defaults of train's and sweep's flags."""
    config_values = config_values or {}
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
    p.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    add_config_flags(p, TrainConfig, defaults=config_values, groups=FLAG_GROUPS)

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
    p.add_argument(
        "--config",
        metavar="FILE",
        help=CONFIG_HELP + "; a list is an axis; out, overwrite and resume are the sweep's",
    )
    add_config_flags(
        p, TrainConfig, _sweep_fields(), several=True, defaults=config_values, groups=FLAG_GROUPS
    )

    p = sub.add_parser("evaluate", help="recompute RUN/metrics.json from a saved run")
    p.add_argument("--run", required=True, help="run folder written by train")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--protocol",
        choices=tuple(PROTOCOLS),
        help="the run's protocol (the default); another one is refused: train again",
    )
    add_config_flags(p, TrainConfig, EVALUATION_FIELDS, defaults_from_run=True, groups=FLAG_GROUPS)

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


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The parsed command line; train's and sweep's ``--config FILE`` values are the defaults
    of their flags and sit in ``args.config_values`` (``{}`` without a file). Raises ValueError
    for a bad config file (``read_config_file``); argparse exits on a bad flag."""
    values = _config_file_values(argv)
    args = build_parser(values).parse_args(argv)
    args.config_values = values
    return args


def main(argv: list[str] | None = None) -> int:
    """Run one command; errors that name their cause (bad input or flag, run-folder conflicts,
    unreadable files, a non-finite training loss) print one line and exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except ValueError as exc:
        print(f"bear {argv[0]}: error: {exc}", file=sys.stderr)
        return 2
    try:
        return _run(args)
    except (ValueError, OSError, FloatingPointError) as exc:
        print(f"bear {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Stopped as exc:
        again = argv + ([] if args.command != "train" or "--resume" in argv else ["--resume"])
        print(
            f"bear {args.command}: {exc}; continue with: {program()} {shlex.join(again)}",
            file=sys.stderr,
        )
        return 128 + exc.signum


def _config_file_values(argv: list[str]) -> dict:
    """The settings of train's or sweep's ``--config FILE`` (``{}`` without one); a sweep's
    own keys (out, overwrite, resume) are left out. Raises ValueError (``read_config_file``)."""
    if not argv or argv[0] not in ("train", "sweep"):
        return {}
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    path = pre.parse_known_args(argv[1:])[0].config
    if path is None:
        return {}
    values = read_config_file(path, TrainConfig, axes=argv[0] == "sweep")
    if argv[0] == "sweep":
        values = {k: v for k, v in values.items() if k not in SWEEP_MANAGED}
    return values


def _sweep_fields() -> list[str]:
    """The train flags a sweep takes (all but those it sets per cell)."""
    return [f.name for f in _cli_fields(TrainConfig) if f.name not in SWEEP_MANAGED]


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

        cfg = config_from_args(TrainConfig, args, args.config_values)
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


def sweep_grid(args: argparse.Namespace) -> dict[str, list]:
    """Field -> its values in the grid, from sweep's parsed flags over its ``--config`` file's
    values: a list is an axis; a tuple field (``--lora-targets q_proj v_proj``) is one value."""
    hints = typing.get_type_hints(TrainConfig)
    values = {**args.config_values, **{name: getattr(args, name) for name in _sweep_fields()}}
    grid = {}
    for name, value in values.items():
        if typing.get_origin(hints[name]) is tuple:
            grid[name] = [tuple(value)]
        else:
            grid[name] = value if isinstance(value, list) else [value]
    return grid


def _sweep(args) -> int:
    """Run the grid, write its table and plots; exit 1 when a cell failed (recorded), else 0."""
    from bear.sweep import cells_of, run_sweep
    from bear.sweep_report import write_sweep

    out = Path(args.out)
    cells = cells_of(sweep_grid(args), out)
    errors = run_sweep(cells, out, args.jobs)
    rows = write_sweep(cells, errors, out)
    failed = [r for r in rows if r["status"] == "failed"]
    print(f"sweep: {len(rows) - len(failed)} of {len(rows)} cells done; {out / 'sweep.csv'}")
    for row in failed:
        print(f"  failed {row['cell']}: {row['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

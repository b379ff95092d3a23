"""The real-model study: sft, msl and bear on SmolLM2-135M-Instruct (LoRA), trained until the
validation loss stops falling, tested under both scorings, length penalty 0 and 1, the user's
history kept and excluded, with paired differences and their standard errors.

Per seed and loss, one training run (``bear train`` with ``--eval-every`` checks of the
teacher-forced validation loss, ``--early-stopping`` on it, a cap of ``--epochs``), then the weights
of its best check (RUN/best_check.pt) are tested on the first ``--limit-eval`` test users in three
evaluations, each under both scorings. A seed trains all its losses first, then runs each
evaluation across the losses in the order below, so a study stopped early has a0 for every loss:

    a0        length penalty 0, history kept: HR, NDCG, PR@K (exact ranks), and the share of
              users whose target fails the necessary condition (3.2): a target token outside
              the top-B of its trie siblings (Δ > 0), which a width-B beam search must prune
    a1        length penalty 1 (upstream's generate): HR, NDCG
    a0_excl   length penalty 0, each user's history items excluded: HR, NDCG

Every step is resumable: a run that finished is not trained again, a run that was killed resumes
from its RUN/last.pt, an evaluation whose per-user file exists (RUN/study/<name>.json) is not
repeated. Kill it and start it again as often as needed; the results file says what is missing.
Writes results/study_<data>_smollm2_<device>[_tag].{json,md} and a plot of the learning curves
(..._curves.png): per-user ranks stay in the run folders.

    nice python benchmarks/study_smollm2.py --data ../shared/data/amazon/Office --seeds 0 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from _common import add_results_args, device_label, results_stem, write_json  # noqa: E402

from bear.checkpoints import SMOLLM2  # noqa: E402
from bear.config import TrainConfig  # noqa: E402
from bear.evaluate import EvalSettings, RowResults, evaluate_rows  # noqa: E402
from bear.plots import read_log  # noqa: E402
from bear.run import build_setup, load_weights, resolve_device  # noqa: E402
from bear.run_folder import MARKER, read_checkpoint  # noqa: E402
from bear.train import train  # noqa: E402

# name -> (length penalty α, history excluded, exact ranks)
EVALUATIONS = {"a0": (0.0, False, True), "a1": (1.0, False, False), "a0_excl": (0.0, True, False)}
SCORINGS = ("before", "after")
K = 10  # the cut-off of the reported metrics


def _train(cfg: TrainConfig) -> None:
    """Train the run, or let it be: finished (metrics.json), or resumed (its folder exists)."""
    run = Path(cfg.out)
    if (run / "metrics.json").is_file():
        return
    train(dataclasses.replace(cfg, resume=(run / MARKER).is_file()))


def _weights(run: Path) -> Path:
    """The checkpoint the study tests: the best validation check's, else the last weights."""
    best = run / "best_check.pt"
    return best if best.is_file() else run / "last.pt"


def _per_user(rows: RowResults) -> dict:
    """What the study keeps of an evaluation per user: ranks per scoring (and exact ranks)."""
    out = {"near_copy": rows.near_copy.tolist(), "violated": rows.violated.tolist()}
    for scoring in rows.ranks:
        out[f"rank/{scoring}"] = rows.ranks[scoring].tolist()
        if rows.full:
            out[f"exact/{scoring}"] = rows.exact[scoring].tolist()
    return out


def _evaluate(cfg: TrainConfig, device, name: str) -> dict:
    """The per-user results of one evaluation of the run (computed if its file is missing);
    the run's coverage file is written beside it the first time."""
    folder = Path(cfg.out) / "study"
    folder.mkdir(exist_ok=True)
    done, coverage = folder / f"{name}.json", folder / "coverage.json"
    if not (done.is_file() and coverage.is_file()):
        setup = build_setup(cfg, Path(cfg.out), fresh=False, device=device)
        write_json(coverage, _coverage(setup, cfg.limit_eval))
    if not done.is_file():
        model = setup.model.to(device)
        checkpoint = _weights(Path(cfg.out))
        load_weights(model, read_checkpoint(checkpoint)["model"], source=str(checkpoint))
        alpha, excluded, full = EVALUATIONS[name]
        settings = dataclasses.replace(
            EvalSettings.from_config(cfg),
            both_scorings=True,
            progress=True,
            length_penalty=alpha,
            exclude_history=excluded,
        )
        t0 = time.perf_counter()
        rows = evaluate_rows(model, setup, "test", settings, device, full=full)
        record = _per_user(rows) | {
            "checkpoint": checkpoint.name,
            "seconds": time.perf_counter() - t0,
        }
        write_json(done, record)
    return json.loads(done.read_text()) | {"coverage": json.loads(coverage.read_text())}


def _coverage(setup, limit: int) -> dict:
    """How many of the tested users' targets the model saw in training (as a target or in a
    history of its training rows): an item never seen is one it can only guess."""
    seen = {i for e in setup.data.train for i in (e.target, *e.history)}
    tested = setup.data.test[:limit]
    return {
        "test_users": len(tested),
        "target_seen_in_training": sum(e.target in seen for e in tested),
        "catalogue": len(setup.data.titles),
        "training_rows": len(setup.data.train),
    }


def _mean_se(xs: list[float]) -> dict:
    n = len(xs)
    if n == 0:
        return {"mean": None, "se": None, "n": 0}
    sd = statistics.stdev(xs) if n > 1 else 0.0
    return {"mean": statistics.fmean(xs), "se": sd / math.sqrt(n), "n": n}


def _over_users(per_seed: list[list[float]], keep: list[bool] | None = None) -> dict:
    """Mean ± SE with the test user as the unit: each user's value is averaged over the seeds
    first (every seed tests the same users, so their values are not independent draws), then
    the mean and its standard error over users (n = users); ``seeds`` holds each seed's mean.
    ``keep`` (per user) restricts it to some users."""
    users = [statistics.fmean(v) for v in zip(*per_seed, strict=True)]
    if keep is not None:
        users = [u for u, k in zip(users, keep, strict=True) if k]
        per_seed = [[v for v, k in zip(xs, keep, strict=True) if k] for xs in per_seed]
    seeds = [statistics.fmean(xs) if xs else None for xs in per_seed]
    return _mean_se(users) | {"seeds": seeds}


def _hits(ranks: list[int]) -> list[float]:
    return [float(0 <= r < K) for r in ranks]


def _gains(ranks: list[int]) -> list[float]:
    return [1 / math.log2(r + 2) if 0 <= r < K else 0.0 for r in ranks]


def _cells(results: dict) -> dict[str, dict]:
    """'loss|evaluation|scoring' -> HR@10 and NDCG@10 (mean ± SE over users, each user's value
    averaged over the seeds: ``_over_users``), PR@10 (pruned among the (seed, user) pairs whose
    target is in the exact top-10; ``exact_undecided`` counts the pairs whose exact rank the
    budget left undecided) and the near-copy split (a user's near copy does not depend
    on the seed)."""
    cells = {}
    for loss, seeds in results.items():
        for name in EVALUATIONS:
            for scoring in SCORINGS:
                done = [per_eval[name] for per_eval in seeds.values() if name in per_eval]
                if not done:
                    continue
                ranks = [e[f"rank/{scoring}"] for e in done]
                near = done[0]["near_copy"]
                cell = {
                    "hr@10": _over_users([_hits(r) for r in ranks]),
                    "ndcg@10": _over_users([_gains(r) for r in ranks]),
                }
                exact = [
                    (r, x)
                    for e, rs in zip(done, ranks, strict=True)
                    for r, x in zip(rs, e.get(f"exact/{scoring}", []), strict=False)
                ]  # (rank, exact rank) of every (seed, user) with exact ranks
                if exact:
                    cell["pr@10"] = _mean_se([float(b < 0) for b, x in exact if 0 <= x < K])
                    cell["exact_undecided"] = sum(x == -2 for _, x in exact)
                for label, keep in (("near_copy", True), ("not_near_copy", False)):
                    chosen = [c == keep for c in near]
                    cell[f"hr@10/{label}"] = _over_users([_hits(r) for r in ranks], chosen)
                if EVALUATIONS[name][2]:  # Δ of every target token computed (either scoring)
                    cell["violated"] = _over_users(_violated(done))
                cells[f"{loss}|{name}|{scoring}"] = cell
    return cells


# pairs of (loss, evaluation, scoring) compared user by user: the paper's direction (bear vs msl
# in its own scoring), the scoring each loss is decoded with, the length penalty, and sft against
# the rest
PAIRS = (
    (("bear", "a0", "before"), ("msl", "a0", "before")),
    (("bear", "a0", "after"), ("msl", "a0", "after")),
    (("sft", "a0", "after"), ("msl", "a0", "before")),
    (("sft", "a0", "after"), ("bear", "a0", "before")),
    (("sft", "a0", "after"), ("bear", "a0", "after")),
    (("msl", "a0", "after"), ("msl", "a0", "before")),
    (("bear", "a0", "after"), ("bear", "a0", "before")),
    (("sft", "a0", "after"), ("sft", "a0", "before")),
    (("bear", "a1", "before"), ("msl", "a1", "before")),
    (("bear", "a1", "after"), ("msl", "a1", "after")),
    (("sft", "a1", "after"), ("sft", "a0", "after")),
    (("msl", "a1", "before"), ("msl", "a0", "before")),
    (("bear", "a1", "before"), ("bear", "a0", "before")),
    (("sft", "a1", "after"), ("bear", "a1", "before")),
    (("bear", "a0_excl", "before"), ("msl", "a0_excl", "before")),
    (("sft", "a0_excl", "after"), ("msl", "a0_excl", "before")),
)


def _violated(done: list[dict]) -> list[list[float]]:
    """Per seed, per user: 1.0 where the target fails the necessary condition (3.2) (some token
    with Δ > 0), else 0.0."""
    return [[float(v) for v in e["violated"]] for e in done]


# losses compared user by user on the necessary condition (a0): what BEAR's regulariser targets
VIOLATION_PAIRS = (("bear", "msl"), ("bear", "sft"), ("msl", "sft"))


def _paired_violations(results: dict) -> list[dict]:
    """Per pair of losses, the mean per-user difference of "the target fails (3.2)" in a0 with
    its standard error (``_over_users``, seeds both have), over all users and over those whose
    target is not a near copy of a history title."""
    out = []
    for a, b in VIOLATION_PAIRS:
        seeds = sorted(
            seed
            for seed in set(results.get(a, {})) & set(results.get(b, {}))
            if "a0" in results[a][seed] and "a0" in results[b][seed]
        )
        if not seeds:
            continue
        va = _violated([results[a][seed]["a0"] for seed in seeds])
        vb = _violated([results[b][seed]["a0"] for seed in seeds])
        diff = [[x - y for x, y in zip(p, q, strict=True)] for p, q in zip(va, vb, strict=True)]
        near = results[a][seeds[0]]["a0"]["near_copy"]
        out.append(
            {
                "pair": f"{a} − {b}",
                "seeds": seeds,
                "violated": _over_users(diff),
                "violated/not_near_copy": _over_users(diff, [not c for c in near]),
            }
        )
    return out


def _paired(results: dict) -> list[dict]:
    """Per pair, the mean per-user difference of HR@10 and NDCG@10 with its standard error (the
    same test users under both; each user's difference averaged over the seeds both sides have:
    ``_over_users``), and of HR@10 over the users whose target is not a near copy of a history
    title ("rest": what copying cannot win)."""
    out = []
    for a, b in PAIRS:
        if a[0] not in results or b[0] not in results:
            continue
        seeds = sorted(
            seed
            for seed in set(results[a[0]]) & set(results[b[0]])
            if a[1] in results[a[0]][seed] and b[1] in results[b[0]][seed]
        )
        d_hit, d_gain = [], []
        for seed in seeds:
            ra = results[a[0]][seed][a[1]][f"rank/{a[2]}"]
            rb = results[b[0]][seed][b[1]][f"rank/{b[2]}"]
            d_hit.append([x - y for x, y in zip(_hits(ra), _hits(rb), strict=True)])
            d_gain.append([x - y for x, y in zip(_gains(ra), _gains(rb), strict=True)])
        if seeds:
            near = results[a[0]][seeds[0]][a[1]]["near_copy"]
            name = f"{'/'.join(a)} − {'/'.join(b)}"
            out.append(
                {
                    "pair": name,
                    "seeds": seeds,
                    "hr@10": _over_users(d_hit),
                    "ndcg@10": _over_users(d_gain),
                    "hr@10/not_near_copy": _over_users(d_hit, [not c for c in near]),
                }
            )
    return out


def _fmt(cell: dict | None, digits: int = 3) -> str:
    if not cell or cell["mean"] is None:
        return "n/a"
    return f"{cell['mean']:.{digits}f} ± {cell['se']:.{digits}f}"


def _each_seed(summary: dict, seeds: list[int]) -> str:
    return ", ".join(f"{seed}: {m:+.3f}" for seed, m in zip(seeds, summary["seeds"], strict=True))


def _table(cells: dict, paired: list[dict], violations: list[dict], missing: list[str]) -> str:
    lines = [
        # PR@10 and its counts are over the (seed, user) pairs: whether a user's target is in
        # the exact top-10 depends on the seed
        "| loss | evaluation | scoring | HR@10 | NDCG@10 | PR@10 | PR@10 n (seed, user) | "
        "undecided (seed, user) | HR@10 near copies | HR@10 rest | (3.2) fails |",
        "|" + " --- |" * 11,
    ]
    for key, c in cells.items():
        loss, name, scoring = key.split("|")
        pr = c.get("pr@10")
        lines.append(
            f"| {loss} | {name} | {scoring} | {_fmt(c['hr@10'])} | {_fmt(c['ndcg@10'])} | "
            f"{_fmt(pr)} | {pr['n'] if pr else '-'} | {c.get('exact_undecided', '-')} | "
            f"{_fmt(c['hr@10/near_copy'])} (n {c['hr@10/near_copy']['n']}) | "
            f"{_fmt(c['hr@10/not_near_copy'])} (n {c['hr@10/not_near_copy']['n']}) | "
            f"{_fmt(c['violated']) if 'violated' in c else '-'} |"
        )
    lines += [
        "",
        "| paired difference (per user) | ΔHR@10 of each seed | ΔHR@10 | ΔNDCG@10 | ΔHR@10 rest |",
        "| --- | --- | --- | --- | --- |",
    ]
    for p in paired:
        rest = p["hr@10/not_near_copy"]
        lines.append(
            f"| {p['pair']} | {_each_seed(p['hr@10'], p['seeds'])} | {_fmt(p['hr@10'])} | "
            f"{_fmt(p['ndcg@10'])} | {_fmt(rest)} (n {rest['n']}) |"
        )
    lines += [
        "",
        "| (3.2) fails, a0: paired difference (per user) | each seed | Δ share | Δ share rest |",
        "| --- | --- | --- | --- |",
    ]
    for v in violations:
        rest = v["violated/not_near_copy"]
        lines.append(
            f"| {v['pair']} | {_each_seed(v['violated'], v['seeds'])} | {_fmt(v['violated'])} | "
            f"{_fmt(rest)} (n {rest['n']}) |"
        )
    lines += ["", "Missing: " + ("; ".join(missing) if missing else "nothing") + "."]
    return "\n".join(lines) + "\n"


def _plot_curves(runs: dict[str, Path], out: Path) -> None:
    """The teacher-forced validation loss (check/loss) per step of every run, and its
    full-vocabulary cross-entropy (check/ce), one line per run."""
    fig, (ax_loss, ax_ce) = plt.subplots(1, 2, figsize=(11, 3.8))
    for label, run in runs.items():
        log = run / "log.jsonl"
        checks = read_log(log, "check") if log.is_file() else []
        if checks:
            steps = [c["step"] for c in checks]
            ax_loss.plot(steps, [c["loss"] for c in checks], marker=".", label=label)
            ax_ce.plot(steps, [c["ce"] for c in checks], marker=".", label=label)
    ax_loss.set(xlabel="optimiser step", ylabel="validation loss (the loss's own softmax)")
    ax_ce.set(xlabel="optimiser step", ylabel="validation full-vocabulary cross-entropy")
    for ax in (ax_loss, ax_ce):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _config(args: argparse.Namespace, loss: str, seed: int, data_name: str) -> TrainConfig:
    """The training run of one loss and seed: RUN = <out>/<data>_<loss>_s<seed>."""
    return TrainConfig(
        data=args.data,
        out=str(Path(args.out) / f"{data_name}_{loss}_s{seed}"),
        loss=loss,
        model=args.model,
        epochs=args.epochs,
        limit_train=args.limit_train,
        min_item_count=args.min_item_count,
        max_history=args.max_history,
        batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size,
        lr=args.lr,
        eval_every=args.eval_every,
        save_every=args.eval_every,  # a killed run loses at most one check's steps
        valid_rows=args.valid_rows,
        early_stopping=args.early_stopping,
        limit_eval=args.limit_eval,
        exact_budget=args.exact_budget,
        eval_batch_size=args.eval_batch_size,
        seed=seed,
        device=args.device,
        dtype=args.dtype,
        validate=False,
        progress=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="dataset folder (upstream format)")
    p.add_argument("--model", default=SMOLLM2, help="--model of bear train")
    p.add_argument("--out", default="runs/study_smollm2", help="folder of the training runs")
    p.add_argument("--losses", nargs="+", default=["sft", "msl", "bear"], help="losses")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds, in turn")
    p.add_argument("--epochs", type=int, default=2, help="cap of the training epochs")
    p.add_argument("--limit-train", type=int, default=1024, help="training rows")
    p.add_argument("--min-item-count", type=int, help="--min-item-count of bear train")
    p.add_argument("--max-history", type=int, default=5, help="history items per prompt")
    p.add_argument("--batch-size", type=int, default=16, help="examples per optimiser step")
    p.add_argument("--micro-batch-size", type=int, default=4, help="examples per forward")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    p.add_argument("--eval-every", type=int, default=16, help="steps between validation checks")
    p.add_argument("--valid-rows", type=int, default=128, help="validation rows per check")
    p.add_argument("--early-stopping", type=int, default=3, help="checks without improvement")
    p.add_argument("--limit-eval", type=int, default=300, help="test users")
    p.add_argument(
        "--exact-budget",
        type=int,
        default=128,
        help="prefix tokens the exact rank's count may feed per user",
    )
    p.add_argument("--eval-batch-size", type=int, default=16, help="prompts per decoding batch")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="base weights")
    p.add_argument(
        "--report",
        action="store_true",
        help="train and evaluate nothing: write the results files from the evaluations already "
        "done (what is not done is listed as missing)",
    )
    add_results_args(p)
    args = p.parse_args()
    name = Path(args.data).resolve().name.lower()
    device_name = device_label(args.device)
    stem = results_stem(args.results_dir, f"study_{name}_smollm2", device_name, args.tag)
    device = resolve_device(args.device)
    results: dict[str, dict] = {}
    configs = {
        seed: {loss: _config(args, loss, seed, name) for loss in args.losses} for seed in args.seeds
    }
    # every run of the study, trained or not yet, so that every report draws the curves of all
    # the runs that have a log
    runs = {
        f"{loss} s{seed}": Path(cfg.out) for seed in configs for loss, cfg in configs[seed].items()
    }
    missing = [
        f"{loss} seed {seed} {evaluation}"
        for seed in args.seeds
        for evaluation in EVALUATIONS
        for loss in args.losses
    ]
    t0 = time.perf_counter()

    def report() -> None:
        cells, paired, violations = _cells(results), _paired(results), _paired_violations(results)
        settings = {
            k: v for k, v in vars(args).items() if k not in ("tag", "results_dir", "report")
        }
        write_json(
            stem.with_suffix(".json"),
            {
                "device": device_name,
                "data": name,
                "settings": settings,
                "evaluations": {
                    k: dict(zip(("length_penalty", "history_excluded", "exact"), v, strict=True))
                    for k, v in EVALUATIONS.items()
                },
                "cells": cells,
                "paired": paired,
                "violations": violations,
                "missing": missing,
                "coverage": {
                    f"{loss} s{seed}": next(iter(per_eval.values()))["coverage"]
                    for loss, seeds in results.items()
                    for seed, per_eval in seeds.items()
                },
                "wall_seconds_this_invocation": time.perf_counter() - t0,
            },
        )
        stem.with_suffix(".md").write_text(_table(cells, paired, violations, missing))
        _plot_curves(runs, Path(f"{stem}_curves.png"))

    # per seed: every loss trained first, then each evaluation across the losses (a0, the one
    # with the exact ranks, first), so a study stopped early already has its main comparison
    for seed in args.seeds:
        for cfg in configs[seed].values():
            if not args.report:
                _train(cfg)
        for evaluation in EVALUATIONS:
            for loss, cfg in configs[seed].items():
                if args.report and not (Path(cfg.out) / "study" / f"{evaluation}.json").is_file():
                    continue
                per_eval = results.setdefault(loss, {}).setdefault(seed, {})
                per_eval[evaluation] = _evaluate(cfg, device, evaluation)
                missing.remove(f"{loss} seed {seed} {evaluation}")
                report()
                done_after = time.perf_counter() - t0
                print(f"{loss} seed {seed} {evaluation} done ({done_after:.0f} s)", flush=True)
    if args.report:
        report()
    print(_table(_cells(results), _paired(results), _paired_violations(results), missing))


if __name__ == "__main__":
    main()

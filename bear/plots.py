"""Figures: a run's training curves and the demo's comparison of losses (matplotlib, Agg)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from bear.metrics import ANATOMY_KEYS, SELECT_METRIC, TABLE_KEYS  # noqa: E402

__all__ = ["read_log", "plot_anatomy", "plot_run", "plot_comparison"]

CURVE_METRICS = (SELECT_METRIC, "hr@10")  # per-epoch validation runs the decoder only


def _value(x) -> float:
    """A metric as a float to plot; a null metric (empty denominator) is NaN, drawn as a gap."""
    return float("nan") if x is None else float(x)


def read_log(path: str | Path, event: str) -> list[dict]:
    """The records of one event ("step", "valid", "check") in a run's log.jsonl, in order of
    their step (their epoch for "valid"); a resumed run's repeats collapse to the last."""
    key = "epoch" if event == "valid" else "step"
    found = {}
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") == event:
            found[rec[key]] = rec
    return [found[k] for k in sorted(found)]


def plot_run(run: str | Path) -> Path:
    """Write RUN/curves.png: training loss per step (and the --eval-every validation loss) and
    validation metrics per epoch."""
    run = Path(run)
    log = run / "log.jsonl"
    steps, valid, checks = (read_log(log, event) for event in ("step", "valid", "check"))
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot([s["step"] for s in steps], [s["loss"] for s in steps], lw=1, label="training")
    if checks:
        xs, ys = [c["step"] for c in checks], [c["loss"] for c in checks]
        ax_loss.plot(xs, ys, marker=".", label="validation (teacher-forced)")
        ax_loss.legend()
    ax_loss.set(xlabel="optimiser step", ylabel="loss", title="loss")
    for key in CURVE_METRICS:
        ys = [_value(v[key]) for v in valid]
        ax_val.plot([v["epoch"] for v in valid], ys, marker="o", label=key)
    ax_val.set(xlabel="epoch", ylabel="validation", title="validation (beam search)")
    ax_val.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_val.legend()
    fig.tight_layout()
    out = run / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_comparison(results: dict[str, dict], out: str | Path, title: str = "") -> Path:
    """Bar chart of test metrics per loss; ``results`` maps loss name -> metrics.json's "test".

    A null metric (no cases) has no bar and the label "n/a"."""
    keys = TABLE_KEYS
    names = list(results)
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        xs = [i + j * width for i in range(len(keys))]
        values = [results[name][k] for k in keys]
        bars = ax.bar(xs, [_value(v) for v in values], width, label=name)
        labels = ["n/a" if v is None else f"{v:.2f}" for v in values]
        ax.bar_label(bars, labels=labels, fontsize=7)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))], keys)
    ax.set(ylabel="test value", title=title or "test metrics (PR: lower is better)")
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_anatomy(anatomy: dict, out: str | Path, title: str = "") -> Path:
    """Where pruning happens (``bear.metrics.pruning_anatomy``): the cases of each training
    popularity bucket, kept / pruned with a violation / pruned otherwise (stacked), and the title
    position of the first violation of the pruned-with-violation cases."""
    fig, (ax_pop, ax_depth) = plt.subplots(1, 2, figsize=(10, 3.8))
    labels = list(anatomy["by_popularity"])
    bottom = [0] * len(labels)
    for key in ANATOMY_KEYS:
        counts = [anatomy["by_popularity"][b][key] for b in labels]
        ax_pop.bar(labels, counts, bottom=bottom, label=key.replace("_", " "))
        bottom = [x + y for x, y in zip(bottom, counts, strict=True)]
    ax_pop.set(
        xlabel="target's occurrences in training",
        ylabel="cases (target in exact top-10)",
        title=title or "pruning by popularity",
    )
    ax_pop.legend(fontsize=8)
    depths = anatomy["violation_depth"]
    ax_depth.bar([int(d) for d in depths], list(depths.values()))
    ax_depth.set(
        xlabel="title position of the first token outside the top-B",
        ylabel="cases",
        title="pruned with a violation of (3.2)",
    )
    ax_depth.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

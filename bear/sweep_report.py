"""The table and plots of a sweep (``python -m bear sweep``): OUT/sweep.csv, OUT/sweep.json and
OUT/sweep_*.png, rewritten from the cells' run folders after every sweep invocation.

One row per cell: its status (done, failed with its error, or missing), the flags of the grid's
axes and the usual ones (loss, λ, ξ, training and inference widths, seed) by field name, the test
metrics the run's protocol reports, seconds per epoch, and the mean over its steps of bear's
``reg_grad_ratio`` (‖∇ reg‖ / ‖∇ ce‖ per row, which a very small ξ saturates). The JSON also holds
every hyperparameter of each cell. Plots appear where their axes vary: NDCG@10 and PR@10 over
λ × ξ (heatmaps), against λ with seed error bars, over training × inference width, and the
gradient ratio against ξ.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bear.config import TrainConfig  # noqa: E402
from bear.losses.registry import get_loss  # noqa: E402
from bear.metrics import TABLE_KEYS  # noqa: E402
from bear.plots import read_log  # noqa: E402
from bear.sweep import Cell, loss_settings, settings_read  # noqa: E402

__all__ = ["grid_axes", "sweep_rows", "write_sweep"]

METRICS = TABLE_KEYS + ("violation_share",)
USUAL = ("loss", "reg_weight", "reg_temperature", "beam_width", "eval_beam_width", "seed")


def _reported(metrics: dict) -> dict:
    return metrics.get("test_max", {}) if metrics["protocol"] == "upstream" else metrics["test"]


def grid_axes(cells: list[Cell]) -> list[str]:
    """The grid's axes (the fields some cell varies), in TrainConfig's field order."""
    varied = {a for c in cells for a in c.axes}
    return [f.name for f in dataclasses.fields(TrainConfig) if f.name in varied]


def _grad_ratio(run: Path) -> float | None:
    log = run / "log.jsonl"
    steps = read_log(log, "step") if log.is_file() else []
    ratios = [s["reg_grad_ratio"] for s in steps if "reg_grad_ratio" in s]
    return statistics.fmean(ratios) if ratios else None


def sweep_rows(cells: list[Cell], errors: dict[str, str | None]) -> list[dict]:
    """One row per cell (module docstring), in the grid's order."""
    axes = grid_axes(cells)
    rows = []
    for cell in cells:
        cfg, run = cell.config, Path(cell.config.out)
        row = {"cell": cell.name}
        ignored = loss_settings() - settings_read(get_loss(cfg.loss), cfg.eval_beam_width)
        for name in (*axes, *USUAL):
            row[name] = None if name in ignored else getattr(cfg, name)  # None: not read
        row["eval_beam_width"] = cfg.eval_beam_width or cfg.beam_width
        metrics_file = run / "metrics.json"
        if metrics_file.is_file() and errors.get(cell.name) is None:
            metrics = json.loads(metrics_file.read_text())
            row["status"], row["error"] = "done", ""
            row |= {k: _reported(metrics).get(k) for k in METRICS}
            row["seconds_per_epoch"] = metrics.get("seconds_per_epoch")
        else:
            failed = cell.name in errors and errors[cell.name] is not None
            row["status"] = "failed" if failed else "missing"
            row["error"] = errors.get(cell.name) or ""
            row |= {k: None for k in (*METRICS, "seconds_per_epoch")}
        row["reg_grad_ratio"] = _grad_ratio(run)
        rows.append(row)
    return rows


def _mean_se(values: list[float]) -> tuple[float, float]:
    xs = [v for v in values if v is not None]
    if not xs:
        return math.nan, math.nan
    se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0
    return statistics.fmean(xs), se


def _grouped(rows: list[dict], keys: tuple[str, ...], metric: str) -> dict[tuple, tuple]:
    """(values of keys) -> (mean, SE) of ``metric`` over the rows that share them."""
    groups = defaultdict(list)
    for r in rows:
        groups[tuple(r[k] for k in keys)].append(r[metric])
    return {k: _mean_se(v) for k, v in groups.items()}


def _heatmaps(rows, x: str, y: str, title: str, out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    xs = sorted({r[x] for r in rows})
    ys = sorted({r[y] for r in rows})
    for ax, metric in zip(axes, ("ndcg@10", "pr@10"), strict=True):
        cell = _grouped(rows, (y, x), metric)
        grid = [[cell.get((b, a), (math.nan,))[0] for a in xs] for b in ys]
        image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(xs)), [f"{v:g}" for v in xs])
        ax.set_yticks(range(len(ys)), [f"{v:g}" for v in ys])
        ax.set(xlabel=x, ylabel=y, title=f"{metric} ({title})")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if not math.isnan(value):
                    ax.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize=7, color="w")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def ordered(values) -> list:
    """Distinct axis values in reading order: numbers by value (0.25 before 4 before 10), then
    the rest (loss names, decoders) alphabetically."""
    distinct = set(values)
    numeric = {v for v in distinct if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return sorted(numeric) + sorted(distinct - numeric, key=str)


def _lines(rows, x: str, series: str, metrics: tuple[str, ...], ylabels, out: Path) -> Path:
    """metric against x, one line per value of ``series``, mean ± SE over the other axes
    (seeds): error bars."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 3.8), squeeze=False)
    for ax, metric, ylabel in zip(axes[0], metrics, ylabels, strict=True):
        for value in ordered(r[series] for r in rows):
            part = [r for r in rows if r[series] == value]
            stats = _grouped(part, (x,), metric)
            xs = sorted(k[0] for k in stats)
            means = [stats[(v,)][0] for v in xs]
            ses = [stats[(v,)][1] for v in xs]
            ax.errorbar(xs, means, yerr=ses, marker="o", capsize=3, label=f"{series}={value}")
        ax.set(xlabel=x, ylabel=ylabel)
        if x in ("reg_weight", "reg_temperature"):
            ax.set_xscale("symlog", linthresh=0.1)
        if metric == "reg_grad_ratio":  # spans decades (about λ / ξ)
            ax.set_yscale("symlog", linthresh=0.1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _plots(rows: list[dict], axes: list[str], out: Path) -> list[Path]:
    """The plots whose axes the grid varies (module docstring)."""
    done = [r for r in rows if r["status"] == "done"]
    if not done:
        return []
    axes = set(axes)
    bear_rows = [r for r in done if r["loss"] == "bear"] or done
    both = ("ndcg@10", "pr@10"), ("test NDCG@10", "test PR@10")
    written = []
    if {"reg_weight", "reg_temperature"} <= axes:
        title, path = "bear, λ × ξ", out / "sweep_lambda_xi.png"
        written.append(_heatmaps(bear_rows, "reg_weight", "reg_temperature", title, path))
    if "reg_weight" in axes:
        by_xi = "reg_temperature" in axes
        series, part = ("reg_temperature", bear_rows) if by_xi else ("loss", done)
        path = out / "sweep_lambda.png"
        written.append(_lines(part, "reg_weight", series, *both, path))
    width_rows = [r for r in bear_rows if r["beam_width"] is not None]  # one loss, width read
    if {"beam_width", "eval_beam_width"} & axes and width_rows:
        title = f"{width_rows[0]['loss']}, training × inference"
        path = out / "sweep_widths.png"
        written.append(_heatmaps(width_rows, "eval_beam_width", "beam_width", title, path))
    ratio_rows = [r for r in bear_rows if r["reg_grad_ratio"] is not None]
    if "reg_temperature" in axes and ratio_rows:
        series = "reg_weight" if "reg_weight" in axes else "loss"
        label = ("mean ‖∇ reg‖ / ‖∇ ce‖ per row",)
        path = out / "sweep_saturation.png"
        written.append(
            _lines(ratio_rows, "reg_temperature", series, ("reg_grad_ratio",), label, path)
        )
    return written


def write_sweep(cells: list[Cell], errors: dict[str, str | None], out: Path) -> list[dict]:
    """Write OUT/sweep.csv, OUT/sweep.json (the rows with every hyperparameter) and the plots;
    return the rows."""
    rows = sweep_rows(cells, errors)
    columns = list(rows[0]) if rows else ["cell"]
    with (out / "sweep.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    configs = {c.name: dataclasses.asdict(c.config) for c in cells}
    full = [r | {"config": configs[r["cell"]]} for r in rows]
    axes = grid_axes(cells)
    plots = [p.name for p in _plots(rows, axes, out)]
    summary = {"axes": axes, "cells": len(rows), "plots": plots, "rows": full}
    (out / "sweep.json").write_text(json.dumps(summary, indent=2, default=str))
    return rows

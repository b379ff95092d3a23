"""``python -m bear sweep``: a grid of training runs from ``train``'s flags, in parallel, resumable.

Every ``train`` flag is a sweep flag; one given several values is an axis of the grid, and the
cells are every combination of the axes' values (``bear.sweep_report`` writes the table and the
plots). Each cell is a normal run folder under ``--out`` named after its axis values. Before any
cell runs, every cell's configuration is built (and so checked, as ``train`` checks it): a bad
value in the grid is refused naming the cell. Cells run in ``--jobs`` worker processes (the
machine's cores shared out as torch threads), each cell's output in OUT/logs/<cell>.log; a
finished cell (its metrics.json) is not
run again and a killed one resumes from its RUN/last.pt, so a killed sweep continues where it
stopped; a cell that fails is recorded with its error and the others go on.
"""

from __future__ import annotations

import dataclasses
import itertools
import multiprocessing
import os
import threading
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from tqdm import tqdm

from bear.config import TrainConfig
from bear.losses.registry import get_loss, loss_names

__all__ = ["SWEEP_MANAGED", "Cell", "cells_of", "loss_settings", "run_sweep", "settings_read"]

# train flags the sweep sets for every cell itself: its folder and whether it resumes
SWEEP_MANAGED = ("out", "overwrite", "resume")
LOGS = "logs"  # OUT/logs/<cell>.log: what each cell's training printed
FAILED = "failed"  # status of a cell whose run raised


@dataclasses.dataclass
class Cell:
    """One run of the grid: its ``name`` (its folder under the sweep's), ``axes`` the values of
    the grid's axes in it, ``config`` the run's configuration."""

    name: str
    axes: dict
    config: TrainConfig


def _value_text(value) -> str:
    text = str(value).replace("/", "_").replace(" ", "")
    return text or "none"


def loss_settings() -> set[str]:
    """Every TrainConfig field some registered loss reads as a loss setting."""
    return {h for name in loss_names() for h in get_loss(name).hyperparameters}


def settings_read(loss, eval_beam_width) -> set[str]:
    """The loss settings a run of ``loss`` reads: its own, and --beam-width wherever it is the
    inference width too (no --eval-beam-width), whatever the loss."""
    reads = set(loss.hyperparameters)
    if eval_beam_width is None:
        reads.add("beam_width")
    return reads


def cells_of(grid: dict[str, list], out: Path) -> list[Cell]:
    """Every combination of the grid's values (field -> values; a field with several values is
    an axis), as a checked configuration each; a loss runs once over the values of the loss
    settings it does not read (msl over --reg-weight, or over --beam-width once --eval-beam-width
    is given, say: those axes take their default for it and leave its name). Raises ValueError
    naming the first bad cell."""
    for folder in grid.get("data", []):
        if not Path(folder).is_dir():
            raise ValueError(f"sweep: --data {folder}: not a dataset folder; nothing was run")
    axes = [name for name, values in grid.items() if len(values) > 1]
    fixed = {name: values[0] for name, values in grid.items() if len(values) == 1}
    settings = loss_settings()
    cells, seen = [], set()
    for combo in itertools.product(*(grid[a] for a in axes)):
        values = dict(zip(axes, combo, strict=True))
        loss = get_loss(values.get("loss", fixed.get("loss", "bear")))
        reads = settings_read(loss, values.get("eval_beam_width", fixed.get("eval_beam_width")))
        values = {a: v for a, v in values.items() if a not in settings - reads}
        name = "__".join(f"{a}-{_value_text(v)}" for a, v in values.items()) or "single"
        if name in seen:
            continue
        seen.add(name)
        try:
            config = TrainConfig(**fixed, **values, out=str(out / name))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"sweep cell {name}: {exc}; nothing was run") from None
        cells.append(Cell(name, values, config))
    return cells


def _status(cell: Cell) -> str:
    run = Path(cell.config.out)
    if (run / "metrics.json").is_file():
        return "done"
    return "resume" if (run / ".bear-run").is_file() else "new"


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    tqdm.set_lock(threading.RLock())  # no process-shared lock for bars that go to a log file


def _run_cell(cell: Cell) -> tuple[str, str | None, float]:
    """Train one cell in this worker, its output in OUT/logs/<cell>.log: (name, error or None,
    seconds)."""
    from bear.train import train

    t0 = time.perf_counter()
    cfg = dataclasses.replace(cell.config, resume=_status(cell) == "resume", progress=False)
    logs = Path(cfg.out).parent / LOGS
    logs.mkdir(exist_ok=True)
    with (logs / f"{cell.name}.log").open("a") as fh, redirect_stdout(fh), redirect_stderr(fh):
        try:
            train(cfg)
            error = None
        except Exception as exc:  # recorded in the table; the sweep goes on
            traceback.print_exc(file=fh)
            error = traceback.format_exception_only(type(exc), exc)[-1].strip()[:500]
    return cell.name, error, time.perf_counter() - t0


# settings that leave a finished cell's results as they are (where it runs, how it reports)
RESULT_NEUTRAL = ("out", "overwrite", "resume", "allow_data_change", "progress", "device",
                  "save_every", "eval_batch_size")  # fmt: skip


def check_finished_cells(cells: list[Cell]) -> None:
    """ValueError naming the first finished cell whose run used other settings than the grid
    gives it now (a cell's folder is named by its axes only, so a fixed flag changed between two
    runs of one sweep, --epochs say, would otherwise reuse results trained or tested otherwise)."""
    from bear.run_folder import config_conflicts, read_saved_config  # torch: not at import time

    for cell in cells:
        if _status(cell) != "done":
            continue
        run = Path(cell.config.out)
        saved = read_saved_config(run, "the cell's run is damaged; move it away and run again")
        conflicts = config_conflicts(saved, cell.config, lambda f: f.name in RESULT_NEUTRAL)
        if conflicts:
            raise ValueError(
                f"sweep: the finished cell {run} ran with other settings ({'; '.join(conflicts)})"
                "; its results are not this grid's: give the sweep a new --out, or the settings "
                "that cell ran with; nothing was run"
            )


def run_sweep(cells: list[Cell], out: Path, jobs: int) -> dict[str, str | None]:
    """Run the cells not finished yet, ``jobs`` at a time; cell name -> its error (None: done).
    Progress: a bar of the cells and one line per cell as it ends. Raises ValueError
    (``check_finished_cells``) before anything runs when a finished cell ran otherwise."""
    out.mkdir(parents=True, exist_ok=True)
    check_finished_cells(cells)
    errors: dict[str, str | None] = {c.name: None for c in cells if _status(c) == "done"}
    todo = [c for c in cells if c.name not in errors]
    done, ahead = len(errors), len(todo)
    print(f"sweep: {len(cells)} cells, {done} done before, {ahead} to run, {jobs} at a time")
    if not todo:
        return errors
    threads = max(1, (os.cpu_count() or 1) // jobs)
    bar = tqdm(total=len(cells), initial=len(errors), desc="sweep", unit="cell")
    context = multiprocessing.get_context("spawn")
    with context.Pool(jobs, _worker_init, (threads,)) as pool:
        for name, error, seconds in pool.imap_unordered(_run_cell, todo):
            errors[name] = error
            state = f"failed: {error}" if error else "done"
            bar.write(f"  {name}: {state} ({seconds:.0f} s)")
            bar.update(1)
    bar.close()
    return errors

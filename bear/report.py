"""RUN/metrics.json in every form SPEC §7 gives it, built and written in one place.

- protocol ``ours``: the selected checkpoint's validation and test metrics, its epoch and file
  (``Selection``; a run trained with ``--no-eval`` reports its last weights with empty metrics);
- protocol ``upstream``: the test metrics after every epoch and their per-metric maxima (the
  paper's tables, ``UPSTREAM.md`` §5).
Both carry the evaluation's length penalty and the mean seconds per training epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bear.metrics import RANKING_KEYS
from bear.plots import plot_anatomy
from bear.run import write_json_atomic

__all__ = ["Selection", "max_over_epochs", "run_metrics", "write_metrics"]


@dataclass
class Selection:
    """The checkpoint protocol ``ours`` reports: its ``epoch`` (a fraction for a stop
    mid-epoch), its ``checkpoint`` file in the run folder, and its ``valid`` and ``test``
    metrics (empty under ``--no-eval``)."""

    epoch: float
    checkpoint: str
    valid: dict
    test: dict


def max_over_epochs(epochs: list[dict]) -> dict[str, float | None]:
    """Per metric of ``RANKING_KEYS``, the maximum over epochs of ``epoch["test"][metric]``.

    PR@K and the violation share are lower-is-better diagnostics upstream does not report: they
    stay per epoch only. Epochs where a metric is None (an empty denominator) are skipped; None
    if it is None in every epoch (or there are no epochs).
    """
    out = {}
    for key in RANKING_KEYS:
        values = [e["test"][key] for e in epochs if e["test"].get(key) is not None]
        out[key] = max(values) if values else None
    return out


def run_metrics(
    protocol: str,
    length_penalty: float,
    seconds_per_epoch: float | None,
    selection: Selection | None = None,
    epochs: list[dict] | None = None,
) -> dict:
    """RUN/metrics.json's content for ``protocol``.

    ours: ``selection`` (required); upstream: ``epochs``, ``[{"epoch": e, "test": {...}}, ...]``
    in training order (required). ``seconds_per_epoch`` is None for a run stopped inside its
    first epoch. Raises ValueError when the protocol's part is missing.
    """
    if protocol == "upstream":
        if epochs is None:
            raise ValueError("epochs: the upstream protocol reports every epoch's test metrics")
        body = {"epochs": epochs, "test_max": max_over_epochs(epochs)}
    else:
        if selection is None:
            raise ValueError("selection: protocol 'ours' reports the selected checkpoint")
        body = {
            "valid": selection.valid,
            "test": selection.test,
            "best_epoch": selection.epoch,
            "checkpoint": selection.checkpoint,
        }
    head = {"protocol": protocol, "length_penalty": length_penalty}
    return head | body | {"seconds_per_epoch": seconds_per_epoch}


def write_metrics(run: Path, metrics: dict) -> None:
    """Write ``metrics`` (``run_metrics``) to RUN/metrics.json atomically, and RUN/anatomy.png
    where the test metrics carry a pruning anatomy (``--pruning-anatomy``)."""
    write_json_atomic(Path(run) / "metrics.json", metrics)
    anatomy = metrics.get("test", {}).get("anatomy")
    if anatomy is not None:
        plot_anatomy(anatomy, Path(run) / "anatomy.png", "test: where pruning happens")

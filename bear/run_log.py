"""A run's log: RUN/log.jsonl records, those with a step also as TensorBoard scalars."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from bear.tensorboard import ScalarEventWriter

__all__ = ["RunLog"]

_NOT_SCALARS = ("step", "partial")  # numbers of a record that are not curves


class RunLog:
    """``log(event=..., **fields)`` appends one JSON record (with the wall time) to RUN/log.jsonl;
    a record with a ``step`` also goes to TensorBoard, each number as ``<event>/<key>`` (a
    training step's as ``train/<key>``). Disabled (``enabled=False``) on every rank but 0."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        self.board = ScalarEventWriter(path.parent) if enabled else None

    def forget_after(self, step: int) -> None:
        """Drop the records of steps after ``step`` (those a killed run wrote after its last
        checkpoint, which a resumed run writes again), so that the log holds one record per
        step; the file is rewritten atomically."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if json.loads(line).get("step", 0) <= step
        ]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def __call__(self, **rec) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps({**rec, "time": round(time.time(), 3)}, default=str) + "\n")
        if "step" in rec:
            prefix = "train" if rec["event"] == "step" else rec["event"]
            scalars = {
                f"{prefix}/{k}": float(v)
                for k, v in rec.items()
                if isinstance(v, int | float) and not isinstance(v, bool) and k not in _NOT_SCALARS
            }
            self.board.add_scalars(rec["step"], scalars)

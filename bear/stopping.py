"""Stopping a run on SIGINT or SIGTERM at its next safe point (SPEC §10).

Within ``stop_signals()`` the first SIGINT (Ctrl-C) or SIGTERM is only recorded: training checks
it after each optimiser step (``requested``), writes RUN/last.pt and raises ``Stopped``;
evaluation checks it between batches (``check``). A second signal raises ``Stopped`` at once,
wherever the process is (an atomic write in progress leaves a temporary file that ``--resume``
removes; RUN/last.pt keeps the last save). The command line turns ``Stopped`` into one line
with the command that continues, and the exit status 128 + the signal's number.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

__all__ = ["Stopped", "check", "requested", "stop_signals"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state: dict[str, int | None] = {"signal": None}


class Stopped(Exception):
    """A run stopped by a signal: ``signum`` and where it stopped."""

    def __init__(self, signum: int, where: str):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}")


def requested() -> int | None:
    """The signal recorded within ``stop_signals`` (None: none)."""
    return _state["signal"]


def check(where: str) -> None:
    """Raise ``Stopped`` (naming ``where``) if a signal was recorded."""
    if _state["signal"] is not None:
        raise Stopped(_state["signal"], where)


def _handler(signum, frame) -> None:
    if _state["signal"] is not None:
        raise Stopped(signum, "at once (a second signal)")
    _state["signal"] = signum


@contextmanager
def stop_signals():
    """Record SIGINT / SIGTERM instead of dying (module docstring); the process's handlers are
    restored on exit. Outside the main thread (where handlers cannot be set) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _state["signal"] = None

"""A test hook for fault injection: ``BEAR_FAULT_AT`` makes the process SIGKILL itself at a point.

Only tests set the variable (``tests/test_faults.py`` kills training at several points, resumes it
and compares the weights with an uninterrupted run); without it ``fault_point`` does nothing.

``BEAR_FAULT_AT=NAME`` kills the process the first time it reaches the point NAME,
``BEAR_FAULT_AT=NAME*K`` the K-th time; ``BEAR_FAULT_SIGNAL=TERM`` (or ``INT``) sends that signal
instead of SIGKILL (a stop the run handles, ``bear.stopping``). The points ``bear.train`` and
``bear.run`` name:

- ``backward:S``: mid-step, the gradients of optimiser step S are accumulated, not yet applied;
- ``step:S``: optimiser step S is applied, its checkpoint (if any) not yet written;
- ``write:FILE``: the temporary file of an atomic write (FILE = last.pt, best.pt, config.json,
  metrics.json, ...) is written, not yet renamed onto RUN/FILE.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

__all__ = ["FAULT_ENV", "fault_point"]

FAULT_ENV = "BEAR_FAULT_AT"
SIGNAL_ENV = "BEAR_FAULT_SIGNAL"
_reached: Counter[str] = Counter()  # point -> times reached in this process (the named one only)


def fault_point(name: str) -> None:
    """Kill this process with SIGKILL (or send it ``BEAR_FAULT_SIGNAL``) if ``BEAR_FAULT_AT``
    names this point (and this is the K-th time it is reached); otherwise return at once."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, _, times = spec.partition("*")
    if name != point:
        return
    _reached[name] += 1
    if _reached[name] == int(times or 1):
        sent = os.environ.get(SIGNAL_ENV)
        os.kill(os.getpid(), getattr(signal, f"SIG{sent}") if sent else signal.SIGKILL)

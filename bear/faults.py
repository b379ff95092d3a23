"""A test hook for fault injection: ``BEAR_FAULT_AT`` makes the process SIGKILL itself at a point.

Only tests set the variable (``tests/test_faults.py`` kills training at several points, resumes it
and compares the weights with an uninterrupted run); without it ``fault_point`` does nothing.

``BEAR_FAULT_AT=NAME`` kills the process the first time it reaches the point NAME,
``BEAR_FAULT_AT=NAME*K`` the K-th time; ``BEAR_FAULT_SIGNAL=TERM`` (or ``INT``) sends that signal
instead of SIGKILL (a stop the run handles, ``bear.stopping``), and ``BEAR_FAULT_SIGNAL=ENOSPC``
raises the OSError of a full disk there instead (at a ``write:`` point, as a write that ran out of
space). The points ``bear.train``, ``bear.run`` and ``bear.model`` name:

- ``backward:S``: mid-step, the gradients of optimiser step S are accumulated, not yet applied;
- ``step:S``: optimiser step S is applied, its checkpoint (if any) not yet written;
- ``write:FILE``: the temporary file of an atomic write (FILE = last.pt, best.pt, config.json,
  metrics.json, ..., or model for the RUN/model folder) is written, not yet renamed onto RUN/FILE.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
from collections import Counter
from pathlib import Path

__all__ = ["FAULT_ENV", "disk_full", "fault_point", "full_disk_error"]

FAULT_ENV = "BEAR_FAULT_AT"
SIGNAL_ENV = "BEAR_FAULT_SIGNAL"
_reached: Counter[str] = Counter()  # point -> times reached in this process (the named one only)


def fault_point(name: str) -> None:
    """Kill this process with SIGKILL (or send it ``BEAR_FAULT_SIGNAL``, or raise a full disk's
    OSError) if ``BEAR_FAULT_AT`` names this point (and this is the K-th time it is reached);
    otherwise return at once."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, _, times = spec.partition("*")
    if name != point:
        return
    _reached[name] += 1
    if _reached[name] == int(times or 1):
        sent = os.environ.get(SIGNAL_ENV)
        if sent == "ENOSPC":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.kill(os.getpid(), getattr(signal, f"SIG{sent}") if sent else signal.SIGKILL)


def disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC anywhere in the exception's chain, or (the
    writers that lose the errno: torch.save's "unexpected pos", safetensors) under 1 MiB left on
    ``folder``'s file system."""
    if isinstance(exc, OSError) and exc.errno not in (None, errno.ENOSPC):
        return False  # another cause named by its errno (a permission, a missing folder)
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(folder).free < 2**20
    except OSError:
        return False


def full_disk_error(path: Path, kept: str) -> OSError:
    """The error (errno ENOSPC) a full disk gives while writing ``path``: what happened, what
    is ``kept``, what to do."""
    error = OSError(
        f"{path}: the disk is full (no space left on device) while writing it; nothing was lost "
        f"({kept}): free space on {path.parent}, then run the same command again (a training "
        "run: with --resume)"
    )
    error.errno = errno.ENOSPC
    return error

"""Launch a multi-process command (torchrun, accelerate launch) from a test, bounded in time.

A hung rank must fail its test, not stall the suite: the launch runs in its own session and, past
``LAUNCH_TIMEOUT``, the whole process group (launcher and workers) is killed and the test fails
with the output so far.
"""

from __future__ import annotations

import os
import signal
import subprocess

# A launch here is seconds of work (two gloo processes, a tiny model); five minutes is a hang.
LAUNCH_TIMEOUT = 300


def launch(cmd: list[str], *, env: dict, cwd, timeout: float = LAUNCH_TIMEOUT):
    """Run ``cmd`` to completion; returns its CompletedProcess (text stdout/stderr).

    Raises AssertionError naming the command and the output tail when it outlives ``timeout``.
    """
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, text=True, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(
            f"{' '.join(cmd[:6])} ... still running after {timeout} s (killed); "
            f"stderr tail:\n{err[-3000:]}"
        ) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

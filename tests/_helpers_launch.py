"""Launch a multi-process command (torchrun, accelerate launch) from a test, bounded in time.

A hung rank must fail its test, not stall the suite. torchrun starts its workers in sessions of
their own, so killing the launcher's process group misses them: past ``LAUNCH_TIMEOUT`` every
process below the launcher is killed (found with psutil), and the output goes to files, which no
leftover process can hold open the way it holds a pipe.
"""

from __future__ import annotations

import subprocess
import tempfile

import psutil

# A launch here is seconds of work (two gloo processes, a tiny model); five minutes is a hang.
LAUNCH_TIMEOUT = 300


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it (children first found, then killed)."""
    try:
        root = psutil.Process(pid)
        tree = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for proc in tree:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def launch(cmd: list[str], *, env: dict, cwd, timeout: float = LAUNCH_TIMEOUT):
    """Run ``cmd`` to completion; returns its CompletedProcess (text stdout/stderr).

    Raises AssertionError naming the command, with the output's tail, when it outlives
    ``timeout`` seconds; the launcher and all its workers are killed first (also when the wait
    is interrupted).
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, text=True, stdout=out, stderr=err)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)
            proc.wait()
            err.seek(0)
            raise AssertionError(
                f"{' '.join(cmd[:6])} ... still running after {timeout} s (killed); "
                f"stderr tail:\n{err.read()[-3000:]}"
            ) from None
        except BaseException:
            _kill_tree(proc.pid)
            raise
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())

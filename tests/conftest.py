"""Shared test setup: Triton's CPU interpreter and the GPU marker.

TRITON_INTERPRET must be set before anything imports triton, so it is set here (where it is
unset), when pytest first loads this file. Tests marked `gpu` need a CUDA device and compiled
kernels: they are skipped on CPU machines (CI has none) and under the interpreter.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def gpu_skip_reason(cuda_available: bool, interpret: str | None) -> str | None:
    """Why the `gpu` tests cannot run here, or None. They check and time the compiled kernels, so
    they skip under the interpreter too (at their real shapes it would take hours): the pytest
    command of `make test` sets TRITON_INTERPRET=1, `make gpu-bench` sets it to 0."""
    if not cuda_available:
        return "needs a CUDA device"
    if interpret == "1":
        return "TRITON_INTERPRET=1 runs the interpreter; run the gpu tests with TRITON_INTERPRET=0"
    return None


def pytest_collection_modifyitems(config, items):
    reason = gpu_skip_reason(torch.cuda.is_available(), os.environ.get("TRITON_INTERPRET"))
    if reason is None:
        return
    skip_gpu = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)

"""Shared test setup: Triton's CPU interpreter and the GPU marker.

TRITON_INTERPRET must be set before anything imports triton, so it is set here, when pytest first
loads this file. Tests marked `gpu` need a CUDA device and are skipped on CPU machines
(CI has none).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)

"""pytest-benchmark regressions of the loss on small shapes (not part of `pytest tests`).

    python -m pytest benchmarks/test_kernel_benchmark.py --benchmark-only

Each case times forward+backward of one impl; CUDA cases (triton) skip on CPU machines.
"""

import pytest
import torch
import torch.nn.functional as F
from _common import resolve_device, sync

from bear_kernels import bear_loss

N_ROWS, VOCAB, BEAM = 512, 8192, 10  # small enough for a CPU run in seconds


def _inputs(device, dtype):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(N_ROWS, VOCAB, generator=g).to(device=device, dtype=dtype)
    y = torch.randint(0, VOCAB, (N_ROWS,), generator=g).to(device)
    return z.requires_grad_(True), y


def _step(fn, z, y, device):
    fn(z, y).backward()
    z.grad = None
    sync(device)


IMPLS = {
    "torch_ce": lambda z, y: F.cross_entropy(z, y),
    "torch": lambda z, y: bear_loss(z, y, beam_width=BEAM, impl="torch", validate_target=False),
    "triton": lambda z, y: bear_loss(z, y, beam_width=BEAM, impl="triton", validate_target=False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_fwd_bwd(benchmark, impl, dtype):
    device = resolve_device("auto")
    if impl == "triton" and device.type != "cuda":
        pytest.skip("the Triton path is benchmarked on CUDA only")
    z, y = _inputs(device, dtype)
    fn = IMPLS[impl]
    _step(fn, z, y, device)  # warm-up / compilation outside the measurement
    benchmark(_step, fn, z, y, device)

"""GPU parity of both impls against the float64 reference at real shapes (`gpu` marker).

Run by `make gpu-bench` on a CUDA machine; skipped on CPU machines (CI). V = 128256 (Llama 3),
N = 256 supervised rows with some ignored, a random allowed set or none, B = 10 and 50, logits
in bf16 / fp16 / fp32, the fused (reduced) path and the per-row path.
"""

import pytest
import torch
from conftest import gpu_skip_reason

from bear_kernels import bear_loss, ce_margin
from tests._helpers_kernels import check_parity, make_case

VOCAB = 128256
N_ROWS = 256


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("beam_width", [10, 50])
@pytest.mark.parametrize("mask_kind", ["none", "random"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_parity_at_real_shapes(impl, beam_width, mask_kind, dtype):
    z, y, mask = make_case(
        N_ROWS,
        VOCAB,
        mask_kind,
        seed=beam_width,
        ignore_rows=(3, 70),
        dtype=dtype,
        beam_width=beam_width,
    )
    z, y = z.cuda(), y.cuda()
    mask = mask.cuda() if mask is not None else None
    kw = dict(beam_width=beam_width, allowed_mask=mask, threshold_grad=beam_width == 50)

    def fused(a, b, **k):
        return bear_loss(a, b, impl=impl, validate_target=False, **k)

    def per_row(a, b, **k):
        return ce_margin(a, b, impl=impl, validate_target=False, **k)

    check_parity(fused, z, y, reduction="mean", reg_weight=0.7, **kw)
    check_parity(per_row, z, y, loss="ce", **kw)


def test_gpu_tests_run_on_cuda_with_compiled_kernels_only():
    """Not on a CPU machine; not under the interpreter, which the plain test command turns on (at
    these shapes it would take hours and check the interpreter instead of the kernels)."""
    assert gpu_skip_reason(cuda_available=False, interpret="0") == "needs a CUDA device"
    assert "TRITON_INTERPRET=0" in gpu_skip_reason(cuda_available=True, interpret="1")
    assert gpu_skip_reason(cuda_available=True, interpret="0") is None

"""Public API of bear_kernels: validation errors, reductions, bitmask helpers, the torch path."""

import math

import pytest
import torch

import bear_kernels
from bear_kernels import (
    BEARLoss,
    allowed_count,
    bear_loss,
    bear_loss_reference,
    ce_margin,
    counted_rows,
    pack_allowed_mask,
)
from tests._helpers_kernels import check_parity, make_case

V = 37


def _inputs():
    z = torch.randn(4, V)
    y = torch.tensor([0, 5, -100, 36])
    return z, y


def test_public_names():
    for name in (
        "bear_loss",
        "bear_loss_reference",
        "BEARLoss",
        "ce_margin",
        "pack_allowed_mask",
        "allowed_count",
        "counted_rows",
    ):
        assert name in bear_kernels.__all__


BAD_KWARGS = [
    ({"beam_width": 0}, "beam_width"),
    ({"beam_width": -3}, "beam_width"),
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"reg_temperature": 0.0}, "reg_temperature"),
    ({"reg_temperature": float("nan")}, "reg_temperature"),
    ({"reg_weight": -0.1}, "reg_weight"),
    ({"reg_weight": float("inf")}, "reg_weight"),
    ({"reduction": "avg"}, "reduction"),
    ({"impl": "cuda"}, "impl"),
]


@pytest.mark.parametrize(
    "fn,kwargs,name",
    [(bear_loss, kw, name) for kw, name in BAD_KWARGS]
    + [(bear_loss_reference, kw, name) for kw, name in BAD_KWARGS if name != "impl"],
)
def test_bad_hyperparameters_raise(fn, kwargs, name):
    z, y = _inputs()
    with pytest.raises(ValueError, match=name):
        fn(z, y, **kwargs)


@pytest.mark.parametrize(
    "kwargs,name", [kw for kw in BAD_KWARGS if "reg" not in kw[1] and kw[1] != "reduction"]
)
def test_ce_margin_bad_hyperparameters_raise(kwargs, name):
    z, y = _inputs()
    with pytest.raises(ValueError, match=name):
        ce_margin(z, y, **kwargs)


def test_module_validates_at_construction():
    with pytest.raises(ValueError, match="beam_width"):
        BEARLoss(beam_width=0)
    with pytest.raises(ValueError, match="reduction"):
        BEARLoss(reduction="avg")


@pytest.mark.parametrize("fn", [bear_loss, bear_loss_reference, ce_margin])
def test_bad_tensors_raise(fn):
    z, y = _inputs()
    mask = pack_allowed_mask(torch.ones(4, V, dtype=torch.bool))
    cases = [
        ((z, y[:3]), {}, "target"),  # shape
        ((z, y.int()), {}, "target"),  # dtype
        ((z.long(), y), {}, "logits"),  # dtype
        ((z, torch.tensor([0, V, 1, 2])), {}, "target"),  # outside [0, V)
        ((z, torch.tensor([0, -5, 1, 2])), {}, "target"),  # negative, not ignore_index
        ((z, y), {"allowed_mask": mask.long()}, "allowed_mask"),  # dtype
        ((z, y), {"allowed_mask": mask[:, :1]}, "allowed_mask"),  # shape
    ]
    for args, kwargs, name in cases:
        with pytest.raises(ValueError, match=name):
            fn(*args, **kwargs)
    with pytest.raises(TypeError, match="logits"):
        fn(z.tolist(), y)
    with pytest.raises(TypeError, match="beam_width"):
        fn(z, y, beam_width=2.0)


@pytest.mark.parametrize("fn", [bear_loss, bear_loss_reference, ce_margin])
def test_target_outside_allowed_set_raises(fn):
    z, y = _inputs()
    allowed = torch.ones(4, V, dtype=torch.bool)
    allowed[1, 5] = False
    with pytest.raises(ValueError, match="allowed set"):
        fn(z, y, allowed_mask=pack_allowed_mask(allowed))
    # the check can be switched off: no error, and the reference's value (z_y read as -inf:
    # tests/test_loss_hostile.py checks each path against it)
    fn(z, y, allowed_mask=pack_allowed_mask(allowed), validate_target=False)


def test_explicit_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    z, y = _inputs()
    with pytest.raises(ValueError, match="impl='triton'"):
        bear_loss(z, y, impl="triton")


def test_auto_uses_torch_on_cpu(monkeypatch):
    import bear_kernels._triton as tri

    def boom(*a, **k):
        raise AssertionError("triton path used for CPU tensors with impl='auto'")

    monkeypatch.setattr(tri, "ce_margin_triton", boom)
    z, y = _inputs()
    bear_loss(z, y, impl="auto")


def test_pack_allowed_mask_layout_and_counts():
    allowed = torch.rand(5, 70) < 0.5
    allowed[0] = False
    allowed[1, :] = True
    packed = pack_allowed_mask(allowed)
    assert packed.dtype == torch.int32 and packed.shape == (5, 3)
    j = torch.arange(70)
    assert torch.equal(((packed[:, j // 32] >> (j % 32)) & 1).bool(), allowed)
    assert packed[1, 0].item() == -1  # bit 31 set: the two's complement int32
    assert torch.equal(allowed_count(packed, 70), allowed.sum(-1))
    y = torch.tensor([-100, 3, 4, 5, 6])
    assert torch.equal(counted_rows(y, packed, 70), (y != -100) & (allowed.sum(-1) > 1))
    assert torch.equal(counted_rows(y), y != -100)
    with pytest.raises(ValueError, match="mask"):
        pack_allowed_mask(allowed.int())


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_reductions(reduction):
    z, y, mask = make_case(6, V, "mixed", seed=2, ignore_rows=(4,), beam_width=4)
    row = bear_loss(z, y, beam_width=4, allowed_mask=mask, reduction="none", impl="torch")
    got = bear_loss(z, y, beam_width=4, allowed_mask=mask, reduction=reduction, impl="torch")
    counted = counted_rows(y, mask, V)
    want = {"none": row, "sum": row.sum(), "mean": row.sum() / counted.sum()}[reduction]
    torch.testing.assert_close(got, want)
    assert torch.all(row[~counted] == 0)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_no_counted_row_is_zero(impl, reduction):
    z = torch.randn(3, V, requires_grad=True)
    y = torch.full((3,), -100)
    loss = bear_loss(z, y, reduction=reduction, impl=impl)
    loss.sum().backward()
    assert torch.all(loss == 0) and torch.all(z.grad == 0)


def test_module_and_leading_dims():
    z, y, mask = make_case(6, V, "random", seed=4)
    loss = BEARLoss(beam_width=3, reg_weight=0.5, impl="torch")
    want = bear_loss(z, y, beam_width=3, reg_weight=0.5, allowed_mask=mask, impl="torch")
    got = loss(z.reshape(2, 3, V), y.reshape(2, 3), mask.reshape(2, 3, -1))
    torch.testing.assert_close(got, want)
    ce, margin = ce_margin(z.reshape(2, 3, V), y.reshape(2, 3), impl="torch")
    assert ce.shape == (2, 3) and margin.dtype == torch.float32


def test_nan_logits_propagate():
    z = torch.randn(2, V)
    z[0, 3] = float("nan")
    loss = bear_loss(z, torch.tensor([1, 2]), reduction="none", impl="torch")
    assert math.isnan(loss[0].item()) and math.isfinite(loss[1].item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_kind", ["none", "mixed"])
@pytest.mark.parametrize("threshold_grad", [False, True])
def test_torch_path_parity(dtype, mask_kind, threshold_grad):
    z, y, mask = make_case(7, 4099, mask_kind, seed=5, ignore_rows=(3,), dtype=dtype)
    kw = dict(beam_width=10, temperature=0.9, allowed_mask=mask, threshold_grad=threshold_grad)
    check_parity(lambda a, b, **k: bear_loss(a, b, impl="torch", **k), z, y, **kw)
    check_parity(lambda a, b, **k: ce_margin(a, b, impl="torch", **k), z, y, loss="ce", **kw)


def test_torch_path_chunks_are_sized_for_the_device():
    """A few MiB on the CPU (cache-sized), hundreds of rows on a GPU at V = 128256 (each chunk
    costs tens of kernel launches: 8-row chunks made N = 8192 launch about 40,000 of them)."""
    from bear_kernels._torch import _rows_per_chunk

    assert _rows_per_chunk(128256, torch.device("cpu")) == 8
    assert _rows_per_chunk(128256, torch.device("cuda")) == 523
    assert _rows_per_chunk(10**9, torch.device("cuda")) == 1


def test_torch_path_small_chunks(monkeypatch):
    # several row chunks, and counted rows gathered by index (an ignored row in the middle)
    import bear_kernels._torch as tp

    monkeypatch.setattr(tp, "CHUNK_ELEMENTS", 2 * 300)
    z, y, mask = make_case(9, 300, "random", seed=6, ignore_rows=(4,))
    for m in (mask, None):
        check_parity(
            lambda a, b, **k: bear_loss(a, b, impl="torch", **k),
            z,
            y,
            beam_width=7,
            allowed_mask=m,
            threshold_grad=True,
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threshold_grad", [False, True])
@pytest.mark.parametrize("ignored", [(), (1, 4)], ids=["all-rows", "ignored-rows"])
def test_torch_path_sparse_chunks_equal_dense_ones(monkeypatch, dtype, threshold_grad, ignored):
    """Rows that allow few tokens are computed on those tokens only (sparse chunks, several of
    them here); forced through the dense chunks instead, every value and gradient entry is the
    same to rounding (both are the softmax over A, summed in another order)."""
    import bear_kernels._torch as tp

    monkeypatch.setattr(tp, "CHUNK_ELEMENTS", 300)  # sparse chunks of 8 rows
    z, y, mask = make_case(9, 300, "mixed", seed=7, ignore_rows=ignored, dtype=dtype)
    chunks = tp._chunks(torch.arange(9), 9, 300, allowed_count(mask, 300), True)
    assert len(chunks) == 2 and all(c.width == 13 for c in chunks)  # the widest row allows 13
    kw = dict(beam_width=7, allowed_mask=mask, threshold_grad=threshold_grad, impl="torch")
    out = {}
    for path, ratio in (("sparse", tp.SPARSE_RATIO), ("dense", 10**9)):
        monkeypatch.setattr(tp, "SPARSE_RATIO", ratio)
        for reduction in ("mean", "none"):
            leaf = z.clone().requires_grad_(True)
            loss = bear_loss(leaf, y, reduction=reduction, **kw)
            loss.sum().backward()
            out[path, reduction] = (loss.detach(), leaf.grad)
    for reduction in ("mean", "none"):
        for a, b in zip(out["sparse", reduction], out["dense", reduction], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask_kind", ["none", "mixed", "random"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_path_takes_logits_that_are_a_transposed_view(mask_kind, reduction):
    """Logits whose rows are not contiguous (a transposed view): the gradient buffer is
    row-major whatever z's strides (sparse chunks wrote it at row·V + token and raised), and
    the unmasked pre-pass is skipped for the chunks' own top-k."""
    z, y, mask = make_case(7, 300, mask_kind, seed=8, ignore_rows=(2,), dtype=torch.float64)
    view = z.t().contiguous().t()  # same values, strides (1, N)
    assert view.stride(1) != 1
    kw = dict(beam_width=5, allowed_mask=mask, reduction=reduction)
    out = []
    for fn, logits in ((bear_loss, view), (bear_loss_reference, z)):
        leaf = logits.detach().clone() if fn is bear_loss_reference else logits.detach()
        leaf = leaf.requires_grad_(True)
        loss = fn(leaf, y, **kw) if fn is bear_loss_reference else fn(leaf, y, impl="torch", **kw)
        loss.sum().backward()
        out.append((loss.detach(), leaf.grad))
    for got, want in zip(*out, strict=True):
        torch.testing.assert_close(got, want)


def test_torch_path_unmasked_terms_in_blocks_of_rows(monkeypatch):
    """Without a mask every row's top-B comes before the chunks, in blocks of rows no larger
    than a chunk (here one row each, some B above V / 64: candidates are whole rows)."""
    import bear_kernels._torch as tp

    monkeypatch.setattr(tp, "CHUNK_ELEMENTS", 300)
    z, y, _ = make_case(6, 300, "none", seed=9, ignore_rows=(1,), dtype=torch.float64)
    for beam_width in (2, 7):
        kw = dict(beam_width=beam_width, temperature=0.8)
        check_parity(lambda a, b, **k: bear_loss(a, b, impl="torch", **k), z, y, **kw)


@pytest.mark.parametrize("shape", [(21, 49152), (4, 4099), (1, 7), (300, 33)])
def test_the_cpu_softmax_written_over_its_input_equals_a_separate_output(shape):
    """The torch path soft-maxes a chunk's own buffer in place on the CPU (one (R, V) buffer per
    chunk, not two); torch's kernel must read each entry before writing it."""
    from bear_kernels._torch import _softmax, _Workspace

    z = torch.randn(*shape, dtype=torch.float64).float() * 4  # stands in for the logits
    x = z * 1.0  # a buffer of the call's own, as _scaled_rows returns one
    want = torch.softmax(x, dim=-1)
    got = _softmax(x, z, _Workspace(z.device))
    assert got.data_ptr() == x.data_ptr() and torch.equal(got, want)
    assert _softmax(z, z, _Workspace(z.device)).data_ptr() != z.data_ptr()  # z is never written


@pytest.mark.parametrize("fn", [bear_loss, bear_loss_reference, ce_margin])
def test_device_mismatch_raises(fn):
    z, y = _inputs()
    with pytest.raises(ValueError, match="target"):
        fn(z, y.to("meta"))
    mask = pack_allowed_mask(torch.ones(4, V, dtype=torch.bool)).to("meta")
    with pytest.raises(ValueError, match="allowed_mask"):
        fn(z, y, allowed_mask=mask)

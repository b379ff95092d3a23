"""The Triton kernels under TRITON_INTERPRET=1 (set by conftest) against the reference."""

import pytest
import torch

from bear_kernels import bear_loss, bear_loss_reference, ce_margin, ce_margin_reference
from tests._helpers_kernels import check_parity, make_case

pytest.importorskip("triton")


def _triton_bear(z, y, **kw):
    return bear_loss(z, y, impl="triton", **kw)


def _triton_ce(z, y, **kw):
    return ce_margin(z, y, impl="triton", **kw)


CASES = [
    # (N, V, B, mask kind, ignored rows, tau, threshold_grad, reduction, dtype)
    (7, 4099, 10, "none", (), 1.0, False, "mean", torch.float32),
    (7, 4099, 10, "mixed", (2,), 0.7, True, "sum", torch.float32),
    (5, 4099, 10, "mixed", (0, 4), 1.3, False, "none", torch.float16),
    (6, 1000, 64, "random", (1,), 1.0, True, "mean", torch.float16),
    (3, 257, 1, "random", (), 2.0, False, "none", torch.float32),
    (4, 33, 50, "mixed", (), 1.0, True, "mean", torch.float32),  # B > V
]


@pytest.mark.parametrize("n,v,b,kind,ignored,tau,tg,reduction,dtype", CASES)
def test_triton_matches_reference(n, v, b, kind, ignored, tau, tg, reduction, dtype):
    z, y, mask = make_case(n, v, kind, seed=n + v, ignore_rows=ignored, dtype=dtype, beam_width=b)
    kw = dict(beam_width=b, temperature=tau, allowed_mask=mask, threshold_grad=tg)
    check_parity(_triton_bear, z, y, reduction=reduction, reg_weight=0.7, **kw)
    check_parity(_triton_ce, z, y, loss="ce", **kw)


def test_allowed_tokens_in_the_last_chunk_of_a_long_vocabulary():
    # V = 20483: 21 chunks of 1024 under the interpreter; A = the last 3 tokens
    z, y, mask = make_case(2, 20483, "last_chunk", seed=9)
    z[:, :-3] += 30.0  # masked logits far above the allowed ones must not matter
    check_parity(_triton_bear, z, y, beam_width=2, allowed_mask=mask, threshold_grad=True)


def test_masked_minus_inf_chunks_do_not_give_nan():
    # whole chunks of -inf logits, allowed or not, before the finite ones
    z, y, mask = make_case(3, 3000, "random", seed=10)
    z[:, :2048] = float("-inf")
    allowed = torch.zeros(3, 3000, dtype=torch.bool)
    allowed[:, 100:200] = True  # -inf and allowed
    allowed[:, 2500:2600] = True
    y = torch.tensor([2510, 2550, 2599])
    from bear_kernels import pack_allowed_mask

    mask = pack_allowed_mask(allowed)
    for impl in ("triton", "torch"):
        zz = z.clone().requires_grad_(True)
        loss = bear_loss(zz, y, beam_width=5, allowed_mask=mask, impl=impl)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(zz.grad).all()
    check_parity(_triton_ce, z, y, loss="ce", beam_width=5, allowed_mask=mask)


def test_all_rows_ignored():
    z = torch.randn(4, 500, requires_grad=True)
    y = torch.full((4,), -100)
    for reduction in ("none", "sum", "mean"):
        loss = bear_loss(z, y, reduction=reduction, impl="triton")
        (grad,) = torch.autograd.grad(loss.sum(), z)
        assert torch.all(loss == 0) and torch.all(grad == 0)


def test_threshold_ties_go_to_the_lower_index():
    z = torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0]], requires_grad=True)
    _, margin = ce_margin(z, torch.tensor([3]), beam_width=2, threshold_grad=True, impl="triton")
    (grad,) = torch.autograd.grad(margin.sum(), z)
    assert grad.tolist() == [[0.0, 1.0, 0.0, -1.0, 0.0]]


@pytest.mark.parametrize("kind", ["none", "mixed"])
def test_gradcheck_triton_float64(kind):
    # fast_mode: the interpreter makes each call slow, so check random projections of the
    # Jacobian (torch's fast gradcheck) rather than all N·V columns
    z, y, mask = make_case(
        3, 29, kind, seed=11, ignore_rows=(1,), dtype=torch.float64, beam_width=3
    )
    z.requires_grad_(True)
    kw = dict(beam_width=3, temperature=0.8, allowed_mask=mask, impl="triton")
    check = dict(fast_mode=True)
    assert torch.autograd.gradcheck(
        lambda t: ce_margin(t, y, threshold_grad=True, **kw), (z,), **check
    )
    assert torch.autograd.gradcheck(lambda t: ce_margin(t, y, **kw)[0], (z,), **check)
    ce, margin = ce_margin(z, y, **kw)
    (g_ce,) = torch.autograd.grad(ce.sum(), z, retain_graph=True)
    (g_margin,) = torch.autograd.grad(margin.sum(), z)
    torch.testing.assert_close(g_margin, g_ce)


def test_limits_raise():
    z = torch.randn(2, 50)
    y = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="beam_width"):
        bear_loss(z, y, beam_width=65, impl="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_matches_reference(dtype):
    z, y, mask = make_case(64, 32000, "random", seed=12, ignore_rows=(3,), dtype=dtype)
    z, y, mask = z.cuda(), y.cuda(), mask.cuda()
    kw = dict(beam_width=10, allowed_mask=mask)
    out = bear_loss(z, y, impl="triton", **kw)
    want = bear_loss(z, y, impl="torch", **kw)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("threshold_grad", [False, True])
def test_fused_gradient_scales_with_the_upstream_gradient(reduction, threshold_grad):
    # bear_loss(impl="triton") with sum / mean writes its gradient in the forward kernel
    z, y, mask = make_case(5, 700, "mixed", seed=13, ignore_rows=(1,), beam_width=4)
    kw = dict(
        beam_width=4,
        reg_weight=0.6,
        reg_temperature=0.8,
        allowed_mask=mask,
        reduction=reduction,
        threshold_grad=threshold_grad,
    )
    z1 = z.clone().requires_grad_(True)
    z2 = z.clone().requires_grad_(True)
    fused = bear_loss(z1, y, impl="triton", **kw)
    ref = bear_loss(z2, y, impl="torch", **kw)
    torch.testing.assert_close(fused, ref)
    (2.5 * fused).backward()
    (2.5 * ref).backward()
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # the unfused forward gives the same value
        torch.testing.assert_close(bear_loss(z, y, impl="triton", **kw), ref.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_beam_entries_over_several_chunks(dtype):
    """B = 50 (packed keys) over 4 chunks of 1024 tokens (the interpreter's BLOCK_V): chunk 1
    fills the slots, chunk 2 plants 5 tokens above all of them, chunk 3 plants 20 above those
    (each entry evicts the worst slot, chunk 2's tokens stay), chunk 4 enters few or none; in
    row 1 ties to chunk 1's 41st value cross the cut. Every row equals the reference."""
    g = torch.Generator().manual_seed(19)
    z = torch.randn(4, 4000, generator=g)
    top = z[:, :1024].max(1, keepdim=True).values
    z[:, 1024 + torch.arange(5) * 97] = top + 1 + torch.arange(5.0)
    z[:, 2048 + torch.arange(20) * 41] = top + 0.5 + torch.arange(20.0) / 4
    z[1, 3000:3010] = z[1, :1024].sort(descending=True).values[40]  # ties at the 50th value
    y = torch.tensor([3, 1024, 2048 + 41, 3005])
    check_parity(_triton_ce, z.to(dtype), y, loss="ce", beam_width=50, threshold_grad=True)
    check_parity(_triton_bear, z.to(dtype), y, beam_width=50, threshold_grad=True)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_many_ties_and_ascending_logits(impl):
    # integer logits: many exact ties at the top-B cut, resolved to the lower index everywhere;
    # ascending logits: every token enters the running top-B of the kernel
    g = torch.Generator().manual_seed(14)
    ties = torch.randint(0, 3, (3, 2100), generator=g).float()
    ascending = torch.arange(2100.0).repeat(2, 1) / 100
    z = torch.cat([ties, ascending])
    y = torch.tensor([5, 7, 2099, 100, 3])
    fn = lambda a, b, **k: ce_margin(a, b, impl=impl, **k)  # noqa: E731
    for beam_width in (6, 50):  # (value, index) pairs; packed keys
        check_parity(fn, z, y, loss="ce", beam_width=beam_width, threshold_grad=True)


@pytest.mark.parametrize("beam_width", [6, 50])
def test_signed_zeros_tie_and_negative_logits_rank_by_value(beam_width):
    # the kernel ranks tokens by an integer key built from the float bits: -0.0 and +0.0 must
    # tie (then the lower index wins) and negative values must rank below by magnitude
    g = torch.Generator().manual_seed(18)
    values = torch.tensor([-2.0, -0.5, -0.0, 0.0])
    z = values[torch.randint(0, 4, (3, 2100), generator=g)]
    z[2, :1500] = -3.0  # few tokens at the top: the cut falls among the signed zeros
    y = torch.tensor([5, 7, 2099])
    check_parity(_triton_ce, z, y, loss="ce", beam_width=beam_width, threshold_grad=True)


def test_fused_rows_in_a_loop_over_fewer_programs(monkeypatch):
    """FUSED_PROGRAMS_PER_SM = 2 on a 1-SM device: 2 programs take 7 rows in turn (ROW_LOOP);
    loss and gradient equal the reference, ignored rows included."""
    import bear_kernels._triton as launcher

    monkeypatch.setattr(launcher, "SM_COUNT_CPU", 1)
    monkeypatch.setattr(launcher, "FUSED_PROGRAMS_PER_SM", 2)
    launches = []
    kernel = launcher._bear_fwd_kernel
    monkeypatch.setattr(
        launcher, "_bear_fwd_kernel", type("K", (), {"__getitem__": lambda _, grid: (
            launches.append(grid) or kernel[grid])})(),
    )  # fmt: skip
    z, y, mask = make_case(7, 3000, "mixed", seed=21, ignore_rows=(3,), beam_width=10)
    check_parity(_triton_bear, z, y, beam_width=10, allowed_mask=mask, threshold_grad=True)
    assert launches and all(grid == (2,) for grid in launches)


def test_gpu_block_size_under_the_interpreter(monkeypatch):
    # the CUDA launch uses BLOCK_V = 4096; run that block size through the interpreter too
    import bear_kernels._triton as tri

    monkeypatch.setattr(tri, "BLOCK_V_INTERPRET", tri.BLOCK_V_GPU)
    z, y, mask = make_case(3, 9001, "mixed", seed=15, beam_width=10)
    check_parity(_triton_bear, z, y, beam_width=10, allowed_mask=mask, threshold_grad=True)


def test_forward_warps_launch_and_their_chunks(monkeypatch):
    """FORWARD_WARPS = w launches the whole-row forward with w warps and chunks of 256·w tokens
    on a GPU (the interpreter keeps its own block); 256-token chunks match the reference at
    B = 50, whose entries then spread over many chunks."""
    import bear_kernels._triton as tri

    monkeypatch.setattr(tri, "interpreting", lambda: False)
    cap = {"maxnreg": tri.MAX_REGISTERS_GPU}
    assert tri._forward_config(128256) == (tri.BLOCK_V_GPU, {"num_warps": 8} | cap)
    monkeypatch.setattr(tri, "FORWARD_WARPS", 1)
    assert tri._forward_config(128256) == (256, {"num_warps": 1} | cap)
    assert tri._forward_config(100) == (128, {"num_warps": 1} | cap)
    monkeypatch.undo()
    monkeypatch.setattr(tri, "BLOCK_V_INTERPRET", 256)
    z, y, mask = make_case(3, 5000, "mixed", seed=16, beam_width=50)
    check_parity(_triton_bear, z, y, beam_width=50, allowed_mask=mask, threshold_grad=True)


def test_nan_logits_propagate():
    z = torch.randn(2, 3000)
    z[0, 2500] = float("nan")
    loss = bear_loss(z, torch.tensor([1, 2]), reduction="none", impl="triton")
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1])


SPLIT_CASES = [
    # (N, V, BLOCK_V, B, mask kind, ignored rows, tau, threshold_grad, reduction, dtype)
    (3, 4099, 1024, 10, "mixed", (1,), 0.7, True, "mean", torch.float32),  # last span: 3 tokens
    (2, 2085, 256, 50, "random", (), 1.0, False, "sum", torch.float16),  # B > a span's allowed
    (5, 33, 32, 50, "none", (4,), 1.3, True, "none", torch.float32),  # B > V, two spans
]


@pytest.mark.parametrize("n,v,block_v,b,kind,ignored,tau,tg,reduction,dtype", SPLIT_CASES)
def test_split_v_matches_reference(
    monkeypatch, n, v, block_v, b, kind, ignored, tau, tg, reduction, dtype
):
    # few rows on many SMs: each row is read in spans by separate programs, then merged
    import bear_kernels._triton as tri

    monkeypatch.setattr(tri, "SM_COUNT_CPU", 8)
    monkeypatch.setattr(tri, "SPLIT_MIN_CHUNKS", 1)
    monkeypatch.setattr(tri, "BLOCK_V_INTERPRET", block_v)
    assert tri._span(n, v, block_v, torch.device("cpu")) < v
    z, y, mask = make_case(n, v, kind, seed=n + v, ignore_rows=ignored, dtype=dtype, beam_width=b)
    kw = dict(beam_width=b, temperature=tau, allowed_mask=mask, threshold_grad=tg)
    check_parity(_triton_bear, z, y, reduction=reduction, reg_weight=0.7, **kw)
    check_parity(_triton_ce, z, y, loss="ce", **kw)


def test_split_v_ties_across_spans_go_to_the_lower_index(monkeypatch):
    import bear_kernels._triton as tri

    monkeypatch.setattr(tri, "SM_COUNT_CPU", 8)
    monkeypatch.setattr(tri, "SPLIT_MIN_CHUNKS", 1)
    monkeypatch.setattr(tri, "BLOCK_V_INTERPRET", 64)
    g = torch.Generator().manual_seed(16)
    z = torch.randint(0, 3, (3, 300), generator=g).float()  # ties at the cut in every span
    y = torch.tensor([5, 299, 64])
    check_parity(_triton_ce, z, y, loss="ce", beam_width=6, threshold_grad=True)


def _sparse_minus_inf_case(dtype):
    """Rows of a few allowed tokens over five 1024-token chunks, some allowed logits -inf and
    alone in their chunk, before the finite ones; (z, y, mask, {B: expected b per row})."""
    z = torch.randn(4, 5000, generator=torch.Generator().manual_seed(21)).to(dtype)
    allowed = torch.zeros(4, 5000, dtype=torch.bool)
    inf, finite = float("-inf"), {0: [3000, 4000], 1: [2500, 2600], 2: [4100], 3: [2000, 3000]}
    minus_inf = {0: [10, 20], 1: [1100, 1500], 2: [7], 3: [5]}
    for row in range(4):
        allowed[row, finite[row] + minus_inf[row]] = True
        z[row, minus_inf[row]] = inf
    z[3, 2000] = -1e300 if dtype == torch.float64 else -1e30  # finite, far below the others
    y = torch.tensor([3000, 2600, 4100, 3000])
    from bear_kernels import pack_allowed_mask

    # b: the B'-th of the allowed tokens by value, then index; B' = min(B, n)
    def lower(row, i, j):  # the lower-valued of two finite allowed tokens
        return i if z[row, i] < z[row, j] else j

    expected = {2: [lower(0, 3000, 4000), lower(1, 2500, 2600), 7, 2000]}
    expected |= {3: [10, 1100, 7, 5], 10: [20, 1500, 7, 5]}
    return z, y, pack_allowed_mask(allowed), expected


@pytest.mark.parametrize("split", [False, True], ids=["whole-row", "split-V"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_masks_rank_allowed_minus_inf_logits_after_the_finite_ones(
    monkeypatch, split, dtype
):
    # a chunk without allowed tokens is never searched: an allowed -inf logit alone in its chunk
    # must still fill the top-B after every finite one, lowest index first (float64: after a
    # finite -1e300, below float32's range)
    import bear_kernels._triton as tri
    from bear_kernels._common import LossParams, counted_rows

    monkeypatch.setattr(tri, "BLOCK_V_INTERPRET", 1024)
    if split:
        monkeypatch.setattr(tri, "SM_COUNT_CPU", 8)
        monkeypatch.setattr(tri, "SPLIT_MIN_CHUNKS", 1)
    z, y, mask, expected = _sparse_minus_inf_case(dtype)
    assert (tri._span(4, 5000, 1024, z.device) < 5000) == split
    for beam_width, rows in expected.items():
        params = LossParams(beam_width, 1.0, -100, False)
        ce, margin, lse, b = tri._fwd(z, y, mask, counted_rows(y, mask, 5000), params)
        assert b.tolist() == rows, beam_width
        ref_ce, ref_margin = ce_margin_reference(z, y, beam_width=beam_width, allowed_mask=mask)
        torch.testing.assert_close(ce, ref_ce.to(ce.dtype))
        torch.testing.assert_close(margin, ref_margin.to(margin.dtype))


def test_a_masked_row_whose_allowed_logits_are_all_minus_inf_has_lse_minus_inf():
    # allowed -inf logits count as the lowest finite value inside the kernel; the row's lse
    # must still be -inf (and its ce NaN, as the reference's)
    import bear_kernels._triton as tri
    from bear_kernels import pack_allowed_mask
    from bear_kernels._common import LossParams, counted_rows

    z = torch.randn(2, 3000, generator=torch.Generator().manual_seed(23))
    allowed = torch.zeros(2, 3000, dtype=torch.bool)
    allowed[:, [40, 1500, 2900]] = True
    z[0, [40, 1500, 2900]] = float("-inf")
    y = torch.tensor([1500, 1500])
    mask = pack_allowed_mask(allowed)
    ce, _, lse, _ = tri._fwd(
        z, y, mask, counted_rows(y, mask, 3000), LossParams(10, 1.0, -100, False)
    )
    ref_ce, _ = ce_margin_reference(z, y, beam_width=10, allowed_mask=mask)
    assert lse[0].item() == float("-inf") and torch.isfinite(lse[1])
    assert torch.isnan(ce[0]) and torch.isnan(ref_ce[0])
    torch.testing.assert_close(ce[1], ref_ce[1].to(ce.dtype))


def test_nan_logits_propagate_through_a_mask():
    # a NaN allowed logit makes its row's loss NaN; a NaN outside the allowed set changes nothing
    z, y, mask = make_case(3, 3000, "random", seed=22)
    from bear_kernels import unpack_allowed_mask

    allowed = unpack_allowed_mask(mask, 3000)
    z[0, allowed[0].nonzero()[5, 0]] = float("nan")
    z[1, (~allowed[1]).nonzero()[5, 0]] = float("nan")
    loss = bear_loss(z, y, reduction="none", allowed_mask=mask, impl="triton")
    ref = bear_loss_reference(z, y, reduction="none", allowed_mask=mask)
    assert torch.isnan(loss[0]) and torch.isnan(ref[0])
    torch.testing.assert_close(loss[1:], ref[1:].to(loss.dtype))


@pytest.mark.parametrize("beam_width", [10, 17], ids=["pairs", "keys"])
def test_a_nan_beside_one_other_allowed_logit_gives_nan_not_an_uncounted_row(beam_width):
    # |A| = 2 with one logit NaN: a NaN never takes a top-B slot, so the kernel saw one real
    # slot and called the row uncounted (ce = Δ = 0, a finite loss); the reference gives NaN
    from bear_kernels import pack_allowed_mask

    z = torch.randn(2, 100, generator=torch.Generator().manual_seed(0))
    z[0, 20] = float("nan")
    allowed = torch.zeros(2, 100, dtype=torch.bool)
    allowed[:, [10, 20]] = True
    allowed[1, 30] = True
    mask, y = pack_allowed_mask(allowed), torch.tensor([10, 30])
    kw = dict(beam_width=beam_width, allowed_mask=mask)
    ce, _ = ce_margin(z, y, impl="triton", **kw)
    ref_ce, _ = ce_margin_reference(z, y, **kw)
    assert torch.isnan(ce[0]) and torch.isnan(ref_ce[0])
    torch.testing.assert_close(ce[1], ref_ce[1].to(ce.dtype))
    for reduction in ("none", "mean"):
        loss = bear_loss(z, y, reduction=reduction, impl="triton", **kw)
        ref = bear_loss_reference(z, y, reduction=reduction, **kw)
        assert torch.isnan(loss.flatten()[0]) and torch.isnan(ref.flatten()[0])


def test_the_register_cap_is_not_passed_to_rocm(monkeypatch):
    # Triton's ROCm options have no maxnreg, and an unknown launch keyword raises
    import bear_kernels._triton as tri

    monkeypatch.setattr(tri, "interpreting", lambda: False)
    monkeypatch.setattr(torch.version, "hip", None)
    assert tri._launch_kwargs() == {"num_warps": 8, "maxnreg": tri.MAX_REGISTERS_GPU}
    monkeypatch.setattr(torch.version, "hip", "6.4")
    assert tri._launch_kwargs() == {"num_warps": 8}
    monkeypatch.setattr(tri, "FORWARD_WARPS", 1)
    assert tri._forward_config(128256) == (256, {"num_warps": 1})


@pytest.mark.parametrize("split", [False, True], ids=["whole-row", "split-V"])
@pytest.mark.parametrize("kind", ["none", "mixed"])
def test_float64_logits_match_the_float64_reference_to_float64_precision(monkeypatch, split, kind):
    # 1/tau, λ and 1/ξ reach the kernels as fp64 arguments: as plain Python floats they were
    # fp32, and fp64 losses agreed with the reference to ~1e-8 only
    import bear_kernels._triton as tri

    if split:
        monkeypatch.setattr(tri, "SM_COUNT_CPU", 8)
        monkeypatch.setattr(tri, "SPLIT_MIN_CHUNKS", 1)
        monkeypatch.setattr(tri, "BLOCK_V_INTERPRET", 256)
    z, y, mask = make_case(3, 2000, kind, seed=24, dtype=torch.float64, scale=8.0)
    kw = dict(beam_width=10, temperature=0.7, allowed_mask=mask)
    ce, margin = ce_margin(z, y, impl="triton", **kw)
    ref_ce, ref_margin = ce_margin_reference(z, y, **kw)
    torch.testing.assert_close(ce, ref_ce, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(margin, ref_margin, rtol=1e-13, atol=1e-13)
    kw |= dict(reg_weight=0.7, reg_temperature=0.3, reduction="mean")
    zz, zr = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    loss, ref = bear_loss(zz, y, impl="triton", **kw), bear_loss_reference(zr, y, **kw)
    torch.testing.assert_close(loss, ref, rtol=1e-13, atol=1e-13)
    (grad,), (ref_grad,) = torch.autograd.grad(loss, zz), torch.autograd.grad(ref, zr)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-13)

"""Hostile inputs of the loss (SPEC §10): non-finite logits, targets outside A, double backward."""

from dataclasses import dataclass, field
from functools import partial

import pytest
import torch

import bear_kernels._torch as tp
import bear_kernels._triton as tri
from bear_kernels import (
    allowed_count,
    bear_loss,
    bear_loss_reference,
    ce_margin,
    ce_margin_reference,
    pack_allowed_mask,
)
from tests._helpers_kernels import ATOL

V = 70  # three bitmask words, the last one partial
IMPLS = ("torch", "triton")
# the interpreter's numpy warns on the NaN and inf arithmetic these rows are made of
QUIET_NAN = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning", "ignore:All-NaN slice:RuntimeWarning"
)


def _masked_case(bad_value, density="dense"):
    """Logits whose masked-out entries hold `bad_value`, and the same logits with 0 there; about
    40 % of the tokens allowed ("dense"), or 3 per row ("sparse": the torch path then reads only
    the allowed logits)."""
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(3, V, generator=g)
    allowed = torch.rand(3, V, generator=g) < (0.4 if density == "dense" else 0.0)
    allowed[:, :2] = True  # every row has at least 2 allowed tokens, target 0 or 1
    if density == "sparse":
        allowed[torch.arange(3), torch.tensor([5, 37, 69])] = True  # one in each word
    hostile = torch.where(allowed, clean, bad_value)
    clean = torch.where(allowed, clean, 0.0)
    return hostile, clean, torch.tensor([0, 1, 0]), pack_allowed_mask(allowed)


def _value_and_grad(fn, z):
    z = z.clone().requires_grad_(True)
    out = fn(z)
    total = out if out.dim() == 0 else out.sum()
    (grad,) = torch.autograd.grad(total, z)
    return out.detach(), grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["+inf", "nan"])
@pytest.mark.parametrize("threshold_grad", [False, True])
@pytest.mark.parametrize("form", ["ce", "margin", "mean", "none"])
@pytest.mark.parametrize("density", ["dense", "sparse"])
def test_nonfinite_logits_outside_the_allowed_set_have_no_effect(
    impl, bad, threshold_grad, form, density
):
    hostile, clean, y, mask = _masked_case(bad, density)
    kw = dict(beam_width=3, allowed_mask=mask, impl=impl, threshold_grad=threshold_grad)
    if form in ("ce", "margin"):
        pick = 0 if form == "ce" else 1

        def fn(z):
            return ce_margin(z, y, **kw)[pick]
    else:

        def fn(z):
            return bear_loss(z, y, reduction=form, **kw)

    got, got_grad = _value_and_grad(fn, hostile)
    want, want_grad = _value_and_grad(fn, clean)
    assert torch.isfinite(got).all() and torch.isfinite(got_grad).all()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("form", ["ce_margin", "mean", "none"])
def test_double_backward_raises_a_clear_error(impl, form):
    z = torch.randn(4, V, requires_grad=True)
    y = torch.tensor([0, 5, 9, 69])
    if form == "ce_margin":
        ce, margin = ce_margin(z, y, beam_width=3, impl=impl)
        loss = (ce + margin).sum()
    else:
        loss = bear_loss(z, y, beam_width=3, reduction=form, impl=impl).sum()
    with pytest.raises(RuntimeError, match="double backward.*bear_loss_reference"):
        torch.autograd.grad(loss, z, create_graph=True)


def test_double_backward_of_the_reference_works():
    z = torch.randn(4, V, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 5, 9, 69])
    (g,) = torch.autograd.grad(bear_loss_reference(z, y, beam_width=3), z, create_graph=True)
    (gg,) = torch.autograd.grad((g**2).sum(), z)
    assert torch.isfinite(gg).all() and gg.abs().sum() > 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("beam_width", [1, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_an_allowed_plus_inf_logit_gives_the_references_values(beam_width, masked, impl):
    """One +inf among the allowed logits: lse = +inf, so ce = +inf for another target (NaN for the
    +inf one) and Δ = log β - log p_y is NaN, as the reference computes them (the torch path gave
    ce NaN and a finite Δ; the Triton path ce NaN and Δ finite or -inf)."""
    z = torch.tensor([[1.0, float("inf"), 0.5, 2.0], [float("inf"), 0.0, 1.0, 0.3]])
    y = torch.tensor([2, 0])
    mask = None
    if masked:
        mask = pack_allowed_mask(torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool))
    got = ce_margin(z, y, beam_width=beam_width, allowed_mask=mask, impl=impl)
    ref = ce_margin_reference(z.double(), y, beam_width=beam_width, allowed_mask=mask)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a.double(), b, equal_nan=True)


@QUIET_NAN
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("threshold_grad", [False, True])
@pytest.mark.parametrize("form", ["margin", "none", "sum", "mean"])
def test_a_non_finite_margin_gives_the_references_gradient(impl, masked, threshold_grad, form):
    """Rows whose Δ is NaN (an allowed +inf logit, target or not; a -inf target logit with
    B >= |A|, so z_(B') is the target's): the reference's gradient is NaN on all of A, through
    Δ's p_j terms, which cancel when finite. With threshold_grad the fast paths' p_j coefficient
    left them out, so their gradient was NaN at y and b only."""
    z = torch.tensor(
        [
            [1.0, float("inf"), 0.5, 2.0],
            [float("inf"), 0.0, 1.0, 0.3],
            [0.2, float("-inf"), 1.0, 3.0],
        ]
    )
    y = torch.tensor([2, 0, 1])
    mask = None
    if masked:
        allowed = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
        mask = pack_allowed_mask(allowed)
    kw = dict(beam_width=2, allowed_mask=mask, threshold_grad=threshold_grad)
    fast = _run_form(partial(ce_margin, impl=impl), partial(bear_loss, impl=impl), form)
    reference = _run_form(ce_margin_reference, bear_loss_reference, form)
    _assert_matches(fast(z, y, **kw), reference(z.double(), y, **kw), torch.float32)


# Every path of the torch loss (see bear_kernels._torch), on logits of VG tokens: four groups of
# 64 and a tail, so that the two-level top-k of B = 3 runs. "unmasked": the reduced loss's
# pre-pass; "unmasked-view": logits not contiguous along V (the chunks find their own terms);
# "dense": about 40 % allowed, dense chunks; "sparse": 5 tokens a row, sparse chunks.
VG = 260
TORCH_PATHS = ("unmasked", "unmasked-view", "dense", "sparse")
FORMS = ("ce", "margin", "none", "sum", "mean")


def _path_case(path, ignored):
    """Logits (3, VG), targets [0, 1, 0] (row 2 ignored with `ignored`: the counted rows are then
    gathered by index, not sliced) and the allowed set (3, VG) bool, tokens 0 and 1 in every row."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, VG, generator=g)
    if path == "dense":
        allowed = torch.rand(3, VG, generator=g) < 0.4
    else:
        allowed = torch.zeros(3, VG, dtype=torch.bool)
        allowed[:, [37, 150, 259]] = True  # sparse: tokens in later groups and in the tail
    if path.startswith("unmasked"):
        allowed[:] = True
    allowed[:, :2] = True
    return z, torch.tensor([0, 1, -100 if ignored else 0]), allowed


def _torch_and_reference(z, y, allowed, path, form, dtype, **kw):
    """((values, gradient) of the torch path, the same of the float64 reference) for one form:
    ce or Δ of ce_margin, or bear_loss with that reduction; the reference gets the same values."""
    mask = None
    if not path.startswith("unmasked"):
        mask = pack_allowed_mask(allowed)
        chunks = tp._chunks(torch.arange(3), 3, VG, allowed_count(mask, VG), True)
        assert (chunks[0].width is not None) == (path == "sparse")  # the path the case names
    kw = dict(kw, beam_width=3, allowed_mask=mask)
    logits = z.to(dtype)
    fast_z = logits.t().contiguous().t() if path == "unmasked-view" else logits
    fast = _run_form(partial(ce_margin, impl="torch"), partial(bear_loss, impl="torch"), form)
    reference = _run_form(ce_margin_reference, bear_loss_reference, form)
    return fast(fast_z, y, **kw), reference(logits.double(), y, **kw)


def _run_form(fn_margin, fn_loss, form):
    """A function (logits, y, **kw) -> (values, gradient) of one form: ce or Δ of fn_margin, or
    fn_loss with that reduction."""

    def run(logits, y, **kw):
        if form in ("ce", "margin"):
            return _value_and_grad(lambda a: fn_margin(a, y, **kw)[form == "margin"], logits)
        return _value_and_grad(lambda a: fn_loss(a, y, reduction=form, **kw), logits)

    return run


def _assert_matches(fast, reference, dtype):
    """Values and gradient of a fast path equal the reference's, NaN where it has NaN."""
    for got, want in zip(fast, reference, strict=True):
        tol = ATOL[dtype]
        torch.testing.assert_close(got.double(), want, equal_nan=True, rtol=tol, atol=tol)


def _assert_nan_row(fast, reference, allowed, dtype):
    """fast equals the reference, and row 1 (its NaN logit allowed) is NaN in value and on A,
    0 outside A."""
    _assert_matches(fast, reference, dtype)
    value, grad = fast
    assert torch.isnan(value.reshape(-1)[1 if value.dim() else 0])
    assert torch.isnan(grad[1][allowed[1]]).all() and (grad[1][~allowed[1]] == 0).all()


@pytest.mark.parametrize("path", TORCH_PATHS)
@pytest.mark.parametrize("ignored", [False, True], ids=["sliced", "gathered"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("threshold_grad", [False, True])
def test_an_allowed_nan_logit_gives_the_references_nans(path, ignored, dtype, form, threshold_grad):
    """A NaN among a counted row's allowed logits (not its target's): the reference's lse is NaN,
    so ce, Δ = (z_(B') - lse) - (z_y - lse) and the loss are NaN, and the gradient is NaN on A
    and 0 outside A; the other rows keep their values. The torch path gave a finite Δ (from
    z_(B') - z_y), and on dense chunks a NaN gradient outside A too."""
    z, y, allowed = _path_case(path, ignored)
    z[1, 0] = float("nan")  # allowed, row 1's target is 1
    fast, reference = _torch_and_reference(
        z, y, allowed, path, form, dtype, threshold_grad=threshold_grad
    )
    _assert_nan_row(fast, reference, allowed, dtype)


@QUIET_NAN
@pytest.mark.parametrize("path", TORCH_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("threshold_grad", [False, True])
def test_an_allowed_plus_inf_logit_gives_the_references_gradient_on_every_torch_path(
    path, dtype, form, threshold_grad
):
    """An allowed +inf logit (not the target's): the reference's p is NaN there and 0 on the rest
    (lse = +inf), so ce's gradient is 0 on A but at the +inf and at y, and Δ is NaN (a NaN
    gradient on A for the loss). The softmax made the whole row NaN, outside A too."""
    z, y, allowed = _path_case(path, False)
    z[1, 0] = float("inf")  # allowed, row 1's target is 1
    fast, reference = _torch_and_reference(
        z, y, allowed, path, form, dtype, threshold_grad=threshold_grad
    )
    _assert_matches(fast, reference, dtype)
    assert (fast[1][1][~allowed[1]] == 0).all()


@pytest.mark.parametrize("path", ["dense", "sparse"])
@pytest.mark.parametrize("ignored", [False, True], ids=["sliced", "gathered"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("threshold_grad", [False, True])
@pytest.mark.parametrize("nan_row", [False, True], ids=["finite", "nan-in-A"])
def test_a_target_outside_the_allowed_set_unchecked_gives_the_references_values(
    path, ignored, dtype, form, threshold_grad, nan_row
):
    """validate_target=False and a counted row whose target y lies outside A: the reference masks
    z_y to -inf before reading it, so ce = Δ = +inf and the gradient at y is 0 (p_y = 0 and the
    masked_fill stops the -1 of d(-log p_y)/dz_y). The torch path wrote -c_y there (-1 for ce)."""
    z, y, allowed = _path_case(path, ignored)
    allowed[1, 1] = False  # row 1's target; A keeps token 0 and others
    if nan_row:
        z[1, 0] = float("nan")
    fast, reference = _torch_and_reference(
        z, y, allowed, path, form, dtype, threshold_grad=threshold_grad, validate_target=False
    )
    _assert_matches(fast, reference, dtype)
    assert fast[1][1, 1] == 0


# The same two rows on the Triton path (bear_kernels._triton, under TRITON_INTERPRET=1), every
# launch the dispatcher can pick: "rows", one program per row (_bear_fwd_kernel, with the
# gradient fused for sum / mean, else then _bear_bwd_kernel); "row-loop", the fused loss with
# fewer programs than rows (FUSED_PROGRAMS_PER_SM); "split", split-V (_bear_span_kernel over
# spans of 32 tokens, _bear_merge_kernel, _bear_bwd_kernel on the (row, span) grid). VT tokens:
# three mask words, the last one partial, and three spans.
VT = 70
TRITON_LAUNCHES = ("rows", "row-loop", "split")
# a (kernel, grid) that each launch makes for 4 rows, and no other launch makes
SIGNATURE_LAUNCH = {
    "rows": ("_bear_fwd_kernel", (4,)),
    "row-loop": ("_bear_fwd_kernel", (1,)),
    "split": ("_bear_merge_kernel", (4,)),
}


def _triton_params(masks):
    """(launch, masked, form) cases; the row loop only runs the fused forms (sum, mean)."""
    return [
        pytest.param(launch, masked, form, id=f"{launch}-{'masked' if masked else 'all'}-{form}")
        for launch in TRITON_LAUNCHES
        for masked in masks
        for form in FORMS
        if launch != "row-loop" or form in ("sum", "mean")
    ]


class _Recorded:
    """A Triton kernel that records (name, grid) of each launch, then launches."""

    def __init__(self, kernel, name, launched):
        self.kernel, self.name, self.launched = kernel, name, launched

    def __getitem__(self, grid):
        self.launched.append((self.name, grid))
        return self.kernel[grid]


@dataclass
class _TritonRun:
    """How a case runs the Triton path: the launch, whether a mask is given, what it launched."""

    launch: str
    masked: bool
    launched: list = field(default_factory=list)  # (kernel name, grid) of each launch


def _triton_case(monkeypatch, launch, masked):
    """Logits (4, VT), targets [0, 1, ignored, 0], the allowed set (4, VT) bool (about 40 % with
    a mask, tokens 0, 1 and 40 in every row; all without) and a _TritonRun, with
    bear_kernels._triton set up for the launch."""
    if launch == "split":  # 8 SMs for 4 rows: spans of one 32-token chunk
        monkeypatch.setattr(tri, "SM_COUNT_CPU", 8)
        monkeypatch.setattr(tri, "SPLIT_MIN_CHUNKS", 1)
        monkeypatch.setattr(tri, "BLOCK_V_INTERPRET", 32)
    elif launch == "row-loop":  # 1 SM, 1 program for the 4 rows
        monkeypatch.setattr(tri, "SM_COUNT_CPU", 1)
        monkeypatch.setattr(tri, "FUSED_PROGRAMS_PER_SM", 1)
    run = _TritonRun(launch, masked)
    for name in ("_bear_fwd_kernel", "_bear_span_kernel", "_bear_merge_kernel", "_bear_bwd_kernel"):
        monkeypatch.setattr(tri, name, _Recorded(getattr(tri, name), name, run.launched))
    g = torch.Generator().manual_seed(2)
    z = torch.randn(4, VT, generator=g)
    allowed = torch.rand(4, VT, generator=g) < (0.4 if masked else 2.0)
    allowed[:, [0, 1, 40]] = True
    return z, torch.tensor([0, 1, -100, 0]), allowed, run


def _triton_and_reference(z, y, allowed, run: _TritonRun, form, dtype, **kw):
    """((values, gradient) of the Triton path, the same of the float64 reference) for one form,
    after checking that the Triton path made the launch the case names."""
    kw = {"beam_width": 3, **kw, "allowed_mask": pack_allowed_mask(allowed) if run.masked else None}
    logits = z.to(dtype)
    fast = _run_form(partial(ce_margin, impl="triton"), partial(bear_loss, impl="triton"), form)
    fast = fast(logits, y, **kw)
    assert SIGNATURE_LAUNCH[run.launch] in run.launched
    reference = _run_form(ce_margin_reference, bear_loss_reference, form)
    return fast, reference(logits.double(), y, **kw)


@QUIET_NAN
@pytest.mark.parametrize("launch,masked,form", _triton_params((False, True)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("threshold_grad", [False, True])
def test_triton_an_allowed_nan_logit_gives_the_references_nans(
    monkeypatch, launch, masked, form, dtype, threshold_grad
):
    """test_an_allowed_nan_logit_gives_the_references_nans on the Triton path, the NaN in
    another span than the target's: Δ was finite there (x_b - x_y; NaN only on a row with an
    allowed +inf), the gradient is NaN on A and 0 outside A, the other rows keep their values."""
    z, y, allowed, run = _triton_case(monkeypatch, launch, masked)
    z[1, 40] = float("nan")  # allowed, row 1's target is 1
    fast, reference = _triton_and_reference(
        z, y, allowed, run, form, dtype, threshold_grad=threshold_grad
    )
    _assert_nan_row(fast, reference, allowed, dtype)


@QUIET_NAN
@pytest.mark.parametrize("launch,masked,form", _triton_params((False, True)))
@pytest.mark.parametrize("threshold_grad", [False, True])
@pytest.mark.parametrize("left", [1, 0], ids=["all-but-one", "all"])
@pytest.mark.parametrize("beam_width", [3, 17], ids=["pairs", "keys"])
def test_triton_a_row_whose_allowed_logits_are_nan_but_at_most_one_gives_the_references_nans(
    monkeypatch, launch, masked, form, threshold_grad, left, beam_width
):
    """A counted row whose allowed logits are all NaN, or all but one. The slots of B <= 16
    (value, index pairs) never take a NaN, so the kernels saw at most one allowed token and took
    the row for uncounted (n = 1): the values were patched to NaN afterwards, but the gradient
    stayed 0 where the reference's is NaN on A; now the kernels take the counted rows from the
    mask. Those of B > 16 (packed keys) took an unmasked NaN, above +inf: with the slots all
    NaN, b was -1 (the row read as uncounted by the backward, z_b read before the row)."""
    z, y, allowed, run = _triton_case(monkeypatch, launch, masked)
    z[1] = torch.where(allowed[1], float("nan"), z[1])
    if left:
        z[1, 1] = 0.5  # row 1's target, the one finite allowed logit
    kw = dict(threshold_grad=threshold_grad, beam_width=beam_width)
    fast, reference = _triton_and_reference(z, y, allowed, run, form, torch.float32, **kw)
    _assert_nan_row(fast, reference, allowed, torch.float32)


@QUIET_NAN
@pytest.mark.parametrize("launch,masked,form", _triton_params((True,)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("threshold_grad", [False, True])
@pytest.mark.parametrize("nan_row", [False, True], ids=["finite", "nan-in-A"])
def test_triton_a_target_outside_the_allowed_set_unchecked_gives_the_references_values(
    monkeypatch, launch, masked, form, dtype, threshold_grad, nan_row
):
    """test_a_target_outside_the_allowed_set_unchecked_gives_the_references_values on the Triton
    path: the kernels read z_y whatever the mask, so ce, Δ and the loss were finite, and they
    wrote -c_y at y; the reference has ce = Δ = +inf and gradient 0 at y."""
    z, y, allowed, run = _triton_case(monkeypatch, launch, masked)
    allowed[1, 1] = False  # row 1's target; A keeps tokens 0, 40 and others
    if nan_row:
        z[1, 40] = float("nan")
    kw = dict(threshold_grad=threshold_grad, validate_target=False)
    fast, reference = _triton_and_reference(z, y, allowed, run, form, dtype, **kw)
    _assert_matches(fast, reference, dtype)
    assert fast[1][1, 1] == 0


def _loss(z, y):
    return bear_loss(z, y, beam_width=5, impl="torch")


def test_under_torch_compile_the_loss_runs_eagerly_and_gives_the_eager_values():
    """Default torch.compile: one graph break at the loss, same loss and gradient; fullgraph=True
    refuses it with the loss's reason."""
    torch.manual_seed(0)
    z, y = torch.randn(6, 50, requires_grad=True), torch.randint(0, 50, (6,))
    eager = _loss(z, y)
    (g_eager,) = torch.autograd.grad(eager, z)
    compiled = torch.compile(lambda a, b: _loss(a * 1.0, b))(z, y)
    (g_compiled,) = torch.autograd.grad(compiled, z)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(g_compiled, g_eager)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="runs eagerly: it selects the counted rows"):
        torch.compile(_loss, fullgraph=True)(z, y)


@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_torch_func_transforms_get_a_clear_error(transform):
    z, y = torch.randn(6, 50), torch.randint(0, 50, (6,))
    if transform == "grad":
        run = lambda: torch.func.grad(lambda a: _loss(a, y))(z)  # noqa: E731
    else:
        run = lambda: torch.func.vmap(lambda a: _loss(a[None], y[:1]))(z)  # noqa: E731
    with pytest.raises(RuntimeError, match=r"bear_loss: torch.func transforms .* loss.backward"):
        run()


def test_meta_logits_get_a_clear_error():
    z = torch.empty(6, 50, device="meta")
    y = torch.zeros(6, dtype=torch.long, device="meta")
    for fn in (_loss, lambda a, b: ce_margin(a, b, impl="torch")):
        with pytest.raises(ValueError, match="logits: a meta tensor .* materialise the model"):
            fn(z, y)

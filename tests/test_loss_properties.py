"""Property-based tests of bear_loss and ce_margin: torch and Triton paths against the reference.

Random shapes, beam widths, temperatures, allowed sets (empty, one token, fewer than B, more than
B, all), ignored rows, and ±inf / NaN logits inside and outside the allowed set. The semantics
checked, from SPEC §2 (a row is *counted* when its target is not ignore_index and |A| > 1):

- Logits outside A have no effect: every path equals the reference on the same row with those
  logits replaced by finite values (the reference itself selects them away).
- A counted row with NaN or +inf among its allowed logits is *poisoned*: its ce is not finite and
  its row loss is NaN on every path (NaN propagates as torch's; +inf gives inf - inf, which the
  reference turns into a NaN margin and the fused paths into a NaN ce). -inf among the allowed
  logits (not on the target) is an ordinary value.
- Every other counted row equals the float64 reference (values and gradients); rows that are not
  counted are 0 with 0 gradient. A sum / mean is NaN iff some counted row is poisoned.

CI-fast and deterministic: derandomised, bounded examples, small V for the Triton interpreter.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bear_kernels import bear_loss, bear_loss_reference, ce_margin, pack_allowed_mask
from bear_kernels._triton import HAS_TRITON
from bear_kernels.reference import ce_margin_reference

IGNORE = -100
KINDS = ("empty", "one", "few", "many", "all")  # |A| = 0, 1, < B, > B, V
SPECIALS = (float("nan"), float("inf"), float("-inf"))
SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def cases(draw, max_vocab):
    """Logits (N, V) float64, targets, allowed (N, V) bool and the loss options of one case."""
    n_rows = draw(st.integers(1, 5))
    vocab = draw(st.integers(2, max_vocab))
    beam = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    # distinct spaced values: no ties at the top-B cut (STYLE 19)
    perm = torch.stack([torch.randperm(vocab, generator=g) for _ in range(n_rows)])
    z = torch.linspace(-3.0, 3.0, vocab, dtype=torch.float64)[perm]  # (N, V)
    allowed = torch.zeros(n_rows, vocab, dtype=torch.bool)  # (N, V)
    target = torch.full((n_rows,), IGNORE, dtype=torch.int64)  # (N,)
    for i in range(n_rows):
        kind = draw(st.sampled_from(KINDS))
        size = {
            "empty": 0,
            "one": 1,
            "few": max(1, min(vocab, beam - 1)),
            "many": min(vocab, beam + 1),
            "all": vocab,
        }[kind]
        members = torch.randperm(vocab, generator=g)[:size]
        allowed[i, members] = True
        if size and draw(st.booleans()):
            target[i] = members[0]  # supervised (about half the non-empty rows)
        # hostile values: outside A, inside A (never on the target), or none
        for _ in range(draw(st.integers(0, 2))):
            value = draw(st.sampled_from(SPECIALS))
            inside = draw(st.booleans())
            pool = (allowed[i] if inside else ~allowed[i]).clone()
            if target[i] >= 0:
                pool[target[i]] = False
            spots = pool.nonzero().squeeze(1)
            if spots.numel():
                z[i, spots[draw(st.integers(0, spots.numel() - 1))]] = value
    options = dict(
        beam_width=beam,
        temperature=draw(st.sampled_from([1.0, 0.7])),
        threshold_grad=draw(st.booleans()),
    )
    return z, target, allowed, options


def _expected_rows(z, target, allowed, options):
    """(counted, poisoned) per row and the reference's ce, Δ, row loss and gradient (float64).

    The reference runs on the logits with every masked entry set to 0, so it cannot be
    influenced by what the masked entries hold.
    """
    n = allowed.sum(1)
    counted = (target != IGNORE) & (n > 1)
    inside = torch.where(allowed, z, 0.0)
    poisoned = counted & (torch.isnan(inside) | torch.isposinf(inside)).any(1)
    clean = torch.where(allowed, z, 0.0).requires_grad_(True)
    mask = pack_allowed_mask(allowed)
    ce, margin = ce_margin_reference(clean, target, allowed_mask=mask, **options)
    rows = bear_loss_reference(clean, target, allowed_mask=mask, reduction="none", **options)
    weights = torch.linspace(0.5, 1.5, len(target), dtype=torch.float64)
    safe = torch.where(poisoned, 0.0, rows)  # gradient of the clean rows only
    (grad,) = torch.autograd.grad((safe * weights).sum(), clean)
    return counted, poisoned, ce.detach(), margin.detach(), rows.detach(), grad, weights


def _check(z, target, allowed, options, impl, dtype):
    counted, poisoned, ce_ref, margin_ref, rows_ref, grad_ref, weights = _expected_rows(
        z, target, allowed, options
    )
    mask = pack_allowed_mask(allowed)
    good = counted & ~poisoned
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-9, rtol=1e-9)
    x = z.to(dtype)

    ce, margin = ce_margin(x, target, allowed_mask=mask, impl=impl, **options)
    assert not torch.isfinite(ce[poisoned]).any()
    assert (ce[~counted] == 0).all() and (margin[~counted] == 0).all()
    torch.testing.assert_close(ce[good].double(), ce_ref[good], **tol)
    torch.testing.assert_close(margin[good].double(), margin_ref[good], **tol)

    for reduction in ("none", "sum", "mean"):
        zz = x.clone().requires_grad_(True)
        loss = bear_loss(zz, target, allowed_mask=mask, impl=impl, reduction=reduction, **options)
        if reduction == "none":
            assert torch.isnan(loss[poisoned]).all() and (loss[~counted] == 0).all()
            torch.testing.assert_close(loss[good].double(), rows_ref[good], **tol)
            total = (torch.where(poisoned, 0.0, loss) * weights.to(loss.dtype)).sum()
            (grad,) = torch.autograd.grad(total, zz)
            torch.testing.assert_close(grad[~poisoned].double(), grad_ref[~poisoned], **tol)
        else:
            assert bool(torch.isnan(loss)) == bool(poisoned.any())
            if not poisoned.any():
                want = rows_ref.sum() / (max(int(counted.sum()), 1) if reduction == "mean" else 1)
                torch.testing.assert_close(loss.double(), want, **tol)
            (grad,) = torch.autograd.grad(loss, zz)
            assert (grad[~counted] == 0).all()
            assert torch.isfinite(grad[~poisoned]).all()


@settings(max_examples=60, **SETTINGS)
@given(case=cases(max_vocab=80), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_torch_path_matches_the_reference_on_hostile_inputs(case, dtype):
    _check(*case, impl="torch", dtype=dtype)


@pytest.mark.skipif(not HAS_TRITON, reason="needs the triton package")
@settings(max_examples=20, **SETTINGS)
@given(case=cases(max_vocab=40))
def test_triton_path_matches_the_reference_on_hostile_inputs(case):
    _check(*case, impl="triton", dtype=torch.float32)

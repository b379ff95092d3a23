"""The plain-PyTorch reference of SPEC §2: hand-computed cases, independent formula, gradcheck."""

import math

import pytest
import torch

from bear_kernels import bear_loss_reference, ce_margin_reference, pack_allowed_mask
from tests._helpers_kernels import make_case


def _mask(rows):
    return pack_allowed_mask(torch.tensor(rows, dtype=torch.bool))


def test_hand_computed_no_mask():
    # z = [2, 1, 0, -1], y = 2, B = 2: ce = log(e^2 + e + 1 + e^-1), z_(2) = 1, Δ = 1 - 0
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0]], dtype=torch.float64)
    y = torch.tensor([2])
    ce, margin = ce_margin_reference(z, y, beam_width=2)
    lse = math.log(math.e**2 + math.e + 1 + math.exp(-1))
    assert ce.item() == pytest.approx(lse)
    assert margin.item() == pytest.approx(1.0)
    loss = bear_loss_reference(z, y, beam_width=2, reg_weight=0.5, reg_temperature=2.0)
    assert loss.item() == pytest.approx(lse + 0.5 * math.log(1 / (1 + math.exp(-0.5))))


def test_hand_computed_mask_and_temperature():
    # A = {0, 2}, tau = 2: log p over {1, 0}; B = 10 > n = 2 so B' = 2, z_(2) = 0 = z_y, Δ = 0
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0]], dtype=torch.float64)
    y = torch.tensor([2])
    mask = _mask([[True, False, True, False]])
    ce, margin = ce_margin_reference(z, y, beam_width=10, temperature=2.0, allowed_mask=mask)
    assert ce.item() == pytest.approx(math.log(math.e + 1))
    assert margin.item() == pytest.approx(0.0)
    loss = bear_loss_reference(z, y, temperature=2.0, allowed_mask=mask, reduction="sum")
    assert loss.item() == pytest.approx(math.log(math.e + 1) + math.log(0.5))


def test_forced_and_ignored_rows_are_not_counted():
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0]] * 3, dtype=torch.float64)
    y = torch.tensor([1, -100, 0])
    mask = _mask([[False, True, False, False], [True] * 4, [True] * 4])
    row = bear_loss_reference(z, y, beam_width=1, allowed_mask=mask, reduction="none")
    assert row[0].item() == 0.0 and row[1].item() == 0.0
    # the mean is over the single counted row
    mean = bear_loss_reference(z, y, beam_width=1, allowed_mask=mask)
    assert mean.item() == pytest.approx(row[2].item())


def test_threshold_ties_go_to_the_lower_index():
    # z = [1, 1, 1, 0], B = 2: the 2nd largest is the 1 at index 1; y = 3
    z = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    _, margin = ce_margin_reference(z, torch.tensor([3]), beam_width=2, threshold_grad=True)
    (grad,) = torch.autograd.grad(margin.sum(), z)
    assert grad.tolist() == [[0.0, 1.0, 0.0, -1.0]]


def _independent(z, y, allowed, beam, tau, lam, xi):
    """SPEC §2 written row by row with the math module (no torch ops on the rows)."""
    losses, grads = [], []
    for zi, yi, ai in zip(z.tolist(), y.tolist(), allowed.tolist(), strict=True):
        members = [j for j, ok in enumerate(ai) if ok]
        if yi == -100 or len(members) <= 1:
            losses.append(0.0)
            grads.append([0.0] * len(zi))
            continue
        top = max(zi[j] / tau for j in members)
        lse = top + math.log(sum(math.exp(zi[j] / tau - top) for j in members))
        ce = lse - zi[yi] / tau
        ranked = sorted(members, key=lambda j: (-zi[j], j))
        b = ranked[min(beam, len(members)) - 1]
        delta = (zi[b] - zi[yi]) / tau
        losses.append(ce + lam * math.log(1 / (1 + math.exp(-delta / xi))))
        weight = 1 + (lam / xi) / (1 + math.exp(delta / xi))  # 1 + (λ/ξ)·σ(-Δ/ξ)
        grads.append(
            [
                weight * (math.exp(zi[j] / tau - lse) - (j == yi)) / tau if ai[j] else 0.0
                for j in range(len(zi))
            ]
        )
    return torch.tensor(losses, dtype=torch.float64), torch.tensor(grads, dtype=torch.float64)


@pytest.mark.parametrize("mask_kind", ["none", "random", "mixed"])
@pytest.mark.parametrize("tau,lam,xi", [(1.0, 1.0, 1.0), (0.7, 0.3, 2.5)])
def test_reference_matches_independent_formula(mask_kind, tau, lam, xi):
    z, y, mask = make_case(7, 53, mask_kind, seed=3, ignore_rows=(2,), dtype=torch.float64)
    allowed = torch.ones_like(z, dtype=torch.bool)
    if mask is not None:
        j = torch.arange(53)
        allowed = ((mask[:, j // 32] >> (j % 32)) & 1).bool()
    want_loss, want_grad = _independent(z, y, allowed, 5, tau, lam, xi)
    z = z.clone().requires_grad_(True)
    kw = dict(beam_width=5, reg_weight=lam, reg_temperature=xi, temperature=tau)
    got = bear_loss_reference(z, y, allowed_mask=mask, reduction="none", **kw)
    (grad,) = torch.autograd.grad(got.sum(), z)
    torch.testing.assert_close(got, want_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mask_kind", ["none", "mixed"])
def test_gradcheck_reference(mask_kind):
    z, y, mask = make_case(4, 23, mask_kind, seed=1, ignore_rows=(1,), dtype=torch.float64)
    z.requires_grad_(True)
    kw = dict(beam_width=3, temperature=0.8, allowed_mask=mask)
    # threshold_grad=True: both outputs are true functions of z
    assert torch.autograd.gradcheck(
        lambda t: ce_margin_reference(t, y, threshold_grad=True, **kw), (z,)
    )
    # threshold_grad=False: β is a constant, so only ce is checked against finite differences
    assert torch.autograd.gradcheck(lambda t: ce_margin_reference(t, y, **kw)[0], (z,))
    # ... and Δ's gradient is then ce's gradient (dΔ/dz = -d log p_y/dz = dce/dz)
    ce, margin = ce_margin_reference(z, y, **kw)
    (g_ce,) = torch.autograd.grad(ce.sum(), z, retain_graph=True)
    (g_margin,) = torch.autograd.grad(margin.sum(), z)
    torch.testing.assert_close(g_margin, g_ce)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_no_counted_row_gives_zero_not_nan(reduction):
    z = torch.randn(3, 40, dtype=torch.float64, requires_grad=True)
    y = torch.full((3,), -100)
    loss = bear_loss_reference(z, y, reduction=reduction)
    (grad,) = torch.autograd.grad(loss.sum(), z)
    assert torch.all(loss == 0) and torch.all(grad == 0)

"""The five training losses against hand-written formulas (SPEC §2, §6)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bear.losses import LossSettings, build_loss
from bear_kernels import bear_loss_reference, pack_allowed_mask

U, W, V = 3, 4, 37  # users, response positions, vocabulary (odd sizes)


@pytest.fixture
def case():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(U, W, V, generator=g, dtype=torch.float64)
    allowed = torch.rand(U, W, V, generator=g) < 0.4  # (U, W, V)
    target = torch.randint(0, V, (U, W), generator=g)
    allowed.scatter_(2, target[..., None], True)  # the target is always allowed
    allowed[0, 1] = False
    allowed[0, 1, target[0, 1]] = True  # a forced row: not counted
    target[1, 0] = -100  # an ignored row
    target[2, :2] = -100
    mask = pack_allowed_mask(allowed.reshape(U * W, V)).reshape(U, W, -1)
    return logits, target, allowed, mask


def _masked_ce(logits, target, allowed):
    z = logits.masked_fill(~allowed, float("-inf"))
    logp = z.log_softmax(-1)
    ce = -logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    counted = (target != -100) & (allowed.sum(-1) > 1)
    return torch.where(counted, ce, torch.zeros_like(ce)), counted


def test_sft_is_full_vocabulary_cross_entropy(case):
    logits, target, _, mask = case
    total, n = build_loss(LossSettings("sft"))(logits, target, mask)
    ref = F.cross_entropy(logits.reshape(-1, V), target.reshape(-1), reduction="sum")
    assert n == int((target != -100).sum())
    torch.testing.assert_close(total, ref)


def test_msl_is_constrained_cross_entropy(case):
    logits, target, allowed, mask = case
    total, n = build_loss(LossSettings("msl"))(logits, target, mask)
    ce, counted = _masked_ce(logits, target, allowed)
    assert n == int(counted.sum()) == int((target != -100).sum()) - 1  # the forced row drops
    torch.testing.assert_close(total, ce.sum())


@pytest.mark.parametrize("lam,xi", [(1.0, 1.0), (0.5, 2.0)])
def test_bear_matches_the_reference(case, lam, xi):
    logits, target, _, mask = case
    s = LossSettings("bear", beam_width=3, reg_weight=lam, reg_temperature=xi)
    total, n = build_loss(s)(logits, target, mask)
    ref = bear_loss_reference(logits.reshape(-1, V), target.reshape(-1), beam_width=3,
                              reg_weight=lam, reg_temperature=xi,
                              allowed_mask=mask.reshape(U * W, -1), reduction="sum")  # fmt: skip
    torch.testing.assert_close(total, ref)


def test_bear_upstream_is_weighted_ce_with_bears_gradient_direction(case):
    logits, target, allowed, mask = case
    lam, xi = 2.0, 0.5
    x = logits.clone().requires_grad_(True)
    s = LossSettings("bear-upstream", beam_width=3, reg_weight=lam, reg_temperature=xi)
    total, n = build_loss(s)(x, target, mask)
    ce, counted = _masked_ce(logits, target, allowed)
    # margin: (z_(B') - z_y) among the allowed set
    z = logits.masked_fill(~allowed, float("-inf"))
    zb = z.topk(3, dim=-1).values[..., -1]
    zb = torch.where(allowed.sum(-1) >= 3, zb, z.masked_fill(~allowed, float("inf")).min(-1).values)
    delta = zb - logits.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    w = (1 + (lam / xi) * torch.sigmoid(-delta / xi)) * counted
    # the step normalisation divides Σ w·ce by counted rows, like every other loss
    torch.testing.assert_close(total, (w * ce).sum())
    assert n == int(counted.sum())
    # its gradient is bear's (λ_u = λ/ξ); upstream's Σw normalisation is LossSettings'
    # normalisation="micro-batch" (tests/test_loss_upstream.py)
    total.backward()
    y = logits.clone().requires_grad_(True)
    bear_total, _ = build_loss(LossSettings("bear", 3, lam, xi))(y, target, mask)
    bear_total.backward()
    torch.testing.assert_close(x.grad, y.grad)


def test_beam_sim_adds_the_prefix_threshold_term(case):
    logits, target, allowed, mask = case
    g = torch.Generator().manual_seed(1)
    theta = -3 * torch.rand(U, W, generator=g, dtype=torch.float64)
    theta[0, 3] = float("-inf")  # fewer than B candidates: no term
    lam, xi = 0.7, 1.5
    x = logits.clone().requires_grad_(True)
    total, _ = build_loss(LossSettings("beam-sim", 3, lam, xi))(x, target, mask, theta)
    ce, counted = _masked_ce(logits, target, allowed)
    expected = ce.sum()
    for u in range(U):
        log_p = 0.0
        for t in range(W):
            if target[u, t] == -100:
                continue
            log_p = log_p - ce[u, t]
            if torch.isfinite(theta[u, t]):
                expected = expected + lam * F.logsigmoid((theta[u, t] - log_p) / xi)
    torch.testing.assert_close(total, expected)
    total.backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad.reshape(U * W, V)[~allowed.reshape(U * W, V)] == 0).all()


def test_unknown_loss_and_missing_inputs_raise(case):
    logits, target, _, mask = case
    with pytest.raises(ValueError, match="loss"):
        LossSettings("nope")
    with pytest.raises(ValueError, match="allowed_mask"):
        build_loss(LossSettings("msl"))(logits, target)
    with pytest.raises(ValueError, match="thresholds"):
        build_loss(LossSettings("beam-sim"))(logits, target, mask)

"""Upstream's BEAR weighting (SPEC §2 'Upstream parity') rebuilt from ce_margin outputs."""

import pytest
import torch
import torch.nn.functional as F

from bear_kernels import bear_loss, ce_margin, counted_rows
from tests._helpers_kernels import make_case

B = 10  # upstream's beam width


def _upstream_direct(z, y, allowed, lam_u, xi):
    """A direct transcription of upstream's formula (train_bear.py, as SPEC §2 states it)."""
    masked = z.masked_fill(~allowed, float("-inf"))  # MSL: softmax over the allowed tokens
    log_probs = F.log_softmax(masked, dim=-1)  # (N, V)
    safe_y = y.clamp(min=0)
    log_p_y = log_probs.gather(1, safe_y[:, None]).squeeze(1)  # (N,)
    log_beta = torch.topk(log_probs, B, dim=-1).values[:, -1]  # (N,) the B-th largest
    w = (1 + lam_u * torch.sigmoid((log_p_y - log_beta) / xi)).detach()  # (N,)
    loss_mask = (y != -100) & (allowed.sum(-1) > 1)
    ce = -log_p_y
    w = w * loss_mask
    return (w * torch.where(loss_mask, ce, 0.0)).sum() / w.sum()


def _upstream_from_ce_margin(z, y, mask, lam_u, xi, impl):
    ce, margin = ce_margin(z, y, beam_width=B, allowed_mask=mask, impl=impl)
    counted = counted_rows(y, mask, z.shape[-1])
    w = (1 + lam_u * torch.sigmoid(-margin / xi)).detach() * counted  # σ((log p_y - log β)/ξ)
    return (w * ce).sum() / w.sum(), w.sum()


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_upstream_weighting_from_ce_margin(impl):
    lam_u, xi = 0.8, 1.5
    z, y, mask = make_case(6, 300, "random", seed=21, ignore_rows=(2,), dtype=torch.float64)
    j = torch.arange(300)
    allowed = ((mask[:, j // 32] >> (j % 32)) & 1).bool()
    assert (allowed.sum(-1) >= B).all()  # upstream's top-B needs at least B allowed tokens
    z1 = z.clone().requires_grad_(True)
    z2 = z.clone().requires_grad_(True)
    z3 = z.clone().requires_grad_(True)
    want = _upstream_direct(z1, y, allowed, lam_u, xi)
    got, total_w = _upstream_from_ce_margin(z2, y, mask, lam_u, xi, impl)
    torch.testing.assert_close(got, want)
    (g_want,) = torch.autograd.grad(want, z1)
    (g_got,) = torch.autograd.grad(got, z2)
    torch.testing.assert_close(g_got, g_want)
    # the same gradient as bear_loss with λ = λ_u·ξ, up to the normalisation Σ w
    ours = bear_loss(
        z3,
        y,
        beam_width=B,
        reg_weight=lam_u * xi,
        reg_temperature=xi,
        allowed_mask=mask,
        reduction="sum",
        impl=impl,
    )
    (g_ours,) = torch.autograd.grad(ours, z3)
    torch.testing.assert_close(g_ours, g_want * total_w)

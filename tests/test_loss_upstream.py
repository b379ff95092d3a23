"""Upstream's losses (SPEC §2 'Upstream parity', UPSTREAM.md §3): the BEAR weighting rebuilt from
ce_margin outputs, and bear.losses' msl / bear-upstream against a direct transcription."""

import pytest
import torch
import torch.nn.functional as F

from bear.losses import LossSettings, build_loss
from bear_kernels import (
    bear_loss,
    bear_loss_reference,
    ce_margin,
    counted_rows,
    pack_allowed_mask,
)
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


# ---------------------------------------------------------------- UPSTREAM.md §3, transcribed
def _upstream_msl(z, y, allowed, tau):
    """msl: logits outside the allowed set -inf, divided by tau; the mean over all supervised
    tokens, forced ones (one allowed child, loss 0) included."""
    masked = z.masked_fill(~allowed, float("-inf")) / tau
    return F.cross_entropy(masked, y, ignore_index=-100, reduction="mean")


def _upstream_bear(z, y, allowed, tau, topk_weight, topk_tau, beam=B):
    """bear: p = softmax(z/tau) over the allowed set; β = the beam-th largest p, or the smallest
    allowed p when fewer are allowed; w = 1 + topk_weight·σ((log p_y - log β)/topk_tau),
    detached; Σ w·ce / (Σ w + 1e-8) over positions with more than one allowed token."""
    log_p = F.log_softmax(z.masked_fill(~allowed, float("-inf")) / tau, dim=-1)  # (N, V)
    n_allowed = allowed.sum(-1)  # (N,)
    kth = torch.topk(log_p, beam, dim=-1).values[:, -1]  # (N,) -inf when fewer than beam allowed
    smallest = log_p.masked_fill(~allowed, float("inf")).min(-1).values  # (N,)
    log_beta = torch.where(n_allowed >= beam, kth, smallest)
    keep = (y != -100) & (n_allowed > 1)
    log_p_y = log_p.gather(1, y.clamp(min=0)[:, None]).squeeze(1)
    w = (1 + topk_weight * torch.sigmoid((log_p_y - log_beta) / topk_tau)).detach() * keep
    ce = torch.where(keep, -log_p_y, torch.zeros_like(log_p_y))
    return (w * ce).sum() / (w.sum() + 1e-8)


def _random_batch(seed, U=3, W=6, V=131):
    """Logits, targets, allowed sets of a micro-batch: some rows with fewer than B allowed, a
    forced row, ignored rows (left padding)."""
    g = torch.Generator().manual_seed(seed)
    z = 3 * torch.randn(U, W, V, generator=g, dtype=torch.float64)
    allowed = torch.rand(U, W, V, generator=g) < torch.rand(U, W, 1, generator=g) * 0.3
    y = torch.randint(0, V, (U, W), generator=g)
    allowed.scatter_(2, y[..., None], True)
    allowed[0, 2] = False
    allowed[0, 2, y[0, 2]] = True  # forced
    y[1, :2] = -100
    mask = pack_allowed_mask(allowed.reshape(U * W, V)).reshape(U, W, -1)
    return z, y, allowed, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_msl_micro_batch_normalisation_is_upstreams(seed, tau):
    z, y, allowed, mask = _random_batch(seed)
    V = z.shape[-1]
    settings = LossSettings("msl", temperature=tau, normalisation="micro-batch")
    x = z.clone().requires_grad_(True)
    total, denominator = build_loss(settings)(x, y, mask)
    got = total / denominator
    assert denominator == int((y != -100).sum())  # forced tokens counted
    x2 = z.clone().requires_grad_(True)
    want = _upstream_msl(x2.reshape(-1, V), y.reshape(-1), allowed.reshape(-1, V), tau)
    torch.testing.assert_close(got, want)
    (g_got,) = torch.autograd.grad(got, x)
    (g_want,) = torch.autograd.grad(want, x2)
    torch.testing.assert_close(g_got, g_want)
    # ours (step) divides by counted rows: the forced row is not counted
    total_ours, counted = build_loss(LossSettings("msl", temperature=tau))(z, y, mask)
    torch.testing.assert_close(total_ours, total.detach())
    assert counted == denominator - 1


@pytest.mark.parametrize("seed", [1, 2])  # rows with fewer than B allowed
@pytest.mark.parametrize(("tau", "topk_weight", "topk_tau"), [(1.0, 0.25, 2.75), (0.5, 1.3, 0.8)])
def test_bear_upstream_micro_batch_normalisation_is_upstreams(seed, tau, topk_weight, topk_tau):
    z, y, allowed, mask = _random_batch(seed)
    V = z.shape[-1]
    settings = LossSettings("bear-upstream", beam_width=B, reg_temperature=topk_tau,
                            temperature=tau, topk_weight=topk_weight,
                            normalisation="micro-batch")  # fmt: skip
    x = z.clone().requires_grad_(True)
    total, denominator = build_loss(settings)(x, y, mask)
    got = total / denominator
    x2 = z.clone().requires_grad_(True)
    want = _upstream_bear(x2.reshape(-1, V), y.reshape(-1), allowed.reshape(-1, V), tau,
                          topk_weight, topk_tau)  # fmt: skip
    torch.testing.assert_close(got, want)
    (g_got,) = torch.autograd.grad(got, x)
    (g_want,) = torch.autograd.grad(want, x2)
    torch.testing.assert_close(g_got, g_want)


def test_bear_upstream_default_weight_is_lambda_over_xi():
    z, y, _, mask = _random_batch(5)
    lam, xi = 0.6, 1.5
    a = LossSettings("bear-upstream", B, reg_weight=lam, reg_temperature=xi)
    b = LossSettings("bear-upstream", B, reg_weight=99.0, reg_temperature=xi, topk_weight=lam / xi)
    torch.testing.assert_close(build_loss(a)(z, y, mask)[0], build_loss(b)(z, y, mask)[0])


def test_bear_temperature_is_the_kernels():
    z, y, _, mask = _random_batch(6)
    V = z.shape[-1]
    total, _ = build_loss(LossSettings("bear", B, 0.5, 2.0, temperature=0.6))(z, y, mask)
    ref = bear_loss_reference(z.reshape(-1, V), y.reshape(-1), beam_width=B, reg_weight=0.5,
                              reg_temperature=2.0, temperature=0.6,
                              allowed_mask=mask.reshape(-1, mask.shape[-1]),
                              reduction="sum")  # fmt: skip
    torch.testing.assert_close(total, ref)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(name="msl", temperature=0.0), "temperature: got 0.0"),
        (dict(name="bear", temperature=float("nan")), "temperature: got nan"),
        (dict(name="sft", temperature=2.0), "has no τ"),
        (dict(name="bear", topk_weight=0.5), "topk_weight: given for loss 'bear'"),
        (dict(name="bear-upstream", topk_weight=-1.0), "topk_weight: got -1.0"),
        (dict(name="msl", normalisation="token"), "normalisation: got 'token'"),
    ],
)
def test_bad_loss_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossSettings(**kwargs)

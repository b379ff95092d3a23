"""Shared test helpers of the loss kernels: random cases with chosen allowed sets, parity checks."""

from __future__ import annotations

import torch

from bear_kernels import bear_loss_reference, ce_margin_reference, pack_allowed_mask

# atol of the parity rule |fast - truth| <= 2·|torch-in-same-dtype - truth| + atol, per dtype:
# a few units in the last place of a loss of order 10 (values) and of a gradient entry (grads).
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def make_case(
    n_rows,
    vocab,
    mask_kind="random",
    seed=0,
    ignore_rows=(),
    dtype=torch.float32,
    scale=3.0,
    beam_width=10,
):
    """Logits (N, V), targets (N,) and an int32 bitmask (or None) for a named kind of allowed set.

    mask_kind: "none" | "random" (about 30% allowed) | "mixed" (rows with 1, fewer than B and
    more than B allowed tokens) | "last_chunk" (allowed tokens only in the last 3 of V).
    Logits are a random permutation of distinct spaced values, so no ties at the top-B cut.
    """
    g = torch.Generator().manual_seed(seed)
    spaced = torch.linspace(-scale, scale, vocab, dtype=torch.float64)  # distinct values
    perms = torch.stack([torch.randperm(vocab, generator=g) for _ in range(n_rows)])  # (N, V)
    z = spaced[perms] + 0.01 * torch.rand(n_rows, vocab, generator=g, dtype=torch.float64)
    allowed = torch.ones(n_rows, vocab, dtype=torch.bool)  # (N, V)
    if mask_kind == "random":
        allowed = torch.rand(n_rows, vocab, generator=g) < 0.3
    elif mask_kind == "mixed":
        allowed = torch.rand(n_rows, vocab, generator=g) < 0.5
        sizes = [1, max(2, beam_width // 2), beam_width + 3]
        for i in range(n_rows):
            k = sizes[i % len(sizes)]
            allowed[i] = False
            allowed[i, torch.randperm(vocab, generator=g)[:k]] = True
    elif mask_kind == "last_chunk":
        allowed = torch.zeros(n_rows, vocab, dtype=torch.bool)
        allowed[:, -3:] = True
    y = torch.empty(n_rows, dtype=torch.int64)
    for i in range(n_rows):
        choices = allowed[i].nonzero().squeeze(1)
        if choices.numel() == 0:
            allowed[i, 0] = True
            choices = torch.tensor([0])
        y[i] = choices[torch.randint(choices.numel(), (1,), generator=g)]
    for i in ignore_rows:
        y[i] = -100
    mask = None if mask_kind == "none" else pack_allowed_mask(allowed)
    return z.to(dtype), y, mask


def loss_and_grad(fn, z, y, **kw):
    """Run fn(z, y, **kw) -> scalar or (ce, margin); return the values and d/dz of a fixed mix."""
    z = z.detach().clone().requires_grad_(True)
    out = fn(z, y, **kw)
    if isinstance(out, tuple):
        w = torch.linspace(0.5, 1.5, y.numel(), dtype=out[0].dtype, device=out[0].device)
        w = w.reshape(y.shape)
        total = (out[0] * w).sum() + (out[1] * w.flip(0)).sum()
        values = torch.cat([out[0].reshape(-1), out[1].reshape(-1)])
    else:
        total = out.sum()
        values = out.reshape(-1)
    (grad,) = torch.autograd.grad(total, z) if total.requires_grad else (torch.zeros_like(z),)
    return values.detach(), grad


def check_parity(fast_fn, z, y, loss="bear", **kw):
    """Assert the parity rule of STYLE 18 for values and gradients of fast_fn against the truth.

    truth: the reference in float64; torch-in-same-dtype: the reference on z in its own dtype.
    """
    ref = bear_loss_reference if loss == "bear" else ce_margin_reference
    truth_v, truth_g = loss_and_grad(ref, z.double(), y, **kw)
    same_v, same_g = loss_and_grad(ref, z, y, **kw)
    fast_v, fast_g = loss_and_grad(fast_fn, z, y, **kw)
    atol = ATOL[z.dtype]
    for name, fast, same, truth in (
        ("value", fast_v, same_v, truth_v),
        ("grad", fast_g, same_g, truth_g),
    ):
        fast, same = fast.double(), same.double()
        bound = 2 * (same - truth).abs() + atol * (1 + truth.abs())
        err = (fast - truth).abs()
        assert torch.isfinite(fast).all(), f"{name}: non-finite values"
        assert (err <= bound).all(), f"{name}: max excess {(err - bound).max().item():.3g}"

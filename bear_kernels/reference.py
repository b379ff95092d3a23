"""The BEAR loss of SPEC §2 in plain PyTorch: the specification in code.

One step per line, shape comments on every tensor, differentiable by autograd, runs on CPU and in
float64. The fast paths (`bear_kernels._torch`, `bear_kernels._triton`) are tested against it.

Per supervised row i (N rows after flattening), with logits z (V,), target y, allowed set A and
temperature tau:

    log p_j  = z_j / tau - logsumexp_{k in A} z_k / tau          (j in A; p_j = 0 outside A)
    ce       = -log p_y
    n        = |A|,  B' = min(B, n)
    z_(B')   = the B'-th largest of {z_j : j in A}, b its index (ties: lower index ranks first)
    Δ        = log β - log p_y = (z_(B') - z_y) / tau,  β = p_b  (a constant unless threshold_grad)
    reg      = log σ(Δ / ξ)
    row loss = ce + λ · reg

Rows whose target is `ignore_index` and rows with n <= 1 are not counted: their terms are 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import check_hyper, check_reduction, counted_rows, flatten_inputs, reduce_rows
from .bitmask import unpack_allowed_mask

__all__ = ["bear_loss_reference", "ce_margin_reference"]


def ce_margin_reference(
    logits: torch.Tensor,
    target: torch.Tensor,
    beam_width: int = 10,
    temperature: float = 1.0,
    allowed_mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    threshold_grad: bool = False,
    validate_target: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy and beam margin Δ, step by step (SPEC §2 table).

    ce = -log p_y and Δ = log β - log p_y = (z_(B') - z_y) / tau over the allowed set A.

    Args:
        logits: z, (..., V) floating point (float64 allowed).
        target: y, (...) int64; `ignore_index` marks rows that are not supervised.
        beam_width: B >= 1.
        temperature: tau > 0.
        allowed_mask: int32 bitmask (..., ceil(V/32)) of A (SPEC §2 layout), or None for A = all.
        ignore_index: target value of unsupervised rows.
        threshold_grad: if True, β is differentiable; else it is detached (stop-gradient).
        validate_target: check that every counted target lies in A (one host sync).

    Returns:
        (ce, margin), each of target's shape, float32 (float64 for float64 logits), 0 for rows
        that are not counted (ignored, or n <= 1).

    Raises:
        ValueError / TypeError for bad inputs (see `bear_kernels.ce_margin`).
    """
    check_hyper(beam_width=beam_width, temperature=temperature)
    z, y, mask, out_shape = flatten_inputs(
        logits, target, allowed_mask, ignore_index, allow_float64=True, validate=validate_target
    )
    n_rows, vocab = z.shape
    out_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32

    # 1. the allowed set A as a boolean matrix
    if mask is None:
        allowed = torch.ones(n_rows, vocab, dtype=torch.bool, device=z.device)  # (N, V)
    else:
        allowed = unpack_allowed_mask(mask, vocab)  # (N, V)
    n = allowed.sum(dim=-1)  # (N,)
    counted = (y != ignore_index) & (n > 1)  # (N,)

    # Rows that are not counted are replaced by a harmless row (zeros, all allowed) so that
    # nothing they hold (-inf, NaN, an empty A) can reach the outputs or the gradients.
    safe_z = torch.where(counted[:, None], z.to(out_dtype), 0.0)  # (N, V)
    allowed = allowed | ~counted[:, None]  # (N, V)
    safe_y = torch.where(counted, y, 0)  # (N,)
    n = torch.where(counted, n, vocab)  # (N,)

    # 2. scaled logits restricted to A, and log p
    scaled = safe_z / temperature  # (N, V)
    scaled = scaled.masked_fill(~allowed, float("-inf"))  # (N, V)
    lse = torch.logsumexp(scaled, dim=-1)  # (N,)
    log_p_y = scaled.gather(1, safe_y[:, None]).squeeze(1) - lse  # (N,)

    # 3. ce = -log p_y
    ce = -log_p_y  # (N,)

    # 4. B' = min(B, n) and the B'-th largest allowed logit; a stable descending sort ranks
    #    equal values by increasing token index, which is the tie rule of SPEC §2. A second
    #    stable sort puts allowed tokens before masked ones (both can be -inf).
    beam = torch.clamp(n, max=beam_width)  # (N,)
    by_value = torch.sort(scaled.detach(), dim=-1, descending=True, stable=True).indices  # (N, V)
    masked_last = torch.sort((~allowed.gather(1, by_value)).to(torch.uint8), dim=-1, stable=True)
    order = by_value.gather(1, masked_last.indices)  # (N, V) allowed tokens by rank
    b = order.gather(1, (beam - 1)[:, None]).squeeze(1)  # (N,)

    # 5. Δ = log β - log p_y with β = p_b; stop-gradient on β unless threshold_grad
    log_beta = scaled.gather(1, b[:, None]).squeeze(1) - lse  # (N,)
    if not threshold_grad:
        log_beta = log_beta.detach()
    margin = log_beta - log_p_y  # (N,)

    zero = torch.zeros((), dtype=out_dtype, device=z.device)
    ce = torch.where(counted, ce, zero).reshape(out_shape)
    margin = torch.where(counted, margin, zero).reshape(out_shape)
    return ce, margin


def bear_loss_reference(
    logits: torch.Tensor,
    target: torch.Tensor,
    beam_width: int = 10,
    reg_weight: float = 1.0,
    reg_temperature: float = 1.0,
    temperature: float = 1.0,
    allowed_mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    threshold_grad: bool = False,
    validate_target: bool = True,
) -> torch.Tensor:
    """BEAR loss (paper eq. 3.5) in plain PyTorch: ce + λ · log σ(Δ / ξ) over counted rows.

    Same arguments as `bear_kernels.bear_loss` without `impl`; `reg_weight` is λ >= 0 and
    `reg_temperature` is ξ > 0. Reductions: "none" (per-row, target's shape, 0 for uncounted
    rows), "sum", "mean" (sum / number of counted rows; 0 when no row is counted).
    """
    check_hyper(
        beam_width=beam_width,
        temperature=temperature,
        reg_weight=reg_weight,
        reg_temperature=reg_temperature,
    )
    check_reduction(reduction)
    ce, margin = ce_margin_reference(
        logits,
        target,
        beam_width=beam_width,
        temperature=temperature,
        allowed_mask=allowed_mask,
        ignore_index=ignore_index,
        threshold_grad=threshold_grad,
        validate_target=validate_target,
    )
    # 6. reg = log σ(Δ / ξ); row loss = ce + λ · reg, 0 on rows that are not counted
    counted = counted_rows(target, allowed_mask, logits.shape[-1], ignore_index)  # (...)
    reg = F.logsigmoid(margin / reg_temperature)  # (...)
    row_loss = torch.where(counted, ce + reg_weight * reg, torch.zeros_like(ce))  # (...)
    return reduce_rows(row_loss, counted, reduction)

"""Public entry points of the BEAR loss: ce_margin, bear_loss, BEARLoss, and the impl dispatch.

The per-row work (ce and Δ with a fused backward) is done by one of two paths under the same API:
`bear_kernels._torch` (chunked PyTorch, any device) and `bear_kernels._triton` (fused Triton
kernels, CUDA tensors, or CPU tensors under TRITON_INTERPRET=1). Argument checks, flattening and
the reductions across rows (plain PyTorch on (N,) vectors, as in flash-attention's Triton
cross-entropy) come from `bear_kernels._common`, which the paths and the reference share.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import _torch, _triton
from ._common import (
    FusedParams,
    LossParams,
    bear_row_loss,
    check_first_order,
    check_flag,
    check_hyper,
    check_reduction,
    flatten_inputs,
    reduce_rows,
    refuse_meta,
)

__all__ = ["BEARLoss", "bear_loss", "bear_regularizer", "ce_margin"]

IMPLS = ("auto", "triton", "torch")


def _resolve_impl(impl, z, beam_width):
    """'auto' -> 'triton' for CUDA tensors within the kernels' limits (V <= 262144, B <= 64),
    'torch' otherwise; an explicit impl runs or raises."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        fits = z.shape[-1] <= _triton.MAX_VOCAB and beam_width <= _triton.MAX_BEAM
        return "triton" if (z.is_cuda and _triton.HAS_TRITON and fits) else "torch"
    if impl == "triton":
        if not _triton.HAS_TRITON:
            raise ValueError(
                "impl='triton' needs the triton package (pip install triton); "
                "use impl='torch' or impl='auto'"
            )
        if not z.is_cuda and not _triton.interpreting():
            raise ValueError(
                f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is "
                f"imported, for CPU tensors); logits are on {z.device}. Use impl='torch'."
            )
    return impl


_EAGER_REASON = (
    "the BEAR loss runs eagerly: it selects the counted rows and the top-B threshold from the "
    "logits' values (data-dependent shapes); compile the model and call the loss outside it"
)


def _entry_point(fn):
    """A public loss function: eager under torch.compile (one graph break at the call; with
    fullgraph=True, torch's error gives ``_EAGER_REASON``), and a clear error under torch.func
    transforms, whose autograd.Function rules the fused backwards do not implement."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as exc:
            if "setup_context" not in str(exc):
                raise
            raise RuntimeError(
                f"{fn.__name__}: torch.func transforms (grad, vmap, jacrev, ...) are not "
                "supported: the gradient is computed by a fused backward; take it with "
                "loss.backward() or torch.autograd.grad (loop over examples for per-example "
                "gradients)"
            ) from exc

    try:
        return torch.compiler.disable(run, reason=_EAGER_REASON)
    except TypeError:  # torch < 2.8: no reason
        return torch.compiler.disable(run)


class _FirstOrderOnly(torch.autograd.Function):
    """Identity on the logits whose backward refuses create_graph=True.

    The fused backwards of both paths compute the gradient with kernels (or in the forward), so
    the gradient they return is not itself differentiable. Without this guard a double backward
    (e.g. `autograd.grad(loss, z, create_graph=True)` for a gradient penalty) would silently
    return a gradient that carries no graph. A backward runs with grad mode on iff create_graph.
    """

    @staticmethod
    def forward(ctx, z):
        return z.view_as(z)

    @staticmethod
    def backward(ctx, grad):
        check_first_order()
        return grad


# --------------------------------------------------------------------------------------------
# the per-row terms and the loss
# --------------------------------------------------------------------------------------------


def _prepare(
    logits,
    target,
    beam_width,
    temperature,
    allowed_mask,
    ignore_index,
    threshold_grad,
    impl,
    validate_target,
):
    """Checked, flattened inputs: z (N, V), y (N,), mask (N, W) or None, shape, impl, params."""
    check_hyper(beam_width=beam_width, temperature=temperature)
    check_flag("threshold_grad", threshold_grad)
    check_flag("validate_target", validate_target)
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    refuse_meta(logits)
    z, y, mask, shape = flatten_inputs(
        logits, target, allowed_mask, ignore_index, allow_float64=True, validate=validate_target
    )
    impl = _resolve_impl(impl, z, beam_width)
    if z.requires_grad and torch.is_grad_enabled():
        z = _FirstOrderOnly.apply(z)  # (N, V) the same values
    params = LossParams(int(beam_width), float(temperature), int(ignore_index), threshold_grad)
    return z, y, mask, shape, impl, params


def _ce_margin_rows(z, y, mask, impl, params):
    """Per-row ce, Δ (N,) and the counted-row flags (N,) from the chosen path."""
    if impl == "triton":
        return _triton.ce_margin_triton(z, y, mask, params)
    return _torch.ce_margin_torch(z, y, mask, params)


@_entry_point
def ce_margin(
    logits: torch.Tensor,
    target: torch.Tensor,
    beam_width: int = 10,
    temperature: float = 1.0,
    allowed_mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    threshold_grad: bool = False,
    impl: str = "auto",
    validate_target: bool = True,
    return_counted: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Per-row cross-entropy and beam margin with a fused backward (SPEC §2).

        log p_j = z_j / tau - logsumexp_{k in A} z_k / tau,   ce = -log p_y
        Δ = log β - log p_y = (z_(B') - z_y) / tau,  B' = min(B, |A|), ties: lower index first

    Every loss of the project is a few lines on top of this (e.g. bear = ce + λ·logσ(Δ/ξ)).

    Args:
        logits: z, (..., V) float32 / bfloat16 / float16 (float64 too); maths in fp32 (fp64).
        target: y, (...) int64; `ignore_index` rows are not supervised.
        beam_width: B >= 1.
        temperature: tau > 0.
        allowed_mask: int32 bitmask (..., ceil(V/32)) of the allowed set A, or None (A = all V).
        ignore_index: target value of unsupervised rows.
        threshold_grad: False (upstream): β is a constant, dΔ/dz_j = (p_j - [j=y]) / tau;
            True: β is differentiable, dΔ/dz_j = ([j=b] - [j=y]) / tau.
        impl: "auto" (Triton for CUDA tensors, torch otherwise), "triton" or "torch".
        validate_target: check targets against [0, V) and A (one host sync); False skips it:
            a target in [0, V) outside A then gives the reference's values (z_y read as -inf:
            ce = Δ = +inf, gradient 0 at y), and one outside [0, V) no out-of-bounds read.
        return_counted: also return the rows that count (what the kernels computed, so a
            caller need not compute `counted_rows` again).

    Returns:
        (ce, margin), target's shape, float32 (float64 for float64 logits); both are 0 on rows
        that are not counted (target == ignore_index, or |A| <= 1), and so are their gradients.
        With ``return_counted``: (ce, margin, counted), counted bool of target's shape.

    Raises:
        TypeError for arguments of the wrong type; ValueError naming the argument for a
        non-positive B or tau, non-finite values, mismatched shapes / dtypes / devices, a target
        outside [0, V) or outside A, an unknown impl, or impl="triton" it cannot serve.
        RuntimeError in backward under create_graph=True: the fused backward is first-order
        only (bear_loss too); bear_loss_reference gives higher-order gradients. ValueError for
        meta-device logits (the loss needs values); RuntimeError under torch.func transforms.

    Under ``torch.compile`` the loss (this function, bear_loss, bear_regularizer) runs eagerly,
    one graph break at its call, whatever ``validate_target``: it selects rows and a threshold
    by value; ``fullgraph=True`` refuses it. Compile the model and call the loss outside it.
    """
    check_flag("return_counted", return_counted)
    z, y, mask, shape, impl, params = _prepare(
        logits,
        target,
        beam_width,
        temperature,
        allowed_mask,
        ignore_index,
        threshold_grad,
        impl,
        validate_target,
    )
    ce, margin, counted = _ce_margin_rows(z, y, mask, impl, params)
    if return_counted:
        return ce.reshape(shape), margin.reshape(shape), counted.reshape(shape)
    return ce.reshape(shape), margin.reshape(shape)


@_entry_point
def bear_loss(
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
    impl: str = "auto",
    validate_target: bool = True,
) -> torch.Tensor:
    """BEAR loss (paper eq. 3.5): ce + λ · log σ(Δ / ξ) per counted row, then reduced.

        row loss = -log p_y + λ · log σ((log β - log p_y) / ξ)
        d(row loss)/dz_j = (1 + (λ/ξ)·σ(-Δ/ξ)) · (p_j - [j=y]) / tau   (threshold_grad=False)

    Args:
        logits, target, beam_width, temperature, allowed_mask, ignore_index, threshold_grad,
        impl, validate_target: as in `ce_margin`.
        reg_weight: λ >= 0.
        reg_temperature: ξ > 0.
        reduction: "none" (target's shape, 0 for uncounted rows), "sum", or "mean" (sum over
            counted rows / their number; 0 with zero gradients when no row is counted).

    Returns:
        A scalar (sum, mean) or a tensor of target's shape (none); float32 (float64 for
        float64 logits).

    With a sum / mean reduction and logits that require grad, the gradient is computed in the
    forward (each row is read while in cache) and held until backward: N·V values in the logits
    dtype, the memory a separate backward would allocate anyway. Evaluate under torch.no_grad().
    Such a loss supports one backward; use ce_margin to backpropagate several times.

    Raises:
        As `ce_margin`, plus ValueError for a negative or non-finite λ, a bad ξ or reduction.
    """
    check_hyper(reg_weight=reg_weight, reg_temperature=reg_temperature)
    check_reduction(reduction)
    z, y, mask, shape, impl, params = _prepare(
        logits,
        target,
        beam_width,
        temperature,
        allowed_mask,
        ignore_index,
        threshold_grad,
        impl,
        validate_target,
    )
    if reduction != "none" and z.requires_grad and torch.is_grad_enabled():
        # the gradient is computed in the forward, while each row is in cache
        # (_triton._BEARLossTritonFused, _torch._BEARLossTorchFused)
        fused = FusedParams(float(reg_weight), float(reg_temperature), reduction)
        if impl == "triton":
            return _triton.bear_loss_triton_fused(z, y, mask, params, fused)
        return _torch.bear_loss_torch_fused(z, y, mask, params, fused)
    ce, margin, counted = _ce_margin_rows(z, y, mask, impl, params)
    row_loss = bear_row_loss(ce, margin, counted, reg_weight, reg_temperature)  # (N,)
    return reduce_rows(row_loss.reshape(shape), counted, reduction)


@_entry_point
def bear_regularizer(
    logits: torch.Tensor,
    target: torch.Tensor,
    beam_width: int = 10,
    reg_temperature: float = 1.0,
    temperature: float = 1.0,
    allowed_mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "none",
    threshold_grad: bool = False,
    impl: str = "auto",
) -> torch.Tensor:
    """The BEAR regulariser alone, a term to add to any objective with either sign (paper eq. 3.4).

        reg = log σ(Δ / ξ),  Δ = log β - log p_y = (z_(B') - z_y) / tau over the allowed set A

    reg < 0 always, and falls towards -∞ as the target drops out of the top-B (Δ > 0). Adding
    ``+λ·reg`` for a positive's tokens pushes each into the top-B of its step (BEAR); adding
    ``-λ·reg`` for a negative's tokens pushes each out of it, so that beam search prunes the
    negative (S-DPO + BEAR, paper §4.2). It is ``F.logsigmoid(margin / ξ)`` on the margin of
    ``ce_margin`` (its fused backward), 0 on rows that are not counted.

    Args:
        logits, target, beam_width, temperature, allowed_mask, ignore_index, threshold_grad,
        impl: as in `ce_margin` (A: each row's own allowed set, e.g. the trie children of the
            response's own prefix).
        reg_temperature: ξ > 0.
        reduction: "none" (target's shape), "sum", or "mean" (over counted rows, 0 when none).

    Returns:
        float32 (float64 for float64 logits), target's shape or a scalar.

    Raises:
        As `ce_margin`, plus ValueError for a bad ξ or reduction.
    """
    check_hyper(reg_temperature=reg_temperature)
    check_reduction(reduction)
    _, margin, counted = ce_margin(
        logits,
        target,
        beam_width=beam_width,
        temperature=temperature,
        allowed_mask=allowed_mask,
        ignore_index=ignore_index,
        threshold_grad=threshold_grad,
        impl=impl,
        return_counted=True,
    )
    reg = torch.where(counted, F.logsigmoid(margin / reg_temperature), torch.zeros_like(margin))
    return reduce_rows(reg, counted, reduction)


class BEARLoss(torch.nn.Module):
    """Module form of `bear_loss`; hyperparameters are fixed at construction.

    `forward(logits (..., V), target (...), allowed_mask=None)` returns `bear_loss(...)`.
    """

    def __init__(
        self,
        beam_width: int = 10,
        reg_weight: float = 1.0,
        reg_temperature: float = 1.0,
        temperature: float = 1.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        threshold_grad: bool = False,
        impl: str = "auto",
        validate_target: bool = True,
    ):
        super().__init__()
        check_hyper(beam_width, temperature, reg_weight, reg_temperature)
        check_reduction(reduction)
        check_flag("threshold_grad", threshold_grad)
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.beam_width = beam_width
        self.reg_weight = reg_weight
        self.reg_temperature = reg_temperature
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.threshold_grad = threshold_grad
        self.impl = impl
        self.validate_target = validate_target

    def forward(self, logits, target, allowed_mask=None):
        return bear_loss(
            logits,
            target,
            beam_width=self.beam_width,
            reg_weight=self.reg_weight,
            reg_temperature=self.reg_temperature,
            temperature=self.temperature,
            allowed_mask=allowed_mask,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            threshold_grad=self.threshold_grad,
            impl=self.impl,
            validate_target=self.validate_target,
        )

    def extra_repr(self):
        return (
            f"beam_width={self.beam_width}, reg_weight={self.reg_weight}, "
            f"reg_temperature={self.reg_temperature}, temperature={self.temperature}, "
            f"reduction={self.reduction!r}, threshold_grad={self.threshold_grad}, "
            f"impl={self.impl!r}"
        )

"""Public entry points of the BEAR loss: argument checks, flattening, impl dispatch, reductions.

The per-row work (ce and Δ with a fused backward) is done by one of two paths under the same API:
`bear_kernels._torch` (chunked PyTorch, any device) and `bear_kernels._triton` (fused Triton
kernels, CUDA tensors, or CPU tensors under TRITON_INTERPRET=1). Reductions across rows are plain
PyTorch on (N,) vectors, as in flash-attention's Triton cross-entropy.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "BEARLoss",
    "allowed_count",
    "bear_loss",
    "ce_margin",
    "counted_rows",
    "pack_allowed_mask",
    "unpack_allowed_mask",
]

IMPLS = ("auto", "triton", "torch")
REDUCTIONS = ("none", "sum", "mean")
# The bitmask word: 32 tokens per int32 (the xgrammar / vLLM layout of SPEC §2).
BITS_PER_WORD = 32
# Logits dtypes each path accepts (SPEC §2; float64 also on the Triton path, for gradcheck).
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class LossParams:
    """Non-tensor options of one ce_margin call, bundled so that backward stays short."""

    beam_width: int  # B, the beam width (>= 1)
    temperature: float  # tau, divides the logits (> 0)
    ignore_index: int  # target value of rows that are not supervised
    threshold_grad: bool  # False: β is a constant (upstream); True: β is differentiable


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------


def _check_hyper(beam_width=None, temperature=None, reg_weight=None, reg_temperature=None):
    """ValueError/TypeError for a bad B, tau, λ or ξ (only the ones that are given)."""
    if beam_width is not None:
        if isinstance(beam_width, bool) or not isinstance(beam_width, int):
            raise TypeError(f"beam_width must be an int, got {type(beam_width).__name__}")
        if beam_width < 1:
            raise ValueError(f"beam_width must be a positive int (B >= 1), got {beam_width}")
    for name, value, lower_ok in (
        ("temperature", temperature, False),
        ("reg_temperature", reg_temperature, False),
        ("reg_weight", reg_weight, True),
    ):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
        if value < 0 or (value == 0 and not lower_ok):
            expected = ">= 0" if lower_ok else "> 0"
            raise ValueError(f"{name} must be {expected}, got {value}")


def _check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _flatten_inputs(logits, target, allowed_mask, ignore_index, allow_float64, validate):
    """Check shapes, dtypes and devices; return z (N, V), y (N,), mask (N, W) or None, shape.

    With `validate`, also checks (one host synchronisation) that every target is in [0, V) or
    equal to ignore_index, and that every supervised target lies in its allowed set A.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    allowed_dtypes = FLOAT_DTYPES if allow_float64 else FLOAT_DTYPES[:3]
    if logits.dtype not in allowed_dtypes:
        raise ValueError(
            f"logits must have dtype in {[str(d) for d in allowed_dtypes]}, got {logits.dtype}"
        )
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape (..., V) with V >= 1, got {tuple(logits.shape)}")
    if target.dtype != torch.int64:
        raise ValueError(f"target must have dtype torch.int64, got {target.dtype}")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"target must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, "
            f"got {tuple(target.shape)}"
        )
    if target.device != logits.device:
        raise ValueError(f"target must be on logits' device {logits.device}, got {target.device}")
    vocab = logits.shape[-1]
    z = logits.reshape(-1, vocab)  # (N, V)
    y = target.reshape(-1)  # (N,)
    mask = None
    if allowed_mask is not None:
        if not isinstance(allowed_mask, torch.Tensor):
            raise TypeError(
                f"allowed_mask must be a torch.Tensor or None, got {type(allowed_mask).__name__}"
            )
        if allowed_mask.dtype != torch.int32:
            raise ValueError(
                f"allowed_mask must be an int32 bitmask (see pack_allowed_mask), "
                f"got dtype {allowed_mask.dtype}"
            )
        words = -(-vocab // BITS_PER_WORD)
        expected = (*target.shape, words)
        if tuple(allowed_mask.shape) != expected:
            raise ValueError(
                f"allowed_mask must have shape (..., ceil(V/32)) = {expected}, "
                f"got {tuple(allowed_mask.shape)}"
            )
        if allowed_mask.device != logits.device:
            raise ValueError(
                f"allowed_mask must be on logits' device {logits.device}, got {allowed_mask.device}"
            )
        mask = allowed_mask.reshape(-1, words)  # (N, W)
    if validate and y.numel() > 0:
        _validate_targets(y, mask, vocab, ignore_index)
    return z, y, mask, tuple(target.shape)


def _validate_targets(y, mask, vocab, ignore_index):
    """Raise ValueError if a target is outside [0, V) (and not ignore_index) or outside A."""
    supervised = y != ignore_index  # (N,)
    in_range = (y >= 0) & (y < vocab)  # (N,)
    bad_range = supervised & ~in_range  # (N,)
    safe_y = torch.where(in_range, y, 0)  # (N,)
    if mask is not None:
        word = mask.gather(1, (safe_y // BITS_PER_WORD)[:, None]).squeeze(1)  # (N,)
        bit = (word >> (safe_y % BITS_PER_WORD)) & 1  # (N,)
        bad_set = supervised & in_range & (bit == 0)  # (N,)
    else:
        bad_set = torch.zeros_like(supervised)
    flags = torch.stack([bad_range.any(), bad_set.any()]).tolist()  # the one host sync
    if flags[0]:
        row = int(bad_range.nonzero()[0, 0])
        raise ValueError(
            f"target must be in [0, V={vocab}) or equal ignore_index={ignore_index}; "
            f"row {row} (flattened) has {int(y[row])}"
        )
    if flags[1]:
        row = int(bad_set.nonzero()[0, 0])
        raise ValueError(
            f"target must lie in its row's allowed set (allowed_mask); row {row} (flattened) "
            f"has target {int(y[row])}, which the mask excludes"
        )


def _resolve_impl(impl, z, beam_width):
    """'auto' -> 'triton' for CUDA tensors within the kernels' limits (V <= 262144, B <= 64),
    'torch' otherwise; an explicit impl runs or raises."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    from . import _triton

    if impl == "auto":
        fits = z.shape[-1] <= _triton.MAX_VOCAB and beam_width <= _triton.MAX_BEAM
        return "triton" if (z.is_cuda and _triton.HAS_TRITON and fits) else "torch"
    if impl == "triton":
        if not _triton.HAS_TRITON:
            raise ValueError(
                "impl='triton' needs the triton package (pip install triton); "
                "use impl='torch' or impl='auto'"
            )
        if not z.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is "
                f"imported, for CPU tensors); logits are on {z.device}. Use impl='torch'."
            )
    return impl


# --------------------------------------------------------------------------------------------
# the allowed-set bitmask
# --------------------------------------------------------------------------------------------


def pack_allowed_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean allowed mask (..., V) into the int32 bitmask (..., ceil(V/32)) of SPEC §2.

    Token j is allowed in row i iff `(packed[i, j // 32] >> (j % 32)) & 1`.

    Args:
        mask: (..., V) bool, True where the token is in the allowed set A.

    Returns:
        (..., ceil(V/32)) int32 on mask's device.

    Raises:
        TypeError if mask is not a tensor; ValueError if it is not bool or has no last dim.
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must have dtype torch.bool, got {mask.dtype}")
    if mask.dim() < 1:
        raise ValueError(f"mask must have shape (..., V), got {tuple(mask.shape)}")
    vocab = mask.shape[-1]
    words = -(-vocab // BITS_PER_WORD)
    padded = F.pad(mask, (0, words * BITS_PER_WORD - vocab))  # (..., W*32)
    bits = padded.reshape(*mask.shape[:-1], words, BITS_PER_WORD).to(torch.int64)  # (..., W, 32)
    weights = torch.ones(BITS_PER_WORD, dtype=torch.int64, device=mask.device)  # (32,)
    weights = weights << torch.arange(BITS_PER_WORD, device=mask.device)
    packed = (bits * weights).sum(-1)  # (..., W) in [0, 2^32)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # two's complement
    return packed.to(torch.int32)


def unpack_allowed_mask(allowed_mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Inverse of pack_allowed_mask: int32 (..., ceil(V/32)) -> bool (..., V)."""
    j = torch.arange(vocab_size, device=allowed_mask.device)  # (V,)
    words = allowed_mask[..., j // BITS_PER_WORD]  # (..., V)
    return ((words >> (j % BITS_PER_WORD)) & 1).bool()


def allowed_count(allowed_mask: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """Number of allowed tokens per row, n = |A|: the popcount of the bitmask on [0, V).

    Args:
        allowed_mask: (..., ceil(V/32)) int32 bitmask (SPEC §2), or None (then n = V; pass the
            shape through `counted_rows` instead).
        vocab_size: V.

    Returns:
        (...) int64.
    """
    if allowed_mask is None:
        raise ValueError("allowed_mask must be a tensor here; with no mask, n = vocab_size")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    words = -(-vocab_size // BITS_PER_WORD)
    if allowed_mask.shape[-1] != words:
        raise ValueError(
            f"allowed_mask must have last dim ceil(vocab_size/32) = {words}, "
            f"got {allowed_mask.shape[-1]}"
        )
    x = allowed_mask.to(torch.int64) & 0xFFFFFFFF  # (..., W) unsigned words
    tail = vocab_size - (words - 1) * BITS_PER_WORD  # valid bits in the last word, 1..32
    keep = torch.full((words,), 0xFFFFFFFF, dtype=torch.int64, device=x.device)  # (W,)
    keep[-1] = (1 << tail) - 1
    x = x & keep
    # SWAR popcount of 32-bit words held in int64
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    x = ((x * 0x01010101) & 0xFFFFFFFF) >> 24
    return x.sum(-1)


def counted_rows(
    target: torch.Tensor,
    allowed_mask: torch.Tensor | None = None,
    vocab_size: int | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Rows that count in the loss: target != ignore_index and n = |A| > 1 (SPEC §2).

    Args:
        target: y, (...) int64.
        allowed_mask: (..., ceil(V/32)) int32 bitmask, or None (A = the whole vocabulary).
        vocab_size: V; required with a mask; without one, n = V (assumed > 1 if not given).
        ignore_index: target value of unsupervised rows.

    Returns:
        (...) bool.
    """
    supervised = target != ignore_index
    if allowed_mask is None:
        if vocab_size is not None and vocab_size <= 1:
            return torch.zeros_like(supervised)
        return supervised
    if vocab_size is None:
        raise ValueError("vocab_size must be given together with allowed_mask")
    return supervised & (allowed_count(allowed_mask, vocab_size) > 1)


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
    _check_hyper(beam_width=beam_width, temperature=temperature)
    _check_flag("threshold_grad", threshold_grad)
    _check_flag("validate_target", validate_target)
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    z, y, mask, shape = _flatten_inputs(
        logits, target, allowed_mask, ignore_index, allow_float64=True, validate=validate_target
    )
    impl = _resolve_impl(impl, z, beam_width)
    params = LossParams(int(beam_width), float(temperature), int(ignore_index), threshold_grad)
    return z, y, mask, shape, impl, params


def _ce_margin_rows(z, y, mask, impl, params):
    """Per-row ce, Δ (N,) and the counted-row flags (N,) from the chosen path."""
    if impl == "triton":
        from ._triton import ce_margin_triton

        return ce_margin_triton(z, y, mask, params)
    from ._torch import ce_margin_torch

    return ce_margin_torch(z, y, mask, params)


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
) -> tuple[torch.Tensor, torch.Tensor]:
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
        validate_target: check targets against [0, V) and A (one host sync); False skips it
            (a bad target then gives undefined values, never an out-of-bounds read).

    Returns:
        (ce, margin), target's shape, float32 (float64 for float64 logits); both are 0 on rows
        that are not counted (target == ignore_index, or |A| <= 1), and so are their gradients.

    Raises:
        TypeError for arguments of the wrong type; ValueError naming the argument for a
        non-positive B or tau, non-finite values, mismatched shapes / dtypes / devices, a target
        outside [0, V) or outside A, an unknown impl, or impl="triton" it cannot serve.
    """
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
    ce, margin, _ = _ce_margin_rows(z, y, mask, impl, params)
    return ce.reshape(shape), margin.reshape(shape)


def _reduce_rows(row_loss, counted, reduction):
    """'none' -> row_loss; 'sum'; 'mean' = sum / #counted rows (0 when none is counted)."""
    if reduction == "none":
        return row_loss
    total = row_loss.sum()
    if reduction == "sum":
        return total
    return total / counted.sum().clamp_min(1).to(row_loss.dtype)


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
    Such a loss supports one backward (no create_graph); use ce_margin for anything else.

    Raises:
        As `ce_margin`, plus ValueError for a negative or non-finite λ, a bad ξ or reduction.
    """
    _check_hyper(reg_weight=reg_weight, reg_temperature=reg_temperature)
    _check_reduction(reduction)
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
        if impl == "triton":
            from ._triton import bear_loss_triton_fused as fused
        else:
            from ._torch import bear_loss_torch_fused as fused
        return fused(z, y, mask, params, reg_weight, reg_temperature, reduction)
    ce, margin, counted = _ce_margin_rows(z, y, mask, impl, params)
    reg = F.logsigmoid(margin / reg_temperature)  # (N,)
    row_loss = torch.where(counted, ce + reg_weight * reg, torch.zeros_like(ce))  # (N,)
    return _reduce_rows(row_loss.reshape(shape), counted, reduction)


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
        _check_hyper(beam_width, temperature, reg_weight, reg_temperature)
        _check_reduction(reduction)
        _check_flag("threshold_grad", threshold_grad)
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

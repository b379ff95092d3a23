"""The layer under every path of the BEAR loss: options, argument checks, flattening, row terms.

`functional` (the public API and dispatch), `reference`, `_torch` and `_triton` all import this
module and `bitmask`, and these two import none of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .bitmask import BITS_PER_WORD, allowed_count

REDUCTIONS = ("none", "sum", "mean")
# Logits dtypes each path accepts (SPEC §2; float64 also on the Triton path, for gradcheck).
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class LossParams:
    """Non-tensor options of one ce_margin call, bundled so that backward stays short."""

    beam_width: int  # B, the beam width (>= 1)
    temperature: float  # tau, divides the logits (> 0)
    ignore_index: int  # target value of rows that are not supervised
    threshold_grad: bool  # False: β is a constant (upstream); True: β is differentiable


@dataclass(frozen=True)
class FusedParams:
    """Extra options of a reduced bear_loss whose gradient the forward computes (fused paths)."""

    reg_weight: float  # λ, weight of the regulariser log σ(Δ / ξ) (>= 0)
    reg_temperature: float  # ξ, divides Δ inside the regulariser (> 0)
    reduction: str  # "sum" or "mean" (over counted rows)


# --------------------------------------------------------------------------------------------
# argument checks and flattening
# --------------------------------------------------------------------------------------------


def check_hyper(beam_width=None, temperature=None, reg_weight=None, reg_temperature=None):
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


def check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_first_order():
    """Inside a fused backward: RuntimeError if it runs under create_graph=True.

    A backward runs with grad mode on iff create_graph was requested; the fused backwards are
    not differentiable, so a double backward must fail loudly rather than return a gradient
    without a graph.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            "bear_loss / ce_margin do not support double backward (create_graph=True): their "
            "fused backward is not differentiable. For higher-order gradients use "
            "bear_kernels.bear_loss_reference (plain autograd)."
        )


def check_flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def flatten_inputs(logits, target, allowed_mask, ignore_index, allow_float64, validate):
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


# --------------------------------------------------------------------------------------------
# counted rows, row losses, reductions
# --------------------------------------------------------------------------------------------


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


def bear_row_loss(ce, margin, counted, reg_weight, reg_temperature):
    """Per-row BEAR loss ce + λ · log σ(Δ / ξ), 0 on rows that are not counted; same shapes."""
    reg = F.logsigmoid(margin / reg_temperature)
    return torch.where(counted, ce + reg_weight * reg, torch.zeros_like(ce))


def reduce_rows(row_loss, counted, reduction):
    """'none' -> row_loss; 'sum'; 'mean' = sum / #counted rows (0 when none is counted)."""
    if reduction == "none":
        return row_loss
    total = row_loss.sum()
    if reduction == "sum":
        return total
    return total / counted.sum().clamp_min(1).to(row_loss.dtype)


# --------------------------------------------------------------------------------------------
# the gradient of the per-row terms, shared by the torch and Triton paths
# --------------------------------------------------------------------------------------------
#
# For j in A, log p_j = z_j/tau - lse, lse = logsumexp_{k in A} z_k/tau, so
# d(log p_y)/dz_j = ([j=y] - p_j)/tau:
#
#     ce = -log p_y                     dce/dz_j = (p_j - [j=y]) / tau
#     Δ = log β - log p_y, β constant   dΔ/dz_j  = (p_j - [j=y]) / tau    (threshold_grad=False)
#     Δ = (z_b - z_y) / tau             dΔ/dz_j  = ([j=b] - [j=y]) / tau  (threshold_grad=True)
#
# With upstream gradients g_ce, g_Δ of one row, the logits gradient is therefore
#
#     d_j = a · p_j - c_y · [j=y] + c_b · [j=b]   for j in A, 0 outside A, with
#     a = (g_ce + g_Δ) / tau,  c_y = (g_ce + g_Δ) / tau,  c_b = 0           (threshold_grad=False)
#     a = g_ce / tau,          c_y = (g_ce + g_Δ) / tau,  c_b = g_Δ / tau   (threshold_grad=True)
#
# and a = c_y = c_b = 0 on rows that are not counted.


def row_coefficients(g_ce, g_margin, counted, params: LossParams, dtype):
    """(a, c_y, c_b), each (N,), of the gradient d_j = a·p_j - c_y·[j=y] + c_b·[j=b] (see above)."""
    inv_tau = 1.0 / params.temperature
    keep = counted.to(dtype)
    g_ce = torch.zeros_like(keep) if g_ce is None else g_ce.to(dtype) * keep
    g_margin = torch.zeros_like(keep) if g_margin is None else g_margin.to(dtype) * keep
    c_y = (g_ce + g_margin) * inv_tau
    if params.threshold_grad:
        # + 0·g_margin: NaN where it is not finite, as the reference's p_j terms of Δ (they cancel)
        return (g_ce + 0.0 * g_margin) * inv_tau, c_y, g_margin * inv_tau
    return c_y, c_y, torch.zeros_like(c_y)


def refuse_meta(logits) -> None:
    """ValueError for logits on the meta device (shapes without values): the loss selects its
    rows and the top-B threshold from the values."""
    if isinstance(logits, torch.Tensor) and logits.device.type == "meta":
        raise ValueError(
            "logits: a meta tensor (shapes, no values); the loss selects its rows and the top-B "
            "threshold from the values: materialise the model first (to_empty, then initialise "
            "or load its weights)"
        )

"""bear_kernels: the BEAR loss (arXiv 2601.22925, SPEC §2) in PyTorch and fused Triton kernels.

loss = bear_loss(logits, target, beam_width=10, reg_weight=1.0, reg_temperature=1.0, ...)
ce, margin = ce_margin(logits, target, beam_width=10, ...)   # per row, fused backward
reg = bear_regularizer(logits, target, beam_width=10, reg_temperature=1.0, ...)  # log σ(Δ/ξ)
"""

from ._common import counted_rows
from ._version import __version__ as __version__
from .bitmask import allowed_count, pack_allowed_mask, unpack_allowed_mask
from .functional import BEARLoss, bear_loss, bear_regularizer, ce_margin
from .reference import bear_loss_reference, ce_margin_reference

__all__ = [
    "BEARLoss",
    "allowed_count",
    "bear_loss",
    "bear_loss_reference",
    "bear_regularizer",
    "ce_margin",
    "ce_margin_reference",
    "counted_rows",
    "pack_allowed_mask",
    "unpack_allowed_mask",
]

"""sft: cross-entropy over the full vocabulary (upstream's LML), decoded with "after" scoring."""

from __future__ import annotations

from bear.losses.base import Loss, RowTerms
from bear.losses.registry import register_loss

__all__ = ["SFT"]


@register_loss
class SFT(Loss):
    """Row term ce = -log softmax(z)_y over all V tokens; under upstream's normalisation every
    supervised token is in the denominator."""

    name = "sft"
    full_vocabulary = True
    scoring = "after"
    takes_temperature = False  # upstream's lml has no τ
    hyperparameters = ()

    def terms(self, ce, margin, counted, target, prepared) -> RowTerms:
        supervised = (target != self.ignore_index).sum().to(ce.dtype)  # forced tokens included
        return RowTerms(ce, upstream_denominator=supervised)

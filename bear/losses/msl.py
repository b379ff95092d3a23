"""msl: cross-entropy over the trie children of each positive prefix (the constrained softmax)."""

from __future__ import annotations

from bear.losses.registry import register_loss
from bear.losses.sft import SFT

__all__ = ["MSL"]


@register_loss
class MSL(SFT):
    """sft's row term with the softmax over the allowed set A (and τ): ce = -log p_y,
    p = softmax(z/τ) over A; decoded with "before" scoring (the softmax it trains)."""

    name = "msl"
    full_vocabulary = False
    scoring = "before"
    takes_temperature = True
    hyperparameters = ("temperature",)

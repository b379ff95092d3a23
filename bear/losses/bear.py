"""bear: msl plus the BEAR regulariser λ·log σ(Δ/ξ) (paper eq. 3.5)."""

from __future__ import annotations

import torch.nn.functional as F

from bear.losses.base import Loss, RowTerms
from bear.losses.registry import register_loss

__all__ = ["BEAR"]


@register_loss
class BEAR(Loss):
    """Row term ce + λ·log σ(Δ/ξ) on counted rows, Δ = log β - log p_y over the trie children."""

    name = "bear"

    def terms(self, ce, margin, counted, target, prepared) -> RowTerms:
        lam, xi = self.settings.reg_weight, self.settings.reg_temperature
        return RowTerms(ce + lam * F.logsigmoid(margin / xi) * counted.to(ce.dtype))

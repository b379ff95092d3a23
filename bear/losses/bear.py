"""bear: msl plus the BEAR regulariser λ·log σ(Δ/ξ) (paper eq. 3.5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bear.losses.base import Loss, RowTerms
from bear.losses.registry import register_loss

__all__ = ["BEAR"]


@register_loss
class BEAR(Loss):
    """Row term ce + λ·log σ(Δ/ξ) on counted rows, Δ = log β - log p_y over the trie children."""

    name = "bear"
    hyperparameters = ("reg_weight", "reg_temperature", "temperature", "beam_width")

    def terms(self, ce, margin, counted, target, prepared) -> RowTerms:
        lam, xi = self.settings.reg_weight, self.settings.reg_temperature
        counted_f = counted.to(ce.dtype)
        # the regulariser's gradient is the ce gradient scaled by (λ/ξ)·σ(−Δ/ξ) (SPEC §2): the
        # ratio ‖∇ reg‖ / ‖∇ ce‖ of each row, which a very small ξ saturates
        ratio = (lam / xi) * torch.sigmoid(-margin.detach() / xi) * counted_f
        rows = ce + lam * F.logsigmoid(margin / xi) * counted_f
        return RowTerms(rows, stats={"reg_grad_ratio": ratio.sum()})

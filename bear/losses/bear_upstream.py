"""bear-upstream: the official code's BEAR (``UPSTREAM.md`` §3), for reproduction.

Detached weights w = 1 + λ_u·σ((log p_y − log β)/ξ) = 1 + λ_u·σ(−Δ/ξ) on counted rows and the
row term w·ce; its gradient is bear's with λ_u = λ/ξ. Under upstream's normalisation the
micro-batch is divided by Σw + 1e-8.
"""

from __future__ import annotations

import math

import torch

from bear.losses.base import UPSTREAM_EPS, Loss, RowTerms
from bear.losses.registry import LossSettings, register_loss

__all__ = ["BEARUpstream"]


@register_loss
class BEARUpstream(Loss):
    """Row term w·ce, w = (1 + λ_u·σ(−Δ/ξ)) detached; λ_u = ``topk_weight`` if given, else λ/ξ."""

    name = "bear-upstream"
    hyperparameters = (
        "reg_weight",
        "reg_temperature",
        "temperature",
        "topk_weight",
        "topk_tau",
        "beam_width",
    )

    @classmethod
    def check(cls, settings: LossSettings) -> None:
        topk_weight = settings.topk_weight
        if topk_weight is not None and not (math.isfinite(topk_weight) and topk_weight >= 0):
            raise ValueError(f"topk_weight: got {topk_weight}, expected finite >= 0")

    @property
    def upstream_weight(self) -> float:
        """λ_u: ``topk_weight`` if given, else λ/ξ (the same gradient as bear)."""
        s = self.settings
        return s.reg_weight / s.reg_temperature if s.topk_weight is None else s.topk_weight

    def terms(self, ce, margin, counted, target, prepared) -> RowTerms:
        xi = self.settings.reg_temperature
        sigma = torch.sigmoid(-margin.detach() / xi)
        w = (1.0 + self.upstream_weight * sigma) * counted.to(ce.dtype)  # (U, W)
        return RowTerms(w * ce, upstream_denominator=w.sum() + UPSTREAM_EPS)

"""beam-sim: the paper's objective (3.1), regularised against a real beam search (SPEC §6).

Before the forward, a no-grad constrained beam search of width B along each response gives θ_t,
the score of the B-th best prefix candidate at step t (``bear.decoding.beam_thresholds``). The
row term is ce + λ·log σ((θ_t − log P(y≤t|x))/ξ) with θ_t a constant; it costs up to B extra
forwards per step (the paper measures 4.45× an SFT epoch). BEAR approximates it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bear.decoding import beam_thresholds
from bear.distributed import decoding_model
from bear.items import right_align
from bear.losses.base import Loss, RowTerms
from bear.losses.registry import register_loss
from bear.model import autocast_for

__all__ = ["BeamSim"]


@register_loss
class BeamSim(Loss):
    """Row term ce + λ·log σ((θ_t − log P(y≤t|x))/ξ) where θ_t is defined."""

    name = "beam-sim"
    takes_temperature = False  # θ_t are decoded at τ = 1
    hyperparameters = ("reg_weight", "reg_temperature", "beam_width")

    def prepare(self, ctx, micro) -> torch.Tensor:
        """θ_t (U, W) aligned with the micro-batch's targets, -inf where undefined."""
        batch = micro.batch
        with decoding_model(ctx.engine) as model, autocast_for(ctx.device):
            model.eval()
            theta = beam_thresholds(
                model,
                batch.prompt_ids,
                batch.prompt_mask,
                ctx.trie,
                self.settings.beam_width,
                scoring=self.scoring,
            )
            model.train()
        lengths = batch.response_len.to(theta.device)
        return right_align(theta.float(), lengths, batch.width, float("-inf"))

    def terms(self, ce, margin, counted, target, prepared) -> RowTerms:
        if prepared is None:
            raise ValueError("thresholds: loss 'beam-sim' needs θ_t from bear.decoding")
        lam, xi = self.settings.reg_weight, self.settings.reg_temperature
        log_p = -ce.cumsum(1)  # (U, W) log P(y≤t|x), differentiable
        active = (target != self.ignore_index) & torch.isfinite(prepared)  # (U, W)
        theta = torch.where(active, prepared, torch.zeros_like(prepared)).to(log_p.dtype)
        reg = F.logsigmoid((theta - log_p) / xi) * active.to(log_p.dtype)  # (U, W)
        return RowTerms(ce + lam * reg)

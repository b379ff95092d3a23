"""Training losses, each a few lines on ``bear_kernels.ce_margin`` (SPEC §2, §6).

Every loss returns the *sum* of its per-row terms over the micro-batch and the number of counted
rows; the training loop divides by the counted rows of the whole optimiser step, so gradient
accumulation and data parallelism equal one large batch.

| name          | row term (counted rows)                                       | allowed set |
| ------------- | ------------------------------------------------------------- | ----------- |
| sft           | ce over the full vocabulary (upstream's LML)                 | all tokens  |
| msl           | ce over the trie children (constrained softmax)              | trie        |
| bear          | ce + λ·log σ(Δ/ξ)  (paper eq. 3.5)                            | trie        |
| bear-upstream | w·ce, w = 1 + (λ/ξ)·σ(−Δ/ξ) detached, rescaled by n/Σw         | trie        |
| beam-sim      | ce + λ·log σ((θ_t − log P(y≤t|x))/ξ), θ_t from a beam search  | trie        |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bear_kernels import ce_margin, counted_rows

__all__ = ["LOSSES", "LossSettings", "batch_loss", "num_counted_rows", "uses_trie_mask"]

LOSSES = ("sft", "msl", "bear", "bear-upstream", "beam-sim")


@dataclass(frozen=True)
class LossSettings:
    """Hyper-parameters shared by the losses (paper symbols)."""

    name: str  # one of LOSSES
    beam_width: int = 10  # B
    reg_weight: float = 1.0  # λ
    reg_temperature: float = 1.0  # ξ
    ignore_index: int = -100

    def __post_init__(self):
        if self.name not in LOSSES:
            raise ValueError(f"loss: got {self.name!r}, expected one of {LOSSES}")


def uses_trie_mask(name: str) -> bool:
    """Whether the loss's softmax is restricted to the trie children (all but sft)."""
    return name != "sft"


def num_counted_rows(target: torch.Tensor, allowed_mask, vocab_size: int, ignore_index=-100) -> int:
    """The number of counted rows (supervised, more than one allowed token) of a (U, W) target;
    allowed_mask (U, W, ceil(V/32)) int32 or None (every token allowed)."""
    flat_mask = None if allowed_mask is None else allowed_mask.reshape(-1, allowed_mask.shape[-1])
    rows = counted_rows(
        target.reshape(-1), flat_mask, vocab_size=vocab_size, ignore_index=ignore_index
    )
    return int(rows.sum())


def batch_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    settings: LossSettings,
    allowed_mask: torch.Tensor | None = None,
    thresholds: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the row losses, counted rows) of one micro-batch.

    logits (U, W, V) for the response positions, target (U, W) int64 (ignore_index where
    unsupervised), allowed_mask (U, W, ceil(V/32)) int32 (trie children; unused by sft),
    thresholds (U, W) θ_t aligned with target (beam-sim only; -inf where not defined).
    """
    U, W, V = logits.shape
    flat_logits = logits.reshape(U * W, V)  # (N, V)
    flat_target = target.reshape(U * W)  # (N,)
    mask = None
    if uses_trie_mask(settings.name):
        if allowed_mask is None:
            raise ValueError(f"allowed_mask: loss {settings.name!r} needs the trie's allowed sets")
        mask = allowed_mask.reshape(U * W, -1)  # (N, ceil(V/32))
    counted = counted_rows(
        flat_target, mask, vocab_size=V, ignore_index=settings.ignore_index
    )  # (N,) bool
    n = counted.sum()
    ce, margin = ce_margin(
        flat_logits,
        flat_target,
        beam_width=settings.beam_width,
        allowed_mask=mask,
        ignore_index=settings.ignore_index,
    )  # (N,), (N,); 0 for uncounted rows
    counted_f = counted.to(ce.dtype)
    lam, xi = settings.reg_weight, settings.reg_temperature
    name = settings.name
    if name in ("sft", "msl"):
        rows = ce
    elif name == "bear":
        rows = ce + lam * F.logsigmoid(margin / xi) * counted_f
    elif name == "bear-upstream":
        # upstream's detached weights w = 1 + λ_u·σ((log p_y − log β)/ξ), λ_u = λ/ξ, normalised
        # by Σw over the micro-batch; rescaled by n so the loop's division by counted rows keeps it.
        w = (1.0 + (lam / xi) * torch.sigmoid(-margin.detach() / xi)) * counted_f  # (N,)
        rows = w * ce * (n / w.sum().clamp(min=1e-12))
    else:  # beam-sim
        if thresholds is None:
            raise ValueError("thresholds: loss 'beam-sim' needs θ_t from bear.decoding")
        log_p = -ce.reshape(U, W).cumsum(1)  # (U, W) log P(y≤t|x), differentiable
        active = (target != settings.ignore_index) & torch.isfinite(thresholds)  # (U, W)
        theta = torch.where(active, thresholds, torch.zeros_like(thresholds)).to(log_p.dtype)
        reg = F.logsigmoid((theta - log_p) / xi) * active.to(log_p.dtype)  # (U, W)
        rows = ce + lam * reg.reshape(U * W)
    return rows.sum(), n

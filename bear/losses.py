"""Training losses, each a few lines on ``bear_kernels.ce_margin`` (SPEC §2, §6).

Every loss returns the *sum* of its per-row terms over the micro-batch and the micro-batch's
denominator. Under the ``step`` normalisation (ours) the denominator is its counted rows and the
training loop divides every micro-batch by the counted rows of the whole optimiser step, so gradient
accumulation and data parallelism equal one large batch, for every loss. Under ``micro-batch``
(upstream's, ``UPSTREAM.md`` §3) each micro-batch is divided by its own denominator — sft and msl:
every supervised token, forced ones included; bear-upstream: Σw + 1e-8; bear and beam-sim: counted
rows — and the loop averages the micro-batches, so results depend on the micro-batch size, as
upstream's own do.

| name          | row term (counted rows)                                       | allowed set |
| ------------- | ------------------------------------------------------------- | ----------- |
| sft           | ce over the full vocabulary (upstream's LML)                 | all tokens  |
| msl           | ce over the trie children (constrained softmax)              | trie        |
| bear          | ce + λ·log σ(Δ/ξ)  (paper eq. 3.5)                            | trie        |
| bear-upstream | w·ce, w = 1 + λ_u·σ(−Δ/ξ) detached, λ_u = topk_weight (λ/ξ)   | trie        |
| beam-sim      | ce + λ·log σ((θ_t − log P(y≤t|x))/ξ), θ_t from a beam search  | trie        |
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bear_kernels import ce_margin, counted_rows

__all__ = ["LOSSES", "LossSettings", "batch_loss", "num_counted_rows", "uses_trie_mask"]

LOSSES = ("sft", "msl", "bear", "bear-upstream", "beam-sim")
NORMALISATIONS = ("step", "micro-batch")  # see the module docstring
UPSTREAM_EPS = 1e-8  # upstream's bear: Σ w·ce / (Σ w + 1e-8)


@dataclass(frozen=True)
class LossSettings:
    """Hyper-parameters shared by the losses (paper symbols)."""

    name: str  # one of LOSSES
    beam_width: int = 10  # B
    reg_weight: float = 1.0  # λ
    reg_temperature: float = 1.0  # ξ
    ignore_index: int = -100
    temperature: float = 1.0  # τ: softmax(z/τ) over the allowed set (msl, bear, bear-upstream)
    topk_weight: float | None = None  # bear-upstream's λ_u; None: λ/ξ
    normalisation: str = "step"  # one of NORMALISATIONS

    def __post_init__(self):
        if self.name not in LOSSES:
            raise ValueError(f"loss: got {self.name!r}, expected one of {LOSSES}")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(
                f"normalisation: got {self.normalisation!r}, expected one of {NORMALISATIONS}"
            )
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature: got {self.temperature}, expected a finite τ > 0")
        if self.temperature != 1.0 and self.name in ("sft", "beam-sim"):
            raise ValueError(
                f"temperature: got {self.temperature} with loss {self.name!r}, which has no τ "
                "(upstream's lml has none; beam-sim's θ_t are decoded at τ = 1); use 1.0"
            )
        if self.topk_weight is not None:
            if self.name != "bear-upstream":
                raise ValueError(
                    f"topk_weight: given for loss {self.name!r}; it is bear-upstream's λ_u "
                    "(use reg_weight λ for the other losses)"
                )
            if not (math.isfinite(self.topk_weight) and self.topk_weight >= 0):
                raise ValueError(f"topk_weight: got {self.topk_weight}, expected finite >= 0")

    @property
    def upstream_weight(self) -> float:
        """bear-upstream's λ_u: ``topk_weight`` if given, else λ/ξ (the same gradient as bear)."""
        if self.topk_weight is not None:
            return self.topk_weight
        return self.reg_weight / self.reg_temperature


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
    """(sum of the row losses, denominator) of one micro-batch.

    The denominator is the micro-batch's counted rows under the ``step`` normalisation, and
    upstream's own under ``micro-batch`` (module docstring); the micro-batch's mean loss is
    sum / denominator.
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
        temperature=settings.temperature,
        allowed_mask=mask,
        ignore_index=settings.ignore_index,
    )  # (N,), (N,); 0 for uncounted rows
    counted_f = counted.to(ce.dtype)
    lam, xi = settings.reg_weight, settings.reg_temperature
    name = settings.name
    upstream = settings.normalisation == "micro-batch"
    denominator = n.to(ce.dtype)
    if name in ("sft", "msl"):
        rows = ce
        if upstream:  # every supervised token, forced ones (ce = 0) included
            denominator = (flat_target != settings.ignore_index).sum().to(ce.dtype)
    elif name == "bear":
        rows = ce + lam * F.logsigmoid(margin / xi) * counted_f
    elif name == "bear-upstream":
        # upstream's detached weights w = 1 + λ_u·σ((log p_y − log β)/ξ) on counted rows
        w = (1.0 + settings.upstream_weight * torch.sigmoid(-margin.detach() / xi)) * counted_f
        rows = w * ce  # (N,)
        if upstream:
            denominator = w.sum() + UPSTREAM_EPS
    else:  # beam-sim
        if thresholds is None:
            raise ValueError("thresholds: loss 'beam-sim' needs θ_t from bear.decoding")
        log_p = -ce.reshape(U, W).cumsum(1)  # (U, W) log P(y≤t|x), differentiable
        active = (target != settings.ignore_index) & torch.isfinite(thresholds)  # (U, W)
        theta = torch.where(active, thresholds, torch.zeros_like(thresholds)).to(log_p.dtype)
        reg = F.logsigmoid((theta - log_p) / xi) * active.to(log_p.dtype)  # (U, W)
        rows = ce + lam * reg.reshape(U * W)
    return rows.sum(), denominator

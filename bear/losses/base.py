"""``Loss``: the base of every training objective (SPEC §2, §6, §11).

A loss says what its softmax runs over (the whole vocabulary, or the trie children of each
positive prefix), which decoding scoring matches it, what it needs before its forward
(``prepare``), and returns the *sum* of its row terms over a micro-batch with the micro-batch's
denominator. The training step (``bear.train_step``) divides every micro-batch by the
denominators of the whole optimiser step, so accumulation and data parallelism equal one batch.

Normalisations (``LossSettings.normalisation``):

- ``step`` (ours): the denominator is the micro-batch's counted rows (supervised, more than one
  allowed token), and the step divides by the counted rows of all its micro-batches and ranks.
- ``micro-batch`` (upstream's, ``UPSTREAM.md`` §3): each micro-batch is divided by its own
  denominator — the loss's ``RowTerms.upstream_denominator`` where it has one (sft and msl: every
  supervised token, forced ones included; bear-upstream: Σw + 1e-8), its counted rows otherwise —
  and the step averages the micro-batches, so results depend on the micro-batch size, as
  upstream's own do.

A new loss is one module: a subclass that sets the class attributes and writes ``terms`` (and
``prepare`` if it needs more than the logits), decorated with ``register_loss``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from bear.losses.registry import LossSettings, get_loss
from bear.model import autocast_for, response_logits
from bear_kernels import ce_margin, counted_rows

if TYPE_CHECKING:
    from bear.config import TrainConfig
    from bear.run import Setup
    from bear.train_step import MicroBatch, StepContext

__all__ = ["Loss", "RowTerms", "UPSTREAM_EPS", "build_loss"]

UPSTREAM_EPS = 1e-8  # upstream's floor of a micro-batch's denominator (bear: Σ w·ce / (Σ w + 1e-8))


@dataclass
class RowTerms:
    """What a loss makes of its rows: ``rows`` (U, W) its per-row terms (0 on rows that are not
    counted), ``upstream_denominator`` the micro-batch's denominator under the ``micro-batch``
    normalisation (None: its counted rows), ``stats`` sums over the counted rows of quantities to
    log (the training step logs each divided by the step's counted rows: a mean per row)."""

    rows: torch.Tensor
    upstream_denominator: torch.Tensor | None = None
    stats: dict[str, torch.Tensor] | None = None


class Loss:
    """A training objective on ce = -log p_y and Δ = log β - log p_y (``bear_kernels.ce_margin``).

    Class attributes a subclass sets:
        name: its ``--loss`` name.
        full_vocabulary: True: the softmax runs over the whole vocabulary (sft); False: over the
            trie children of each positive prefix, given as an allowed mask.
        scoring: the decoding scoring that matches the training softmax ("after" for a
            full-vocabulary softmax, "before" for the children's; SPEC §4).
        takes_temperature: whether τ applies (a loss without it refuses τ != 1).
        needs_reference: whether it has a reference policy (``--reference``; preference losses).
        hyperparameters: the ``TrainConfig`` fields of loss settings it reads (a sweep runs a
            loss once over the values of the others).

    Hooks: ``start`` once before training (what the loss builds from the run: a reference
    policy, a negative sampler), ``prepare`` per micro-batch before its forward, without
    gradients, ``terms`` (or ``micro_batch_loss`` for a loss that feeds the model otherwise) and
    ``units`` (the micro-batch's share of the step's denominator).
    """

    name: ClassVar[str]
    full_vocabulary: ClassVar[bool] = False
    scoring: ClassVar[str] = "before"
    takes_temperature: ClassVar[bool] = True
    needs_reference: ClassVar[bool] = False
    hyperparameters: ClassVar[tuple[str, ...]] = ()

    def __init__(self, settings: LossSettings):
        if settings.name != self.name:
            raise ValueError(f"settings: for loss {settings.name!r}, given to {self.name!r}")
        self.settings = settings
        self.stats: dict[str, torch.Tensor] = {}  # RowTerms.stats of the last call

    @classmethod
    def check(cls, settings: LossSettings) -> None:
        """Raise ValueError for settings this loss does not take (called by ``LossSettings``)."""
        if settings.temperature != 1.0 and not cls.takes_temperature:
            raise ValueError(
                f"temperature: got {settings.temperature} with loss {cls.name!r}, which has no τ; "
                "use 1.0"
            )
        if settings.topk_weight is not None:
            raise ValueError(
                f"topk_weight: given for loss {cls.name!r}; it is bear-upstream's λ_u "
                "(use reg_weight λ for the other losses)"
            )

    def start(self, cfg: TrainConfig, setup: Setup, device: torch.device) -> None:
        """Build what the loss needs from the run before training, once, after every input is
        checked and before the run folder is touched (raise ValueError for what it cannot use).
        ``setup.model`` is the policy as training starts (after ``--init``, unwrapped, before
        resumed weights). Nothing by default."""

    def units(self, micro: MicroBatch) -> int:
        """The micro-batch's share of the step's denominator under the ``step`` normalisation:
        its counted rows (a loss over whole examples counts its examples)."""
        return int(micro.counted.sum())

    def prepare(self, ctx: StepContext, micro: MicroBatch) -> Any:
        """What the loss needs of the model before its forward, without gradients (beam-sim: the
        thresholds θ_t of a beam search); None by default."""
        return None

    def terms(self, ce, margin, counted, target, prepared) -> RowTerms:
        """The loss's row terms from ce, Δ, counted (U, W) and target (U, W); overridden."""
        raise NotImplementedError

    def counted_rows(self, target: torch.Tensor, allowed_mask, vocab_size: int) -> torch.Tensor:
        """(U, W) bool: the rows that count (supervised, more than one token in this loss's
        allowed set: the mask's, or the whole vocabulary for a full-vocabulary loss)."""
        mask = None if self.full_vocabulary else allowed_mask
        return counted_rows(target, mask, vocab_size=vocab_size, ignore_index=self.ignore_index)

    @property
    def ignore_index(self) -> int:
        return self.settings.ignore_index

    def __call__(self, logits, target, allowed_mask=None, prepared=None, counted=None):
        """(sum of the row terms, denominator) of one micro-batch (module docstring).

        Args:
            logits: (U, W, V) at the response positions.
            target: (U, W) int64, ``ignore_index`` where not supervised.
            allowed_mask: (U, W, ceil(V/32)) int32, the trie children of each positive prefix
                (unused by a full-vocabulary loss; ValueError if another loss lacks it).
            prepared: what ``prepare`` returned.
            counted: (U, W) bool, ``counted_rows`` if already computed (the training step
                computes it once per micro-batch for its denominators).
        """
        U, W, V = logits.shape
        mask = None
        if not self.full_vocabulary:
            if allowed_mask is None:
                raise ValueError(f"allowed_mask: loss {self.name!r} needs the trie's allowed sets")
            mask = allowed_mask.reshape(U * W, -1)  # (N, ceil(V/32))
        if counted is None:
            counted = self.counted_rows(target, allowed_mask, V)
        s = self.settings
        ce, margin = ce_margin(
            logits.reshape(U * W, V),
            target.reshape(U * W),
            beam_width=s.beam_width,
            temperature=s.temperature,
            allowed_mask=mask,
            ignore_index=s.ignore_index,
        )  # (N,), (N,); 0 on rows that are not counted
        terms = self.terms(ce.reshape(U, W), margin.reshape(U, W), counted, target, prepared)
        self.stats = {k: v.detach() for k, v in (terms.stats or {}).items()}
        denominator = terms.upstream_denominator
        if s.normalisation == "step" or denominator is None:
            denominator = counted.sum().to(ce.dtype)
        return terms.rows.sum(), denominator

    def micro_batch_loss(self, ctx: StepContext, micro: MicroBatch, prepared):
        """(sum, denominator) of one micro-batch: the forward of its responses, then the loss.
        A loss that feeds the model otherwise (several responses per prompt) overrides this."""
        with autocast_for(ctx.device):
            logits = response_logits(ctx.engine, micro.batch)  # (U, W, V)
        return self(logits, micro.batch.target, micro.allowed_mask, prepared, micro.counted)


def build_loss(settings: LossSettings) -> Loss:
    """The registered loss ``settings.name`` with these settings."""
    return get_loss(settings.name)(settings)

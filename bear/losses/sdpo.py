"""sdpo and sdpo-bear: S-DPO (Chen et al., NeurIPS 2024) and S-DPO + BEAR (paper §4.2, Fig. 7).

For a prompt x, its positive e_0 and M sampled negatives e_1..e_M (``bear.negatives``), with
r(e) = log π_θ(e|x) − log π_ref(e|x), each log π the sum of the item's full-vocabulary token
log-probabilities, EOS included (S-DPO's release):

    ℓ_S-DPO = −log σ(−log Σ_{j=1..M} exp(β·(r(e_j) − r(e_0))))  =  softplus(LSE_j β·(r_j − r_0))

S-DPO + BEAR adds the BEAR regulariser (``bear_kernels.bear_regularizer``, log σ(Δ/ξ) over each
token's own allowed set: the trie children of its own response's prefix) summed over the
positive's tokens with weight +λ, and over every negative's tokens with weight −λ: the positive's
tokens are pushed into the top-B of their steps, the negatives' out of it (so beam search prunes
them):

    ℓ = ℓ_S-DPO + λ·Σ_{t ∈ e_0} log σ(Δ_t/ξ) − λ·Σ_{j ≥ 1} Σ_{t ∈ e_j} log σ(Δ_t/ξ)

The unit is the example: a micro-batch returns Σ ℓ over its examples and their number, so
accumulation and several processes give the gradient of one batch. The prompt and its 1 + M
responses run in one forward (``bear.preference``); π_ref's log-probabilities come from the
reference policy (``bear.policies``) without gradients, once per micro-batch. Decoded with
"after" scoring (the full-vocabulary policy it trains).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bear.losses.base import Loss
from bear.losses.registry import register_loss
from bear.model import autocast_for
from bear.negatives import NegativeSampler
from bear.policies import reference_policy
from bear.preference import (
    PreferenceBatch,
    check_preference_model,
    collate_preference,
    preference_logits,
    response_sums,
)
from bear_kernels import bear_regularizer, ce_margin

__all__ = ["SDPO", "SDPOBEAR", "PreferenceInputs", "sdpo_terms"]


@dataclass
class PreferenceInputs:
    """What ``prepare`` hands the forward: the ``PreferenceBatch`` (on the device), π_ref's
    log-probabilities ``reference_logp`` (U, 1 + M), and the allowed mask of every response step
    (N, ceil(V/32)) for the regulariser (None without one)."""

    batch: PreferenceBatch
    reference_logp: torch.Tensor
    allowed_mask: torch.Tensor | None


def sdpo_terms(reward: torch.Tensor, beta: float) -> torch.Tensor:
    """(U,) ℓ_S-DPO of rewards r (U, 1 + M), the positive's first: softplus(LSE_j β·(r_j − r_0))."""
    return F.softplus(torch.logsumexp(beta * (reward[:, 1:] - reward[:, :1]), dim=1))


def sequence_logp(logits: torch.Tensor, batch: PreferenceBatch) -> torch.Tensor:
    """(U, R) log π(e) = Σ_t log softmax(z_t)_{y_t} of each response, EOS included, from the
    logits (N, V) of its steps (``bear.preference.preference_logits``)."""
    ce, _ = ce_margin(logits, batch.step_target, beam_width=1)  # (N,)
    return response_sums(-ce, batch)


@register_loss
class SDPO(Loss):
    """S-DPO; ``--negatives`` M, ``--dpo-beta`` β, ``--negative-sampling``, a reference policy."""

    name = "sdpo"
    full_vocabulary = True
    scoring = "after"
    takes_temperature = False
    needs_reference = True
    hyperparameters = ("negatives", "negative_sampling", "dpo_beta")

    def start(self, cfg, setup, device) -> None:
        check_preference_model(setup.model)
        s = self.settings
        self.setup = setup
        self.sampler = NegativeSampler(
            setup.trie, setup.data.train, s.negatives, s.negative_sampling, cfg.seed
        )
        self.reference = reference_policy(cfg, setup.model, device)
        self.mask_dtype = next(setup.model.parameters()).dtype  # the model's compute dtype

    def units(self, micro) -> int:
        return len(micro.examples)

    @property
    def regularised(self) -> bool:
        return False

    def prepare(self, ctx, micro) -> PreferenceInputs:
        """The micro-batch's negatives, its prompts and 1 + M responses as one batch, π_ref's
        log-probabilities and (sdpo-bear) the responses' allowed masks."""
        setup, train = self.setup, self.setup.data.train
        prompts = [setup.prompts["train"][i] for i in micro.examples]
        responses = [
            [train[i].target, *self.sampler.sample(train[i], i, micro.step)] for i in micro.examples
        ]
        batch = collate_preference(prompts, responses, setup.items, setup.trie, setup.pad_id)
        batch = batch.to(ctx.device)
        with autocast_for(ctx.device):
            ref_logits = self.reference.logits(batch, self.mask_dtype)  # (N, V)
        reference = sequence_logp(ref_logits, batch)
        mask = ctx.trie.allowed_mask(batch.step_node) if self.regularised else None
        return PreferenceInputs(batch, reference, mask)

    def micro_batch_loss(self, ctx, micro, prepared: PreferenceInputs):
        with autocast_for(ctx.device):
            logits = preference_logits(ctx.engine, prepared.batch, self.mask_dtype)
        return self(logits, prepared)

    def __call__(self, logits: torch.Tensor, inputs: PreferenceInputs):
        """(Σ ℓ over the examples, their number) from the policy's logits (N, V) of the
        batch's response steps."""
        logp = sequence_logp(logits, inputs.batch)  # (U, R)
        terms = sdpo_terms(logp - inputs.reference_logp, self.settings.dpo_beta)  # (U,)
        return terms.sum(), torch.tensor(float(terms.shape[0]), dtype=terms.dtype)


@register_loss
class SDPOBEAR(SDPO):
    """S-DPO + BEAR: ``--reg-weight`` λ, ``--reg-temperature`` ξ and ``--beam-width`` B as bear
    takes them; at λ = 0 it trains exactly what sdpo trains."""

    name = "sdpo-bear"
    hyperparameters = SDPO.hyperparameters + ("reg_weight", "reg_temperature", "beam_width")

    @property
    def regularised(self) -> bool:
        return self.settings.reg_weight != 0

    def __call__(self, logits: torch.Tensor, inputs: PreferenceInputs):
        total, examples = super().__call__(logits, inputs)
        if not self.regularised:
            return total, examples
        s = self.settings
        reg = bear_regularizer(
            logits,
            inputs.batch.step_target,
            beam_width=s.beam_width,
            reg_temperature=s.reg_temperature,
            allowed_mask=inputs.allowed_mask,
        )  # (N,) log σ(Δ/ξ), 0 on rows that are not counted
        per_response = response_sums(reg, inputs.batch)  # (U, R)
        signed = per_response[:, 0] - per_response[:, 1:].sum(1)  # + positive, − negatives
        return total + s.reg_weight * signed.sum(), examples

"""Constrained sampling over the trie: the decoder ``sample``.

Each user draws ``samples`` titles: from the root, every step picks one child of the current
trie node with probability softmax(z / temperature) over the node's children, restricted to the
nucleus (the smallest set of the most likely children whose mass reaches ``top_p``), until an EOS
edge ends the item. The distinct items drawn are ranked by their own score (the sum of their
log-probabilities under the scoring, / length^α) and the best ``width`` returned, -1 padded: a
sampler cannot return an item it never drew. Draws are seeded (``seed``): the same call draws
the same items.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bear.decoding.beam_cache import TreeKVCache
from bear.decoding.common import (
    DecodeResult,
    check_finite_float,
    check_inputs,
    check_no_nan_scores,
    check_positive_int,
    child_logprobs,
    max_fanout,
    ranked_result,
    topk_stable,
)
from bear.decoding.decoder import Decoder
from bear.decoding.pool import length_penalty_factor
from bear.decoding.registry import register_decoder
from bear.trie import ItemTrie

__all__ = ["ConstrainedSampling", "constrained_sampling"]


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``probs`` (..., F) with the children outside the nucleus set to 0 (the most likely first;
    a child is kept while the mass before it is below top_p, so at least one is)."""
    order = probs.argsort(dim=-1, descending=True, stable=True)
    sorted_probs = probs.gather(-1, order)
    before = sorted_probs.cumsum(-1) - sorted_probs
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, before < top_p)
    return torch.where(keep, probs, torch.zeros_like(probs))


@torch.no_grad()
def constrained_sampling(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    trie: ItemTrie,
    width: int = 10,
    samples: int = 20,
    temperature: float = 1.0,
    top_p: float = 1.0,
    scoring: str = "before",
    length_penalty: float = 0.0,
    seed: int = 0,
    prompt=None,
) -> DecodeResult:
    """Trie-constrained sampling (module docstring), batched over users and samples.

    Args:
        model, input_ids, attention_mask, trie, scoring, length_penalty, prompt: as
            ``beam_search`` (the samples share each prompt's cache through tree attention).
        width: the items returned per user (the best of those drawn).
        samples: titles drawn per user (>= 1).
        temperature: > 0, of the sampling softmax over the children (not of the score).
        top_p: in (0, 1], the nucleus.
        seed: of the draws.

    Returns:
        DecodeResult with item_ids (U, width) and scores (U, width), best first.

    Raises:
        As ``beam_search``, and ValueError for a temperature <= 0 or top_p outside (0, 1].
    """
    mask = check_inputs(model, input_ids, attention_mask, trie, scoring)
    K = check_positive_int("width", width)
    S = check_positive_int("samples", samples)
    alpha = check_finite_float("length_penalty", length_penalty)
    tau = check_finite_float("temperature", temperature)
    top_p = check_finite_float("top_p", top_p)
    if tau <= 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature={tau}, top_p={top_p}: expected > 0 and in (0, 1]")
    device, U = input_ids.device, input_ids.shape[0]
    trie = trie.to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    kv = TreeKVCache(model, input_ids, mask, prompt)
    node = torch.zeros(U, S, dtype=torch.long, device=device)  # every sample at the root
    score = torch.zeros(U, S, device=device)
    leaf = torch.full((U, S), -1, dtype=torch.long, device=device)  # the item each one drew
    final = torch.full((U, S), float("-inf"), device=device)
    logits, fanout = kv.logits.repeat_interleave(S, dim=0), trie.depth_fanout_list[0]
    for t in range(trie.max_len + 2):
        logp, edge = child_logprobs(trie, logits.view(U, S, -1), node, fanout, scoring)
        raw, _ = child_logprobs(trie, logits.view(U, S, -1) / tau, node, fanout, "before")
        check_no_nan_scores(torch.isnan(logp).any(-1).any(-1).cpu())
        live = node >= 0
        probs = _nucleus(torch.where(live[..., None], raw.exp(), 1.0), top_p)  # (U, S, F)
        pick = torch.multinomial(probs.view(U * S, -1), 1, generator=generator).view(U, S, 1)
        e = edge.gather(2, pick)[..., 0].clamp(min=0).long()  # (U, S) the chosen edges
        score = torch.where(live, score + logp.gather(2, pick)[..., 0], score)
        token, child = trie.child_token[e].long(), e + 1
        ends = live & (token == trie.eos_token_id)
        leaf = torch.where(ends, child, leaf)
        final = torch.where(ends, score / length_penalty_factor(t + 1, alpha), final)
        node = torch.where(live & ~ends, child, -1)
        if not bool((node >= 0).any()):
            break
        src = torch.arange(S, device=device).expand(U, S)
        logits = kv.step(src, torch.where(node >= 0, token, trie.eos_token_id))
        fanout = max(int(max_fanout(trie, node)), 1)
    # the distinct items drawn, best first: a repeat of an item scores as the first draw of it
    order = final.argsort(dim=1, descending=True, stable=True)
    leaf, final = leaf.gather(1, order), final.gather(1, order)
    repeat = (leaf[:, :, None] == leaf[:, None, :]).tril(diagonal=-1).any(2) & (leaf >= 0)
    final = torch.where(repeat, float("-inf"), final)
    best, idx = topk_stable(final, min(K, S))
    found = ranked_result(trie, torch.where(torch.isfinite(best), leaf.gather(1, idx), -1), best)
    pad = K - found.item_ids.shape[1]
    if pad > 0:
        found.item_ids = torch.cat([found.item_ids, found.item_ids.new_full((U, pad), -1)], 1)
        found.scores = torch.cat([found.scores, found.scores.new_full((U, pad), float("-inf"))], 1)
    return found


@register_decoder
@dataclass(frozen=True)
class ConstrainedSampling(Decoder):
    """``constrained_sampling`` as the evaluation's decoder ``sample``: options ``samples``,
    ``temperature``, ``top_p``, ``seed``."""

    name: ClassVar[str] = "sample"
    samples: int = 20
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def decode(
        self, model, input_ids, attention_mask, trie, width, scoring, length_penalty, prompt=None
    ):
        return constrained_sampling(
            model,
            input_ids,
            attention_mask,
            trie,
            width,
            samples=self.samples,
            temperature=self.temperature,
            top_p=self.top_p,
            scoring=scoring,
            length_penalty=length_penalty,
            seed=self.seed,
            prompt=prompt,
        )

"""Exact top-K items by best-first search over the trie (SPEC §4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bear.decoding.common import (
    DecodeResult,
    check_budget,
    check_inputs,
    check_no_nan_scores,
    check_positive_int,
    child_logprobs,
    ranked_result,
    topk_stable,
)
from bear.decoding.decoder import Decoder
from bear.decoding.prefix_cache import PrefixKVCache
from bear.decoding.prefix_search import (
    feed_paths,
    pack_by_user,
    spend_budget,
    through_single_children,
)
from bear.decoding.prompt_cache import PromptCache
from bear.decoding.registry import register_decoder
from bear.trie import ItemTrie

__all__ = ["ExactTopK", "exact_topk"]


@torch.no_grad()
def exact_topk(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    trie: ItemTrie,
    k: int = 10,
    scoring: str = "before",
    expand_per_round: int = 16,
    floor: torch.Tensor | None = None,
    max_expansions: int | None = None,
    prompt: PromptCache | None = None,
) -> DecodeResult:
    """The k best items by full score (α = 0), by best-first search over the trie.

    Scores only fall along a trie path (each step adds log p <= 0), so when the best frontier
    prefix is a leaf no other item can beat it: leaves popped in order are exact. Each round pops
    the `expand_per_round` best frontier entries of every user; the leading leaves are emitted and
    the inner nodes among them are expanded with one batched forward pass of one token each: the
    prompts are prefilled once and every fed prefix token keeps its KV entry
    (`PrefixKVCache`), so an expansion costs one decoding step however long the
    prefix (the search cost grows linearly with the titles' length). Under "before" scoring a
    frontier entry skips down chains of one-child nodes (log p = 0 there): their tokens are fed
    only if the chain branches again and is expanded, and an unshared title tail costs nothing.

    Args:
        model, input_ids, attention_mask, trie, scoring: as `bear.decoding.beam.beam_search`.
        k: K >= 1.
        expand_per_round: frontier entries popped per user and round (values below 1 count as
            1); a speed knob, the result does not depend on it (without a budget).
        floor: None, or (U,) scores: prefixes scoring below their user's floor are dropped
            (their items could only score lower), so the search returns the best min(k, n)
            items among the n scoring >= floor, -1 / -inf padded. Ranking a known item needs no
            more (``bear.evaluate`` floors at the target's score).
        max_expansions: None, or the prefixes (>= 0) a user may expand (tokens fed) before its
            search stops; the result's ``complete`` is then False where a user stopped with
            fewer than k items (those it holds are the best ones, in order: leaves are emitted in
            order). Which prefixes a budget reaches may depend on ``expand_per_round``.
        prompt: None, or a `bear.decoding.prompt_cache.PromptCache` of these prompts to read
            instead of prefilling them again.

    Returns:
        DecodeResult with item_ids (U, k) and scores (U, k) as beam_search.

    Raises:
        ValueError / TypeError: bad inputs (see `check_inputs`), k not an integer >= 1, a floor
            not of shape (U,) or with NaN, max_expansions not an integer >= 0; ValueError when
            the model scores a candidate NaN, a prompt cache of other prompts.
    """
    mask = check_inputs(model, input_ids, attention_mask, trie, scoring)
    k = check_positive_int("k", k)
    if floor is not None:
        floor = torch.as_tensor(floor)
        if floor.shape != (input_ids.shape[0],) or floor.isnan().any():
            raise ValueError(
                f"floor: expected one score per prompt, shape ({input_ids.shape[0]},) without "
                f"NaN, got shape {tuple(floor.shape)}"
            )
    check_budget(max_expansions)
    device = input_ids.device
    trie = trie.to(device)
    U, P = input_ids.shape[0], max(1, int(expand_per_round))
    neg_inf = float("-inf")
    # The prompts are prefilled once; the root's children form the first frontier (U, C), each
    # entry with the KV slot of its parent's token (-1: the parent is the root).
    prefixes = PrefixKVCache(model, input_ids, mask, prompt)
    width = trie.depth_fanout_list[0]
    root = torch.zeros(U, 1, dtype=torch.int64, device=device)
    logp, edge = child_logprobs(trie, prefixes.logits[:, None], root, width, scoring)
    check_no_nan_scores(torch.isnan(logp).any(-1).any(-1).cpu())
    f_score = logp[:, 0]  # (U, F)
    if floor is not None:
        floor = floor.to(device=device, dtype=f_score.dtype)
        f_score = torch.where(f_score >= floor[:, None], f_score, neg_inf)
    f_node = torch.where(edge[:, 0] >= 0, edge[:, 0] + 1, -1)
    f_slot = torch.full_like(f_node, -1)  # (U, F)
    f_node, f_pend = through_single_children(trie, f_node, torch.ones_like(f_node), scoring)
    res_leaf = torch.full((U, k + 1), -1, dtype=torch.int64, device=device)  # +1: overflow slot
    res_score = torch.full((U, k + 1), neg_inf, device=device)
    found = torch.zeros(U, dtype=torch.int64, device=device)
    users = torch.arange(U, device=device)
    spent = torch.zeros(U, dtype=torch.int64, device=device)  # prefixes expanded per user
    stopped = torch.zeros(U, dtype=torch.bool, device=device)  # at the budget, k not found
    while True:
        p = min(P, f_score.shape[1])
        s, i = topk_stable(f_score, p)  # (U, p)
        nd = f_node.gather(1, i)
        fin = torch.isfinite(s)
        is_leaf = fin & (trie.leaf_item[nd.clamp(min=0)] >= 0)
        lead = torch.cumprod(is_leaf.long(), dim=1).bool()
        lead_rank = lead.long().cumsum(1) - 1
        emit = lead & (lead_rank < (k - found)[:, None])
        slot = torch.where(emit, found[:, None] + lead_rank, k)
        res_leaf.scatter_(1, slot, torch.where(emit, nd, -1))
        res_score.scatter_(1, slot, torch.where(emit, s, neg_inf))
        found = found + emit.sum(1)
        expand = fin & ~is_leaf & (found < k)[:, None]
        pend = f_pend.gather(1, i)  # tokens each popped entry's expansion feeds
        # the budget, spent in score order; a user who cannot afford the next expansion stops
        expand, spent, out = spend_budget(expand, pend, spent, max_expansions)
        stopped |= out
        removed = emit | expand
        f_score = f_score.scatter(1, i, torch.where(removed, neg_inf, s))
        if max_expansions is not None:
            f_score = torch.where(stopped[:, None], neg_inf, f_score)
        open_users = (found < k) & torch.isfinite(f_score).any(1)
        exp_u, exp_c = expand.nonzero(as_tuple=True)
        if exp_u.numel() == 0:
            if not bool(open_users.any()):
                break
            continue
        exp_node, exp_score = nd[exp_u, exp_c], s[exp_u, exp_c]
        exp_parent = f_slot.gather(1, i)[exp_u, exp_c]
        logits, exp_slot = feed_paths(
            prefixes, trie, users[exp_u], exp_parent, exp_node, pend[exp_u, exp_c]
        )
        width = int((trie.child_ptr[exp_node + 1] - trie.child_ptr[exp_node]).max())
        logp, edge = child_logprobs(trie, logits[:, None], exp_node[:, None], width, scoring)
        new_score = (exp_score[:, None] + logp[:, 0]).reshape(-1)  # (R*F,)
        new_node = (edge[:, 0].clamp(min=0) + 1).reshape(-1)
        new_user = exp_u[:, None].expand(-1, width).reshape(-1)
        new_slot = exp_slot[:, None].expand(-1, width).reshape(-1)
        new_node, new_pend = through_single_children(
            trie, new_node, torch.ones_like(new_node), scoring
        )
        nan = torch.zeros(U, dtype=torch.bool, device=device)
        check_no_nan_scores(nan.index_put_((new_user,), torch.isnan(new_score)).cpu())
        if floor is not None:
            new_score = torch.where(new_score >= floor[new_user], new_score, neg_inf)
        # Rebuild the frontier: the finite old entries plus the new children, packed per user.
        old_u, old_c = torch.isfinite(f_score).nonzero(as_tuple=True)
        keep_new = torch.isfinite(new_score)
        all_u = torch.cat([old_u, new_user[keep_new]])
        all_s = torch.cat([f_score[old_u, old_c], new_score[keep_new]])
        all_n = torch.cat([f_node[old_u, old_c], new_node[keep_new]])
        all_p = torch.cat([f_slot[old_u, old_c], new_slot[keep_new]])
        all_k = torch.cat([f_pend[old_u, old_c], new_pend[keep_new]])
        f_score, f_node, f_slot, f_pend = pack_by_user(
            U, all_u, [(all_s, neg_inf), (all_n, -1), (all_p, -1), (all_k, 1)]
        )
    result = ranked_result(trie, res_leaf[:, :k], res_score[:, :k])
    if max_expansions is not None:
        result.complete = ~stopped
    return result


@register_decoder
@dataclass(frozen=True)
class ExactTopK(Decoder):
    """``exact_topk`` as the evaluation's decoder ``exact``: the ``width`` best items by full
    score, found without pruning (PR@K is 0 by construction; the reference a beam search
    approximates). Ranks at α = 0 only."""

    name: ClassVar[str] = "exact"
    length_penalties: ClassVar[bool] = False

    def decode(
        self, model, input_ids, attention_mask, trie, width, scoring, length_penalty, prompt=None
    ):
        self.check(width, scoring, length_penalty)
        return exact_topk(
            model, input_ids, attention_mask, trie, k=width, scoring=scoring, prompt=prompt
        )

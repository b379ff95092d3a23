"""How many items score above a threshold, up to k: the exact rank of a known target (SPEC §5).

PR@K needs to know whether the target is in the exact top-K, i.e. whether fewer than K other
items outscore it. `exact_topk` answers by finding the K best items in order, which walks every
prefix scoring above the K-th best item's score; when a weak model spreads its scores thinly
(full-vocabulary "after" scoring of a briefly fine-tuned model) those prefixes number thousands
per user. Counting needs less: any K items above the target settle "not in the top-K", and a
depth-first walk reaches complete items after a title's length of steps, where best-first order
first expands every shorter prefix of higher score.
"""

from __future__ import annotations

import torch

from bear.decoding.common import (
    check_budget,
    check_inputs,
    check_no_nan_scores,
    check_positive_int,
    child_logprobs,
)
from bear.decoding.prefix_cache import PrefixKVCache
from bear.decoding.prefix_search import (
    feed_paths,
    pack_by_user,
    spend_budget,
    through_single_children,
)
from bear.decoding.prompt_cache import PromptCache
from bear.trie import ItemTrie

__all__ = ["count_items_above"]

_INTEGER = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
_DEPTH_WEIGHT = 2.0**21  # priority = depth · this + score: deeper first, then higher score
_SCORE_FLOOR = -(2.0**20)  # scores below it only lose their order among entries of one depth


@torch.no_grad()
def count_items_above(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    trie: ItemTrie,
    threshold: torch.Tensor,
    k: int | torch.Tensor = 10,
    scoring: str = "before",
    exclude: torch.Tensor | None = None,
    expand_per_round: int | None = None,
    max_expansions: int | None = None,
    prompt: PromptCache | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per user, the number of items whose full score (α = 0) is above ``threshold``, up to k.

        count_u = min(k_u, |{i not in exclude_u : score_u(i) > threshold_u}|)

    With ``threshold`` the target's score and ``exclude`` the target, count_u is the target's
    0-based exact rank when it is below k, and k when the target is outside the exact top-k.
    Items already known to beat the target (a beam's) go in ``exclude`` with k lowered by their
    number.

    The search walks the trie depth first (deepest frontier prefixes first, then the best
    scoring), drops every prefix scoring at or below the threshold (its items score no more:
    scores only fall along a path) and stops a user once k items are counted or nothing above
    the threshold is left. Prefix tokens are fed as in `exact_topk` (one decoding step each on a
    `PrefixKVCache`; under "before" scoring one-child chains cost nothing).

    Args:
        model, input_ids, attention_mask, trie, scoring: as `bear.decoding.beam.beam_search`.
        threshold: (U,) scores, no NaN (-inf counts every item).
        k: K >= 1, where counting stops: an int, or (U,) integers >= 0, one per user.
        exclude: None, or (U,) or (U, E) canonical item ids not counted (-1: none).
        expand_per_round: frontier prefixes expanded per user and round (values below 1 count
            as 1); None (default): 4, or more while few users are left, so that a round feeds
            about `PrefixKVCache.ROWS` prefixes (a forward of a few rows costs nearly as much
            as one of 64 on a CPU). A speed knob: the counts do not depend on it (without a
            budget).
        max_expansions: None, or the prefix tokens (>= 0) a user may feed before its search
            stops; its count is then a lower bound.
        prompt: None, or a `PromptCache` of these prompts (see `beam_search`).

    Returns:
        (count (U,) int64 in [0, k_u], complete (U,) bool): complete is False where the budget
        stopped a user before its count was settled (always True without a budget).

    Raises:
        ValueError / TypeError: bad inputs (see `check_inputs`), k not an integer >= 1 nor
            (U,) integers >= 0, a threshold not of shape (U,) or with NaN, exclude not of shape
            (U,) or (U, E), max_expansions not an integer >= 0, a prompt cache of other
            prompts; ValueError when the model scores a candidate NaN.
    """
    mask = check_inputs(model, input_ids, attention_mask, trie, scoring)
    U, device = input_ids.shape[0], input_ids.device
    if isinstance(k, torch.Tensor):
        if k.shape != (U,) or k.dtype not in _INTEGER or (k < 0).any():
            raise ValueError(
                f"k: expected an int >= 1 or one integer >= 0 per prompt, shape ({U},), got "
                f"{k.dtype} of shape {tuple(k.shape)}"
            )
    else:
        k = torch.full((U,), check_positive_int("k", k))
    threshold = torch.as_tensor(threshold)
    if threshold.shape != (U,) or threshold.isnan().any():
        raise ValueError(
            f"threshold: expected one score per prompt, shape ({U},) without NaN, got shape "
            f"{tuple(threshold.shape)}"
        )
    exclude = torch.full((U,), -1) if exclude is None else torch.as_tensor(exclude)
    if exclude.shape[:1] != (U,) or exclude.dim() not in (1, 2):
        raise ValueError(
            f"exclude: expected item ids per prompt (-1 for none), shape ({U},) or ({U}, E), got "
            f"shape {tuple(exclude.shape)}"
        )
    check_budget(max_expansions)
    trie = trie.to(device)
    exclude = exclude.to(device=device, dtype=torch.int64).reshape(U, -1)  # (U, E)
    k = k.to(device=device, dtype=torch.int64)
    neg_inf = float("-inf")
    prefixes = PrefixKVCache(model, input_ids, mask, prompt)
    threshold = threshold.to(device=device, dtype=prefixes.logits.dtype)
    count = torch.zeros(U, dtype=torch.int64, device=device)
    users = torch.arange(U, device=device)

    def admit(user, score, node, slot):
        """Children (E,) into the frontier: those above the threshold; leaves are counted."""
        check_no_nan_scores(
            torch.zeros(U, dtype=torch.bool, device=device)
            .index_put_((user,), torch.isnan(score))
            .cpu()
        )
        node, pend = through_single_children(trie, node, torch.ones_like(node), scoring)
        keep = (node >= 0) & (score > threshold[user])
        item = trie.leaf_item[node.clamp(min=0)]
        leaf = keep & (item >= 0)
        new = (item[leaf, None] != exclude[user[leaf]]).all(1)
        count.index_add_(0, user[leaf], new.long())
        inner = keep & ~leaf
        return user[inner], score[inner], node[inner], slot[inner], pend[inner]

    width = trie.depth_fanout_list[0]
    root = torch.zeros(U, 1, dtype=torch.int64, device=device)
    logp, edge = child_logprobs(trie, prefixes.logits[:, None], root, width, scoring)
    node = torch.where(edge[:, 0] >= 0, edge[:, 0] + 1, -1)  # (U, F)
    entries = admit(
        users[:, None].expand(-1, width).reshape(-1),
        logp[:, 0].reshape(-1),
        node.reshape(-1),
        torch.full((U * width,), -1, device=device),
    )
    spent = torch.zeros(U, dtype=torch.int64, device=device)
    stopped = torch.zeros(U, dtype=torch.bool, device=device)
    while True:
        user, score, node, slot, pend = entries
        f_score, f_node, f_slot, f_pend = pack_by_user(
            U, user, [(score, neg_inf), (node, -1), (slot, -1), (pend, 0)]
        )
        live = torch.isfinite(f_score) & (count < k)[:, None] & ~stopped[:, None]
        if not bool(live.any()):
            break
        depth = trie.node_depth[f_node.clamp(min=0)].double()
        key = depth * _DEPTH_WEIGHT + f_score.double().clamp(min=_SCORE_FLOOR)
        key = torch.where(live, key, neg_inf)
        if expand_per_round is None:
            per_user = max(4, PrefixKVCache.ROWS // int(live.any(1).sum()))
        else:
            per_user = max(1, int(expand_per_round))
        key, col = key.topk(min(per_user, key.shape[1]), dim=1)  # (U, p) deepest, then best
        pick = torch.isfinite(key)
        cost = f_pend.gather(1, col)
        pick, spent, out = spend_budget(pick, cost, spent, max_expansions)  # priority order
        stopped |= out
        taken = torch.zeros_like(live).scatter_(1, col, pick)
        rest = live & ~taken & ~stopped[:, None]
        ru, rc = rest.nonzero(as_tuple=True)
        pu, pc = taken.nonzero(as_tuple=True)
        if pu.numel() == 0:
            entries = (ru, f_score[ru, rc], f_node[ru, rc], f_slot[ru, rc], f_pend[ru, rc])
            continue
        exp_node, exp_score = f_node[pu, pc], f_score[pu, pc]
        logits, exp_slot = feed_paths(prefixes, trie, pu, f_slot[pu, pc], exp_node, f_pend[pu, pc])
        width = int((trie.child_ptr[exp_node + 1] - trie.child_ptr[exp_node]).max())
        logp, edge = child_logprobs(trie, logits[:, None], exp_node[:, None], width, scoring)
        child = torch.where(edge[:, 0] >= 0, edge[:, 0] + 1, -1)
        new = admit(
            pu[:, None].expand(-1, width).reshape(-1),
            (exp_score[:, None] + logp[:, 0]).reshape(-1),
            child.reshape(-1),
            exp_slot[:, None].expand(-1, width).reshape(-1),
        )
        old = (ru, f_score[ru, rc], f_node[ru, rc], f_slot[ru, rc], f_pend[ru, rc])
        entries = tuple(torch.cat(pair) for pair in zip(old, new, strict=True))
    return torch.minimum(count, k), ~stopped | (count >= k)

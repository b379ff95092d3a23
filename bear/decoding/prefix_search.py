"""Pieces shared by the searches that expand trie prefixes in any order on a `PrefixKVCache`
(`bear.decoding.best_first.exact_topk`, `bear.decoding.count_above.count_items_above`)."""

from __future__ import annotations

import torch

from bear.decoding.prefix_cache import PrefixKVCache
from bear.trie import ItemTrie

__all__ = ["feed_paths", "pack_by_user", "spend_budget", "through_single_children"]


def through_single_children(trie: ItemTrie, node, pend, scoring: str):
    """Under "before" scoring, move each frontier node down its chain of one-child nodes: the
    only child of a node has log p = 0 whatever the model says, so the score stays and no
    forward is needed until the chain branches or ends in a leaf (a title's unshared tail costs
    nothing). Returns (node, pend): pend counts the path's nodes whose tokens are not fed yet,
    the entry's own included (1 without a jump). "after" scoring: unchanged."""
    if scoring != "before":
        return node, pend
    while True:
        n = node.clamp(min=0)
        one = (node >= 0) & (trie.child_ptr[n + 1] - trie.child_ptr[n] == 1)
        if not bool(one.any()):
            return node, pend
        first = trie.child_ptr[n].clamp(max=trie.child_token.shape[0] - 1)  # a leaf has none
        node = torch.where(one, first + 1, node)  # edge e leads to node e + 1
        pend = pend + one.long()


def feed_paths(prefixes: PrefixKVCache, trie: ItemTrie, rows, parent, node, pend):
    """Feed the last ``pend`` tokens of each node's path after its fed prefix (slot ``parent``),
    oldest first, one batched forward per position: (logits after the node (R, V), its slot)."""
    steps = int(pend.max())
    # path[r, j]: the node whose token goes j-th (j < pend[r]); walk up from the node
    path = torch.full((node.shape[0], steps), -1, dtype=torch.int64, device=node.device)
    cur = node
    for back in range(steps):
        j = pend - 1 - back  # position of `cur` among the row's tokens to feed
        live = j >= 0
        path[live, j[live]] = cur[live]
        cur = torch.where(live, trie.node_parent[cur.clamp(min=0)], cur)
    slot, logits = parent.clone(), None
    for j in range(steps):
        live = (j < pend).nonzero().view(-1)
        step_nodes = path[live, j]
        out, new_slot = prefixes.extend(
            rows[live], slot[live], trie.node_token[step_nodes].long(), trie.node_depth[step_nodes]
        )
        slot[live] = new_slot
        if logits is None:
            logits = out.new_empty(node.shape[0], out.shape[1])
        last = pend[live] == j + 1
        logits[live[last]] = out[last]
    return logits, slot


def pack_by_user(num_users: int, user: torch.Tensor, columns):
    """Entries listed by user (E,) -> one row per user, entries in their listed order, padded.

    ``columns``: (values (E,), fill) pairs. Returns one (U, C) tensor per pair, C the most
    entries of one user (at least 1), ``fill`` where a user has fewer."""
    order = torch.argsort(user, stable=True)
    user = user[order]
    counts = torch.bincount(user, minlength=num_users)
    col = torch.arange(user.shape[0], device=user.device) - (counts.cumsum(0) - counts)[user]
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    out = []
    for values, fill in columns:
        packed = values.new_full((num_users, width), fill)
        packed[user, col] = values[order]
        out.append(packed)
    return out


def spend_budget(want, cost, spent, budget: int | None):
    """The expansions a per-user budget affords, spent in column (priority) order.

    Args:
        want: (U, p) bool, the entries a round would expand, in priority order.
        cost: (U, p) the tokens each expansion feeds.
        spent: (U,) tokens each user fed so far.
        budget: None (no bound) or the tokens a user may feed in all.

    Returns:
        (afford (U, p) bool: a prefix of each user's wanted entries; spent (U,) after them;
        out (U,) bool: users who wanted an expansion and could afford none, whose search stops).
    """
    if budget is None:
        return want, spent, torch.zeros_like(spent, dtype=torch.bool)
    afford = want & ((cost * want).cumsum(1) <= (budget - spent)[:, None])
    return afford, spent + (cost * afford).sum(1), want.any(1) & ~afford.any(1)

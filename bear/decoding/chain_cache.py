"""The KV cache of a beam search that runs the model per branching point, not per title token
(SPEC §4).

Most of a title's tokens sit on trie nodes with one child (forced tokens). Under "before" scoring
a forced token's log p is 0 whatever the logits, so a beam is fed only when it reaches a node
with several children, its tokens not yet in the cache all at once; a title's unshared tail is
never fed. Under "after" scoring every log p needs the model: a beam that enters a node by a
choice is fed its token and up to ``limit - 1`` forced tokens after it in one forward, which
returns each one's log p and, where the chain branches, the logits there. Either way the search
walks each beam down its chain depth by depth from those values, ranking it against the other
beams exactly as a step-by-step search does, and the model runs only at the depths where some
kept beam needs logits.

Feeding ahead ("after") also feeds the tokens of beams pruned before the end of their chain, and
a forward pads every user to the one with the most tokens to feed: on a CPU, where a forward
costs its tokens, that outweighs the forwards saved (``default_chain_limit``), except in a
forward of few chains, which costs mostly the reading of the weights: a CPU search gives each of
N < 16 chains 16 // N tokens (``default_feed_budget``). The cache's layers grow into spare room
(`bear.decoding.growing_cache`) instead of being copied whole at every forward. Under "after",
a model whose logits are its output layer's (`bear.decoding.blocked_head`) computes none in a
fed forward: a forced token's log p comes from its hidden state (the output layer a block at a
time), and full logits only where a chain branches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bear.decoding.beam_cache import check_tree_attention
from bear.decoding.blocked_head import hidden_forward, plain_head, target_log_softmax
from bear.decoding.grouped_attention import grouped_attention
from bear.decoding.growing_cache import growing_cache
from bear.decoding.prompt_cache import (
    PromptCache,
    cache_kwarg,
    keeps_logits,
    output_cache,
    prefilled,
)
from bear.trie import ItemTrie

__all__ = [
    "ChainKVCache",
    "default_chain_limit",
    "default_feed_budget",
    "forced_chains",
    "lone_child_token",
]

GPU_CHAIN_LIMIT = 16  # the most tokens of one chain a forward feeds on a GPU
CPU_FEED_BUDGET = 16  # on a CPU, a forward feeding fewer chains than this feeds them ahead
PER_BEAM = ("unfed", "lineage", "branches", "ahead", "offset", "length")  # and ``rows``


def forced_chains(trie: ItemTrie, node: torch.Tensor, token: torch.Tensor, limit: int):
    """The tokens a beam feeds: the one entering its node, then each forced token after it.

    A node's child is forced when it is the node's only child and not the title's end (EOS is
    never fed: an EOS candidate leaves the search for the finished pool).

    Args:
        node: (N,) the beams' trie nodes (>= 0).
        token: (N,) the token that entered each node.
        limit: the most tokens one chain feeds (>= 1); a longer chain goes on in a later forward.

    Returns:
        tokens (N, K) int64, -1 after a chain's end; nodes (N, K) the node each token enters, -1
        after the end; lengths (N,) in [1, limit]. K = min(limit, trie.max_len + 1).
    """
    tokens, nodes = [token.long()], [node.long()]
    live, cur = torch.ones_like(node, dtype=torch.bool), node.long()
    # no host synchronisation: K = min(limit, the longest title with its EOS) columns at most,
    # -1 where a chain has ended
    for _ in range(min(limit, trie.max_len + 1) - 1):
        tok = lone_child_token(trie, cur)
        live = live & (tok >= 0) & (tok != trie.eos_token_id)
        cur = torch.where(live, trie.child_ptr[cur].long() + 1, cur)  # edge e leads to node e + 1
        tokens.append(torch.where(live, tok, -1))
        nodes.append(torch.where(live, cur, -1))
    tokens, nodes = torch.stack(tokens, 1), torch.stack(nodes, 1)
    return tokens, nodes, (tokens >= 0).sum(1)


def default_chain_limit(device) -> int:
    """The most tokens of one chain a forward feeds when ``beam_search`` is not told: 16 on a
    GPU (a forward there costs mostly its latency: fewer forwards win), 1 elsewhere (a CPU's
    forward costs its tokens: feeding a chain ahead adds the tokens of beams pruned on the way
    and pads the users with less to feed; benchmarks/README "A pretrained model:
    SmolLM2-135M-Instruct on Office")."""
    return GPU_CHAIN_LIMIT if torch.device(device).type == "cuda" else 1


def default_feed_budget(device) -> int:
    """The tokens one forward may feed in all, when ``beam_search`` is not told a chain limit:
    a forward feeding N chains gives each up to max(chain limit, budget // N) tokens. 16 on a
    CPU: a forward of a few positions costs mostly the reading of the model's weights, so once
    few beams are left (a search's last steps, often one user's beam down a long title) their
    chains are fed ahead at little cost, where one token each would cost a forward a token
    (benchmarks/README "A pretrained model: SmolLM2-135M-Instruct on Office"). 0 (none) on a
    GPU, whose chains already take ``GPU_CHAIN_LIMIT``."""
    return 0 if torch.device(device).type == "cuda" else CPU_FEED_BUDGET


def lone_child_token(trie: ItemTrie, node: torch.Tensor) -> torch.Tensor:
    """The token of each node's only child (EOS included), -1 for a node with several children or
    none and for -1 entries; node's shape."""
    n = node.clamp(min=0)
    start = trie.child_ptr[n]
    one = (node >= 0) & (trie.child_ptr[n + 1] - start == 1)
    tok = trie.child_token[start.clamp(max=max(trie.child_token.shape[0] - 1, 0))].long()
    return torch.where(one, tok, -1)


class ChainKVCache:
    """One cache row per user, shared by its beams through tree attention, fed chain by chain.

    ``lineage`` (U, Bc, G) marks the slots after the prompt that hold a beam's tokens. The
    tokens fed in one forward follow the G slots, each user's chains side by side, padding
    attending to the prompt only; a token at trie depth d has position ``last_pos + d``, as one
    sequence per beam would.

    "after" scoring: a beam whose logits are not known (its parent branched, or it reached the
    end of a chain cut at ``limit``) is fed its token and the forced ones after it; each beam
    keeps ``ahead`` (U, Bc, K), the log p of its forced tokens from ``offset`` to ``length``,
    then, when ``branches``, ``rows`` (U, Bc, V) the logits where its chain branches. Its
    lineage holds the tokens ahead of it too: a descendant attends to them all, and its own
    tokens come after them.

    "before" scoring: a lone child's log p is 0, so a beam needs logits only on a node with
    several children; ``unfed`` (U, Bc) counts the tokens of its path not in the cache, and they
    are fed, all at once, when it gets to such a node. A beam that runs down a title's unshared
    tail to its end is never fed that tail.
    """

    def __init__(
        self,
        model,
        input_ids,
        mask,
        trie: ItemTrie,
        scoring: str,
        prompt: PromptCache | None,
        limit: int,
        budget: int = 0,
    ):
        check_tree_attention(model)
        self.model, self.trie, self.scoring = model, trie, scoring
        self.limit, self.budget = limit, budget
        self.cache_kw = cache_kwarg(model)
        self.cache, kv_mask, self.last_pos, logits = prefilled(model, input_ids, mask, prompt)
        self.cache = growing_cache(self.cache)  # appended to at every forward
        U, device = input_ids.shape[0], mask.device
        self.prompt_mask = kv_mask.bool()  # (U, S) the prompts' cached positions
        self.node, self.unfed, self.offset, self.length = (
            torch.zeros(U, 1, dtype=torch.int64, device=device) for _ in range(4)
        )
        self.lineage = torch.zeros(U, 1, 0, dtype=torch.bool, device=device)
        # "after": the rows hold log_softmax(z) where a beam's chain branches, computed once and
        # read by the ranking as they are (``normalized``); "before": the logits
        self.normalized = scoring == "after"
        rows = logits.float().view(U, 1, -1)
        self.rows = torch.log_softmax(rows, -1) if self.normalized else rows.clone()  # not a view
        self.branches = torch.ones(U, 1, dtype=torch.bool, device=device)
        self.ahead = torch.zeros(U, 1, 0, device=device, dtype=torch.float32)
        self.dtype = next(model.parameters()).dtype
        self.keeps_logits = keeps_logits(model)
        # "after": fed chains are scored from their hidden states when the model's logits are its
        # output layer's (`blocked_head`): no logits at padding, no (T, V) log-softmax
        self.head = plain_head(model, input_ids[:1, -1:]) if self.normalized else None

    @property
    def logits(self) -> torch.Tensor:
        """(U * Bc, V) float32: each beam's logits ("before") or their log-softmax ("after",
        ``normalized``) where a search reads them; any values for the beams ``forced`` names and
        for dead beams."""
        return self.rows.reshape(-1, self.rows.shape[-1])

    def forced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(is_forced (U, Bc) bool, log p (U, Bc)): the beams on a one-child node whose child's
        log p is known without their logits, and that log p (0 elsewhere)."""
        if self.scoring == "before":
            is_forced = lone_child_token(self.trie, self.node) >= 0
            return is_forced, torch.zeros(is_forced.shape, device=is_forced.device)
        is_forced = self.offset < self.length
        if self.ahead.shape[2] == 0:
            return is_forced, torch.zeros(is_forced.shape, device=is_forced.device)
        at = self.offset.clamp(max=self.ahead.shape[2] - 1)[..., None]
        return is_forced, torch.where(is_forced, self.ahead.gather(2, at).squeeze(2), 0.0)

    def _select_users(self, keep: torch.Tensor) -> None:
        self.cache.batch_select_indices(keep)
        for name in ("prompt_mask", "last_pos", "rows") + PER_BEAM:
            setattr(self, name, getattr(self, name)[keep])

    def step(self, src, tokens, node, depth: int, keep: torch.Tensor | None = None):
        """Move to the next beams; feed those whose logits are needed and not known.

        Args:
            src: (U', Bn) each next beam's parent among the current beams.
            tokens: (U', Bn) the token entering its node.
            node: (U', Bn) its trie node, -1 for a beam not to feed (dead or useless).
            depth: the depth of those nodes (the number of title tokens they hold).
            keep: (U',) the users that stay, or None for all.

        Returns:
            (U' * Bn, V) float32 logits of the next beams (``logits``).
        """
        if keep is not None and keep.shape[0] < self.prompt_mask.shape[0]:
            self._select_users(keep)
        was_forced = (self.offset < self.length).gather(1, src)
        for name in PER_BEAM:
            setattr(self, name, _pick_beams(getattr(self, name), src))
        self.node = node
        parent_rows, (U, Bn), V = self.rows, src.shape, self.rows.shape[2]
        # a row is carried only while its chain's end logits are pending (``branches``, not fed
        # again now); the other rows are written below (a fed chain that branches) or never read
        # (a dead beam; a beam on a one-child node reads ``forced``, not its row)
        self.rows = parent_rows.new_empty(U, Bn, V)
        if self.scoring == "before":
            self.unfed = self.unfed + 1
            n = node.clamp(min=0)
            need = (node >= 0) & (self.trie.child_ptr[n + 1] - self.trie.child_ptr[n] > 1)
            if bool(need.any()):
                self._feed_paths(need, node, depth)
            return self.logits
        self.offset = self.offset + was_forced.long()
        # a beam whose parent branched, or that reached the end of a chain cut at the limit
        unknown = ~was_forced | ((self.offset >= self.length) & ~self.branches)
        need = (node >= 0) & unknown
        user, beam = ((node >= 0) & ~need & self.branches).nonzero().unbind(1)
        self.rows[user, beam] = parent_rows[user, src[user, beam]]
        if bool(need.any()):
            self._feed_ahead(need, tokens, node, depth)
        return self.logits

    def _feed_paths(self, need, node, depth: int) -> None:
        """Under "before" scoring: feed the ``unfed`` last tokens of the paths of the ``need``
        (U, Bn) beams, which sit on branching nodes; keep the logits after the last."""
        user, beam = need.nonzero().unbind(1)
        unfed = self.unfed[user, beam]  # (N,) >= 1
        K = int(unfed.max())
        i = torch.arange(K, device=node.device)
        # up[:, k]: each beam's k-th ancestor (k = 0 itself); the chain's token i enters the
        # (unfed - 1 - i)-th, so the last one enters the beam's node
        up, cur = [], node[user, beam]
        for _ in range(K):
            up.append(cur)
            cur = self.trie.node_parent[cur.clamp(min=0)].long()
        path = torch.stack(up, 1).gather(1, (unfed[:, None] - 1 - i).clamp(min=0))  # (N, K)
        chain = torch.where(i < unfed[:, None], self.trie.node_token[path.clamp(min=0)].long(), -1)
        logits, ends = self._forward(user, beam, chain, unfed, depth - unfed + 1, last_only=True)
        self.rows[user, beam] = logits[user, ends].float()
        self.unfed[user, beam] = 0

    def _feed_ahead(self, need, tokens, node, depth: int) -> None:
        """Under "after" scoring: feed the ``need`` (U, Bn) beams' chains; their lookahead is
        replaced."""
        user, beam = need.nonzero().unbind(1)
        limit = max(self.limit, self.budget // user.numel())
        chain, chain_node, length = forced_chains(
            self.trie, node[user, beam], tokens[user, beam], limit
        )
        out, cols = self._forward(
            user, beam, chain, length, torch.full_like(length, depth), last_only=False
        )  # (U, T, V) logits, or (U, T, H) last hidden states with a plain ``head``
        # what each fed position predicts: its node's lone child (EOS too), else nothing (-1)
        target = lone_child_token(self.trie, chain_node)  # (N, K), -1 after the chain too
        n, k = (target >= 0).nonzero().unbind(1)  # the fed positions that predict a lone child
        end_node = chain_node.gather(1, (length - 1)[:, None]).squeeze(1)
        branches = lone_child_token(self.trie, end_node) < 0  # the chain ends on a branching node
        end_col = cols.gather(1, (length - 1)[:, None]).squeeze(1)
        b = branches.nonzero().squeeze(1)
        lp = torch.zeros(target.shape, device=node.device, dtype=torch.float32)
        if self.head is None:
            logprobs = torch.log_softmax(out, dim=-1, dtype=torch.float32)  # (U, T, V), padding too
            lp[n, k] = logprobs[user[n], cols[n, k], target[n, k]]
            self.rows[user[b], beam[b]] = logprobs[user[b], end_col[b]]
        else:  # logits at the chains' positions only: a lone child's log p blockwise, full rows
            # where a chain branches
            lp[n, k] = target_log_softmax(out[user[n], cols[n, k]], self.head, target[n, k])
            ends = F.linear(out[user[b], end_col[b]], self.head.weight, self.head.bias)  # (N_b, V)
            self.rows[user[b], beam[b]] = torch.log_softmax(ends, dim=-1, dtype=torch.float32)
        self.branches[user, beam] = branches
        K = max(self.ahead.shape[2], lp.shape[1])
        self.ahead = _pad_last(self.ahead, K)
        self.ahead[user, beam] = _pad_last(lp, K)
        self.offset[user, beam] = 0
        self.length[user, beam] = (target >= 0).sum(1)

    def _forward(self, user, beam, chain, length, first_depth, last_only: bool):
        """One forward of N chains: chain n (tokens (N, K), -1 after its ``length``) extends
        beam (user[n], beam[n]) from trie depth ``first_depth[n]``; the chains become part of
        their beams' lineage.

        Returns:
            logits (U, T', V) and, for each chain, the columns of its tokens (N, K) or, with
            ``last_only``, of its last token (N,) (only those logits are computed, where the
            model allows it). Without ``last_only`` and with a plain ``head``, the last hidden
            states (U, T', H) instead of the logits (no logits computed).
        """
        device = chain.device
        U, Bn = self.lineage.shape[:2]
        # pack each user's chains side by side: chain n's token i at column start[n] + i
        per_user = torch.zeros(U, dtype=torch.int64, device=device).index_add_(0, user, length)
        start = (length.cumsum(0) - length) - (per_user.cumsum(0) - per_user)[user]  # (N,)
        T = int(per_user.max())
        i = torch.arange(chain.shape[1], device=device)
        real = i < length[:, None]  # (N, K)
        cols = start[:, None] + i
        row, col = user[:, None].expand_as(real)[real], cols[real]
        ids = torch.full((U, T), self.trie.eos_token_id, dtype=torch.int64, device=device)
        ids[row, col] = chain[real]
        owner = torch.full((U, T), -1, dtype=torch.int64, device=device)
        owner[row, col] = beam[:, None].expand_as(real)[real]
        index = torch.zeros((U, T), dtype=torch.int64, device=device)
        index[row, col] = i.expand_as(real)[real]
        depth = torch.zeros((U, T), dtype=torch.int64, device=device)
        depth[row, col] = (first_depth[:, None] + i).expand_as(real)[real]
        extra = {}
        last = start + length - 1
        if last_only and self.keeps_logits:
            extra["logits_to_keep"] = torch.unique(last)
        inputs = {
            "input_ids": ids,
            "attention_mask": self._mask(owner, index),
            "position_ids": self.last_pos[:, None] + depth,
            "use_cache": True,
            self.cache_kw: self.cache,
        }
        hidden = None
        with grouped_attention(self.model):
            if not last_only and self.head is not None:
                out, hidden = hidden_forward(self.model, **inputs)
            else:
                out = self.model(**inputs, **extra)
        self.cache = output_cache(out)
        mine = torch.zeros(U, Bn, T, dtype=torch.bool, device=device)
        mine[row, beam[:, None].expand_as(real)[real], col] = True
        self.lineage = torch.cat([self.lineage, mine], dim=2)
        if not last_only:
            return (out.logits if hidden is None else hidden), cols
        if "logits_to_keep" in extra:
            last = torch.searchsorted(extra["logits_to_keep"], last)
        return out.logits, last

    def _mask(self, owner, index) -> torch.Tensor:
        """(U, 1, T, S + G + T) additive attention mask of the fed tokens (T per user, ``owner``
        their beam, -1 padding, ``index`` their place in its chain): the prompt, the beam's
        lineage and its chain's tokens up to itself; padding sees the prompt only."""
        T, G = owner.shape[1], self.lineage.shape[2]
        is_real = (owner >= 0)[..., None]
        old = self.lineage.gather(1, owner.clamp(min=0)[..., None].expand(-1, -1, G))
        same_chain = (owner[:, :, None] == owner[:, None, :]) & (
            index[:, None, :] <= index[:, :, None]
        )
        allowed = torch.cat(
            [self.prompt_mask[:, None, :].expand(-1, T, -1), old & is_real, same_chain & is_real],
            dim=2,
        )
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=owner.device)
        return mask.masked_fill(~allowed, torch.finfo(self.dtype).min)[:, None]


def _pick_beams(x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """x (U, Bc, ...) per beam, picked per user by src (U, Bn): out[u, j] = x[u, src[u, j]] (whole
    rows copied at once: a gather with an index expanded over V was 4x slower)."""
    U, Bc = x.shape[:2]
    flat = (src + Bc * torch.arange(U, device=src.device)[:, None]).reshape(-1)
    picked = x.reshape(U * Bc, *x.shape[2:]).index_select(0, flat)
    return picked.view(U, src.shape[1], *x.shape[2:])


def _pad_last(x: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` zero-padded along its last dim to ``width``."""
    if x.shape[-1] == width:
        return x
    return torch.nn.functional.pad(x, (0, width - x.shape[-1]))

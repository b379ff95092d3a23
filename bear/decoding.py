"""Trie-constrained decoding of item ids (SPEC §4): beam search, exact top-K, teacher forcing.

All functions take left-padded prompts (U, P), an `ItemTrie` and any Hugging Face causal LM, and
return item ids and scores, never strings.

Scoring modes, per step with logits z and allowed children A of the current trie node:

    before:  log p_j = z_j - logsumexp_{k in A} z_k              (softmax over the allowed children)
    after:   log p_j = z_j - logsumexp_{k in V} z_k,  j in A      (full softmax, then restricted)

An item's score is the sum of its per-step log-probabilities, EOS included, divided by
length ** length_penalty (length = generated tokens, EOS included), as in Hugging Face.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch

from bear.trie import ItemTrie

__all__ = ["DecodeResult", "beam_search", "beam_thresholds", "exact_topk", "score_items"]

_SCORINGS = ("before", "after")
_TREE_ATTENTION = (None, "sdpa", "eager")  # attention implementations that apply 4-D masks
_ROW_BUDGET = 2**25  # logits elements per teacher-forcing chunk (~128 MB in float32)


@dataclass
class DecodeResult:
    """Ranked items per user.

    item_ids: (U, K) int64 canonical item ids, best first, -1 where fewer than K items exist.
    scores:   (U, K) float32 scores, -inf where padded.
    """

    item_ids: torch.Tensor
    scores: torch.Tensor


# ---------------------------------------------------------------------------------- checks
def _model_vocab(model) -> int | None:
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and hasattr(emb, "weight"):
        return int(emb.weight.shape[0])
    return getattr(getattr(model, "config", None), "vocab_size", None)


def _check_inputs(model, input_ids, attention_mask, trie, scoring):
    if not isinstance(trie, ItemTrie):
        raise TypeError(f"trie must be a bear.trie.ItemTrie, got {type(trie).__name__}")
    if scoring not in _SCORINGS:
        raise ValueError(f"scoring must be one of {_SCORINGS}, got {scoring!r}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (U, P), got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
            f"{tuple(input_ids.shape)}"
        )
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids is empty: shape {tuple(input_ids.shape)}")
    mask = attention_mask.to(torch.int64)
    if not bool((mask[:, -1] == 1).all()) or not bool((mask[:, 1:] >= mask[:, :-1]).all()):
        raise ValueError(
            "prompts must be left-padded: each attention_mask row must be 0...0 1...1 and end "
            "with 1 (use tokenizer.padding_side = 'left')"
        )
    vocab = _model_vocab(model)
    if vocab is not None and trie.vocab_size > vocab:
        raise ValueError(
            f"the trie's vocab_size={trie.vocab_size} exceeds the model's vocabulary ({vocab}); "
            "item token ids must be valid model token ids"
        )
    return mask


def _check_tree_attention(model) -> None:
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if attn not in _TREE_ATTENTION:
        raise ValueError(
            f"kv_sharing='tree' needs an attention implementation that honours a 4-D mask "
            f"({sorted(a for a in _TREE_ATTENTION if a)}); the model uses {attn!r}: pass "
            "kv_sharing='copy' to beam_search"
        )


def _log_penalty(length: int, alpha: float) -> float:
    return float(length) ** alpha


# ---------------------------------------------------------------------------------- model state
def _cache_kwarg(model) -> str:
    """Name of the KV-cache argument of `model.forward` (`cache` since transformers 5.x)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _output_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _prefill(model, input_ids, mask, pos):
    """Prompt forward with a cache; only the last position's logits when the model allows it."""
    extra = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        extra["logits_to_keep"] = 1  # the prompt's other logits are never used
    return model(
        input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True, **extra
    )


class _Batch:
    """Prompts prefilled once (one row per user); the KV cache rows are then expanded to the
    beams and reordered through the public `Cache.batch_select_indices`."""

    def __init__(self, model, input_ids, mask):
        self.model = model
        self.cache_kw = _cache_kwarg(model)
        self.mask = mask  # (R, P + t)
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate does
        out = _prefill(model, input_ids, mask, pos)
        self.cache = _output_cache(out)
        self.last_pos = pos[:, -1]  # (R,)
        self.logits = out.logits[:, -1].float()  # (R, V)

    def step(self, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Keep cache rows `rows` (may repeat), feed one token per row, return next logits."""
        # Public cache API. `batch_select_indices` indexes each layer's keys/values with
        # `keys[rows]`, which accepts repeated rows (beam expansion and reordering) and is ~25x
        # faster on CPU than the `index_select` of `reorder_cache` for 4-D tensors (torch 2.13).
        self.cache.batch_select_indices(rows)
        self.mask = torch.cat([self.mask[rows], self.mask.new_ones(rows.shape[0], 1)], dim=1)
        self.last_pos = self.last_pos[rows] + 1
        out = self.model(
            input_ids=tokens.view(-1, 1),
            attention_mask=self.mask,
            position_ids=self.last_pos.view(-1, 1),
            use_cache=True,
            **{self.cache_kw: self.cache},
        )
        self.cache = _output_cache(out)
        self.logits = out.logits[:, -1].float()
        return self.logits


class _TreeBatch:
    """Beams share their user's prompt cache through tree attention (kv_sharing="tree").

    The KV cache keeps one row per user: the prompt, then every step appends the user's Bn beam
    tokens (slots P + Bn*t + j). A custom 4-D attention mask lets each new token attend to its
    prompt and the slots of its own ancestors only, which is exactly the attention of a separate
    sequence per beam; positions are prompt length + t for every beam. Nothing is copied between
    beams and the cache is never reordered; finished users leave through the public
    `Cache.batch_select_indices`.
    """

    def __init__(self, model, input_ids, mask):
        self.model = model
        self.cache_kw = _cache_kwarg(model)
        self.prompt_mask = mask.bool()  # (U, P)
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        out = _prefill(model, input_ids, mask, pos)
        self.cache = _output_cache(out)
        self.last_pos = pos[:, -1]  # (U,) position of the last prompt token
        self.logits = out.logits[:, -1].float()  # (U, V)
        self.anc = torch.zeros(input_ids.shape[0], 1, 0, dtype=torch.int64, device=mask.device)
        self.generated = 0  # slots appended after the prompt
        self.dtype = next(model.parameters()).dtype

    def select_users(self, keep: torch.Tensor) -> None:
        self.cache.batch_select_indices(keep)
        self.prompt_mask = self.prompt_mask[keep]
        self.last_pos = self.last_pos[keep]
        self.anc = self.anc[keep]

    def step(self, src: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Beam j of user u extends beam src[u, j] with tokens[u, j]: (U, Bn) -> (U*Bn, V)."""
        U, Bn = tokens.shape
        G = self.generated
        new_slot = G + torch.arange(Bn, device=tokens.device).expand(U, Bn)  # (U, Bn)
        anc = self.anc.gather(1, src[..., None].expand(-1, -1, self.anc.shape[2]))  # (U, Bn, t)
        self.anc = torch.cat([anc, new_slot[..., None]], dim=2)  # (U, Bn, t+1)
        own = torch.zeros(U, Bn, G + Bn, dtype=torch.bool, device=tokens.device)
        own.scatter_(2, self.anc, True)  # each beam sees its ancestors' slots and itself
        allowed = torch.cat([self.prompt_mask[:, None, :].expand(-1, Bn, -1), own], dim=2)
        neg = torch.finfo(self.dtype).min
        mask4d = torch.zeros(allowed.shape, dtype=self.dtype, device=tokens.device)
        mask4d = mask4d.masked_fill(~allowed, neg)[:, None]  # (U, 1, Bn, P + G + Bn)
        step = self.anc.shape[2]
        pos = (self.last_pos + step)[:, None].expand(U, Bn)  # (U, Bn)
        out = self.model(
            input_ids=tokens,
            attention_mask=mask4d,
            position_ids=pos,
            use_cache=True,
            **{self.cache_kw: self.cache},
        )
        self.cache = _output_cache(out)
        self.generated = G + Bn
        return out.logits.float().reshape(U * Bn, -1)


def _child_logprobs(trie: ItemTrie, logits, node, width: int, scoring: str):
    """Log-probabilities of the children of each beam's node, padded to `width`.

    logits (U, Bc, V), node (U, Bc) with -1 for dead beams -> logp (U, Bc, F), edge (U, Bc, F)
    with -inf / -1 where there is no child.
    """
    n = node.clamp(min=0)
    start = trie.child_ptr[n]  # (U, Bc)
    deg = torch.where(node >= 0, trie.child_ptr[n + 1] - start, torch.zeros_like(start))
    j = torch.arange(width, device=node.device)
    valid = j < deg[..., None]  # (U, Bc, F)
    edge = (start[..., None] + j).clamp(max=max(trie.child_token.shape[0] - 1, 0))
    tok = trie.child_token[edge]  # (U, Bc, F)
    neg_inf = torch.tensor(float("-inf"), device=logits.device)
    if scoring == "after":
        logp = torch.log_softmax(logits, dim=-1).gather(-1, tok)
    else:
        z = torch.where(valid, logits.gather(-1, tok), neg_inf)
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        logp = z - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    logp = torch.where(valid, logp, neg_inf)
    return logp, torch.where(valid, edge, torch.full_like(edge, -1))


def _max_fanout(trie: ItemTrie, node: torch.Tensor) -> torch.Tensor:
    """Largest number of children among `node` (-1 entries count 0), as a 0-d device tensor."""
    n = node.clamp(min=0)
    deg = torch.where(node >= 0, trie.child_ptr[n + 1] - trie.child_ptr[n], 0)
    return deg.max() if deg.numel() else torch.zeros((), dtype=torch.int64, device=node.device)


def _topk_stable(x: torch.Tensor, k: int):
    """Top-k along the last dim, ordered by (value desc, index asc) within the selection."""
    val, idx = x.topk(k, dim=-1)
    order = torch.argsort(idx, dim=-1, stable=True)
    val, idx = val.gather(-1, order), idx.gather(-1, order)
    order = torch.argsort(val, dim=-1, descending=True, stable=True)
    return val.gather(-1, order), idx.gather(-1, order)


def _sort_results(leaf_item, scores):
    """Sort (U, K) results by score desc, then item id asc; -1 / -inf padding last."""
    key_id = torch.where(leaf_item >= 0, leaf_item, torch.full_like(leaf_item, 2**62))
    o1 = torch.argsort(key_id, dim=-1, stable=True)
    leaf_item, scores = leaf_item.gather(-1, o1), scores.gather(-1, o1)
    o2 = torch.argsort(scores, dim=-1, descending=True, stable=True)
    return DecodeResult(leaf_item.gather(-1, o2), scores.gather(-1, o2).float())


# ---------------------------------------------------------------------------------- beam search
@torch.no_grad()
def beam_search(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    trie: ItemTrie,
    beam_width: int = 10,
    scoring: str = "before",
    length_penalty: float = 0.0,
    kv_sharing: str = "tree",
) -> DecodeResult:
    """Trie-constrained beam search with Hugging Face semantics, batched over users and beams.

    Per step t (beams at trie depth t): candidates are (beam, child) pairs with cumulative score
    s + log p; the top 2B are taken; EOS candidates ranked within the top B enter the finished
    pool with score s / (t + 1) ** alpha; the top B non-EOS candidates stay live. A user stops
    when the pool holds B items and its best live score / (t + 1) ** alpha <= the pool's worst
    (Hugging Face's `early_stopping=False` test; exact for alpha = 0), or when no beam is live.

    Each prompt is prefilled once and its KV cache expanded to the beams after the first step;
    one host synchronisation per step (which users are done).

    Args:
        model: a Hugging Face causal LM.
        input_ids, attention_mask: (U, P) left-padded prompts.
        trie: the catalogue; moved to the model's device.
        beam_width: B >= 1.
        scoring: "before" or "after" (see the module docstring).
        length_penalty: alpha.
        kv_sharing: how the beams share their user's prompt cache. "tree" (default): one cache
            row per user, beam tokens appended with a custom 4-D attention mask (tree attention;
            needs an attention implementation that honours 4-D masks, as HF's sdpa and eager do).
            "copy": the cache is expanded to one row per beam and reordered every step through
            `Cache.batch_select_indices` (works with any model whose cache can be reordered).

    Returns:
        DecodeResult with item_ids (U, B) canonical ids (-1 padding) and scores (U, B) float32.
    """
    mask = _check_inputs(model, input_ids, attention_mask, trie, scoring)
    if int(beam_width) != beam_width or beam_width < 1:
        raise ValueError(f"beam_width must be an integer >= 1, got {beam_width}")
    B, alpha = int(beam_width), float(length_penalty)
    device = input_ids.device
    trie = trie.to(device)
    eos = trie.eos_token_id
    U = input_ids.shape[0]
    neg_inf = float("-inf")

    if kv_sharing not in ("tree", "copy"):
        raise ValueError(f"kv_sharing must be 'tree' or 'copy', got {kv_sharing!r}")
    tree = kv_sharing == "tree"
    if tree:
        _check_tree_attention(model)
    batch = (_TreeBatch if tree else _Batch)(model, input_ids, mask)
    out_leaf = torch.full((U, B), -1, dtype=torch.int64, device=device)
    out_score = torch.full((U, B), neg_inf, device=device)
    users = torch.arange(U, device=device)  # global index of each active user
    node = torch.zeros(U, 1, dtype=torch.int64, device=device)  # (Ua, Bc) beams at the root
    score = torch.zeros(U, 1, device=device)  # (Ua, Bc)
    pool_leaf = torch.full((U, B), -1, dtype=torch.int64, device=device)  # (Ua, B)
    pool_score = torch.full((U, B), neg_inf, device=device)  # (Ua, B)
    logits = batch.logits
    rank = torch.arange(2 * B, device=device)
    width = trie.depth_fanout_list[0]  # the root's fan-out
    for t in range(trie.max_len + 2):
        Ua, Bc = node.shape
        logp, edge = _child_logprobs(trie, logits.view(Ua, Bc, -1), node, width, scoring)
        cand = (score[..., None] + logp).view(Ua, Bc * width)  # (Ua, Bc*F)
        k2 = min(2 * B, Bc * width)
        top, idx = _topk_stable(cand, k2)  # (Ua, k2) best first
        e = edge.view(Ua, -1).gather(1, idx)
        ok = torch.isfinite(top)
        tok = trie.child_token[e.clamp(min=0)]
        child = trie.child_node[e.clamp(min=0)]
        is_eos = ok & (tok == eos)

        # Finished pool: EOS candidates within the top B, length-penalised, merged, best B kept.
        fin = is_eos & (rank[:k2] < B)
        fin_score = torch.where(fin, top / _log_penalty(t + 1, alpha), neg_inf)
        merged_score = torch.cat([pool_score, fin_score], dim=1)
        merged_leaf = torch.cat([pool_leaf, torch.where(fin, child, -1)], dim=1)
        pool_score, pi = _topk_stable(merged_score, B)
        pool_leaf = merged_leaf.gather(1, pi)

        # Live beams: the best B non-EOS candidates (already in rank order).
        live_key = torch.where(ok & ~is_eos, top, neg_inf)
        nb = min(B, k2)
        score, li = _topk_stable(live_key, nb)  # (Ua, nb)
        alive = torch.isfinite(score)
        node = torch.where(alive, child.gather(1, li), -1)
        next_tok = torch.where(alive, tok.gather(1, li), eos)
        src = idx.gather(1, li) // width  # (Ua, nb) beam each live candidate extends

        # Stopping: pool full and no live beam can beat its worst member, or nothing live.
        best_live = score[:, 0] / _log_penalty(t + 1, alpha)
        full = torch.isfinite(pool_score[:, -1])
        done = ~alive[:, 0] | (full & ~(best_live > pool_score[:, -1]))
        # The one host synchronisation of this step: which users are done, and the largest
        # fan-out among the live beams' nodes (the candidate width of the next step).
        host = torch.cat([done.long(), _max_fanout(trie, node).view(1)]).cpu()
        done_host, width = host[:-1].bool(), max(int(host[-1]), 1)
        if bool(done_host.any()):
            d = done_host.nonzero().view(-1).to(device)
            out_leaf[users[d]] = pool_leaf[d]
            out_score[users[d]] = pool_score[d]
        if bool(done_host.all()):
            break
        keep = (~done_host).nonzero().view(-1).to(device)
        users, node, score, pool_leaf, pool_score = (
            users[keep],
            node[keep],
            score[keep],
            pool_leaf[keep],
            pool_score[keep],
        )
        if tree:
            if keep.shape[0] < Ua:
                batch.select_users(keep)
            logits = batch.step(src[keep], next_tok[keep])
        else:
            rows = (keep[:, None] * Bc + src[keep]).view(-1)  # cache rows of the new beams
            logits = batch.step(rows, next_tok[keep].reshape(-1))
    else:  # pragma: no cover - the trie has no node deeper than max_len + 1
        raise RuntimeError("beam search ran past the deepest trie node")
    return _sort_results(_leaf_to_item(trie, out_leaf), out_score)


def _leaf_to_item(trie, leaf):
    return torch.where(leaf >= 0, trie.leaf_item[leaf.clamp(min=0)], -1)


@torch.no_grad()
def beam_thresholds(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    trie: ItemTrie,
    beam_width: int = 10,
    scoring: str = "before",
) -> torch.Tensor:
    """θ_t of SPEC §6: the B-th best candidate score among the children of the step-t beam.

    The beam is the unconstrained (target-free) constrained beam search: at step t every child of
    every live beam is a candidate of score s + log p (no length penalty); θ_t is the B-th best;
    the best B non-EOS candidates form the next beam.

    Returns:
        (U, L_max + 1) float32; -inf where fewer than B candidates exist.
    """
    mask = _check_inputs(model, input_ids, attention_mask, trie, scoring)
    if int(beam_width) != beam_width or beam_width < 1:
        raise ValueError(f"beam_width must be an integer >= 1, got {beam_width}")
    B = int(beam_width)
    device = input_ids.device
    trie = trie.to(device)
    U = input_ids.shape[0]
    theta = torch.full((U, trie.max_len + 1), float("-inf"), device=device)
    _check_tree_attention(model)
    batch = _TreeBatch(model, input_ids, mask)
    node = torch.zeros(U, 1, dtype=torch.int64, device=device)
    score = torch.zeros(U, 1, device=device)
    logits = batch.logits
    width = trie.depth_fanout_list[0]
    for t in range(trie.max_len + 1):
        Bc = node.shape[1]
        logp, edge = _child_logprobs(trie, logits.view(U, Bc, -1), node, width, scoring)
        cand = (score[..., None] + logp).view(U, Bc * width)
        k2 = min(2 * B, Bc * width)
        top, idx = _topk_stable(cand, k2)  # (U, k2) as beam_search: the live beam comes from it
        if k2 >= B:
            theta[:, t] = top[:, B - 1]
        e = edge.view(U, -1).gather(1, idx)
        tok = trie.child_token[e.clamp(min=0)]
        live_key = torch.where(torch.isfinite(top) & (tok != trie.eos_token_id), top, -torch.inf)
        score, li = _topk_stable(live_key, min(B, k2))
        alive = torch.isfinite(score)
        node = torch.where(alive, trie.child_node[e.gather(1, li).clamp(min=0)], -1)
        src = idx.gather(1, li) // width  # (U, nb) beam each live candidate extends
        width = int(_max_fanout(trie, node))  # one host synchronisation per step
        if width == 0 or t == trie.max_len:
            break
        logits = batch.step(src, torch.where(alive, tok.gather(1, li), trie.eos_token_id))
    return theta


# ---------------------------------------------------------------------------------- teacher forcing
def _continuation_logits(model, input_ids, mask, rows, cont):
    """Logits for prompt `rows` followed by right-padded continuations.

    cont (R, T) int64 with -1 padding -> (R, T + 1, V) float32, where [r, j] predicts token j of
    the continuation (j = 0 from the prompt's last position). Chunked to bound memory.
    """
    R, T = cont.shape
    P = input_ids.shape[1]
    V = _model_vocab(model) or 1
    chunk = max(1, _ROW_BUDGET // max(1, (P + T) * V))
    outs = []
    for s in range(0, R, chunk):
        r = rows[s : s + chunk]
        c = cont[s : s + chunk]
        ids = torch.cat([input_ids[r], c.clamp(min=0)], dim=1)
        m = torch.cat([mask[r], (c >= 0).to(mask.dtype)], dim=1)
        pos = (m.cumsum(-1) - 1).masked_fill(m == 0, 0)
        logits = model(input_ids=ids, attention_mask=m, position_ids=pos, use_cache=False).logits
        outs.append(logits[:, P - 1 :].float())
    return torch.cat(outs, dim=0)


class _PromptCache:
    """Prompts prefilled once; continuations are run on copies of the prompt rows' KV cache."""

    ROWS = 64  # continuations per forward pass (bounds the copied cache)

    def __init__(self, model, input_ids, mask):
        self.model, self.mask = model, mask
        self.cache_kw = _cache_kwarg(model)
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        out = _prefill(model, input_ids, mask, pos)
        self.cache = _output_cache(out)
        self.last_pos = pos[:, -1]  # (U,)
        self.logits = out.logits[:, -1].float()  # (U, V) next-token logits at the root

    def next_logits(self, rows, prefix, length):
        """Next-token logits after prompt `rows` (R,) + `prefix` (R, D), -1 padded on the right,
        `length` (R,) >= 1 real tokens each -> (R, V)."""
        outs = []
        for s in range(0, rows.shape[0], self.ROWS):
            r, c, n = rows[s : s + self.ROWS], prefix[s : s + self.ROWS], length[s : s + self.ROWS]
            cache = copy.deepcopy(self.cache)
            cache.batch_select_indices(r)  # public API: keep (and repeat) the prompt rows
            m = torch.cat([self.mask[r], (c >= 0).to(self.mask.dtype)], dim=1)
            pos = self.last_pos[r, None] + 1 + torch.arange(c.shape[1], device=c.device)
            out = self.model(
                input_ids=c.clamp(min=0),
                attention_mask=m,
                position_ids=pos,
                use_cache=True,
                **{self.cache_kw: cache},
            )
            outs.append(out.logits[torch.arange(c.shape[0], device=c.device), n - 1].float())
        return torch.cat(outs, dim=0)


def _step_logprobs(trie, logits, nodes, targets, scoring):
    """log p of `targets` (N,) under `scoring` given logits (N, V) and trie nodes (N,)."""
    if scoring == "after":
        logp = torch.log_softmax(logits, dim=-1)
    else:
        allowed = trie.children_dense(nodes)  # (N, V)
        logp = torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    return logp.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1)


@torch.no_grad()
def score_items(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    trie: ItemTrie,
    item_ids: torch.Tensor,
    scoring: str = "before",
) -> torch.Tensor:
    """Teacher-forced item scores: sum_t log p(y_t | x, y_<t), EOS included (no length penalty).

    Args:
        item_ids: (U, M) item ids (any id of a leaf; identical titles score identically).

    Returns:
        (U, M) float32.
    """
    mask = _check_inputs(model, input_ids, attention_mask, trie, scoring)
    device = input_ids.device
    trie = trie.to(device)
    item_ids = torch.as_tensor(item_ids, dtype=torch.int64, device=device)
    if item_ids.dim() != 2 or item_ids.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"item_ids must be (U, M) with U={input_ids.shape[0]}, got {tuple(item_ids.shape)}"
        )
    U, M = item_ids.shape
    flat = item_ids.reshape(-1)
    targets = trie.item_tokens(flat)  # (R, L+1), -100 padded
    nodes = trie.path_nodes(flat)  # (R, L+1), -1 padded
    valid = targets != -100
    rows = torch.arange(U, device=device).repeat_interleave(M)
    cont = torch.where(valid[:, :-1], targets[:, :-1], -1)  # inputs: all tokens but the last
    logits = _continuation_logits(model, input_ids, mask, rows, cont)  # (R, L+1, V)
    lp = _step_logprobs(
        trie, logits.reshape(-1, logits.shape[-1]), nodes.reshape(-1), targets.reshape(-1), scoring
    ).view_as(targets)
    return torch.where(valid, lp, 0.0).sum(-1).view(U, M).float()


# ---------------------------------------------------------------------------------- exact top-K
def _prefix_tokens(trie, nodes):
    """Tokens from the root to each node: (R,) -> (R, D) left-aligned, -1 padded."""
    depth = trie.node_depth[nodes]
    D = int(depth.max()) if nodes.numel() else 0
    out = torch.full((nodes.shape[0], max(D, 1)), -1, dtype=torch.int64, device=nodes.device)
    rows = torch.arange(nodes.shape[0], device=nodes.device)
    cur = nodes
    for _ in range(D):
        d = trie.node_depth[cur]
        live = d > 0
        out[rows[live], d[live] - 1] = trie.node_token[cur[live]]
        cur = torch.where(live, trie.node_parent[cur].clamp(min=0), cur)
    return out, depth


@torch.no_grad()
def exact_topk(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    trie: ItemTrie,
    k: int = 10,
    scoring: str = "before",
    expand_per_round: int = 16,
) -> DecodeResult:
    """The k best items by full score (α = 0), by best-first search over the trie.

    Scores only fall along a trie path (each step adds log p <= 0), so when the best frontier
    prefix is a leaf no other item can beat it: leaves popped in order are exact. Each round pops
    the `expand_per_round` best frontier entries of every user; the leading leaves are emitted and
    the inner nodes among them are expanded with batched forward passes of their prefixes on
    copies of the prompts' KV cache (each prompt is prefilled once).

    Returns:
        DecodeResult with item_ids (U, k) and scores (U, k) as beam_search.
    """
    mask = _check_inputs(model, input_ids, attention_mask, trie, scoring)
    if int(k) != k or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k}")
    device = input_ids.device
    trie = trie.to(device)
    U, k, P = input_ids.shape[0], int(k), max(1, int(expand_per_round))
    neg_inf = float("-inf")
    # The prompts are prefilled once; the root's children form the first frontier (U, C).
    prompts = _PromptCache(model, input_ids, mask)
    width = trie.depth_fanout_list[0]
    root = torch.zeros(U, 1, dtype=torch.int64, device=device)
    logp, edge = _child_logprobs(trie, prompts.logits[:, None], root, width, scoring)
    f_score = logp[:, 0]  # (U, F)
    f_node = torch.where(edge[:, 0] >= 0, trie.child_node[edge[:, 0].clamp(min=0)], -1)
    res_leaf = torch.full((U, k + 1), -1, dtype=torch.int64, device=device)  # +1: overflow slot
    res_score = torch.full((U, k + 1), neg_inf, device=device)
    found = torch.zeros(U, dtype=torch.int64, device=device)
    users = torch.arange(U, device=device)
    while True:
        p = min(P, f_score.shape[1])
        s, i = _topk_stable(f_score, p)  # (U, p)
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
        removed = emit | expand
        f_score = f_score.scatter(1, i, torch.where(removed, neg_inf, s))
        open_users = (found < k) & torch.isfinite(f_score).any(1)
        exp_u, exp_c = expand.nonzero(as_tuple=True)
        if exp_u.numel() == 0:
            if not bool(open_users.any()):
                break
            continue
        exp_node, exp_score = nd[exp_u, exp_c], s[exp_u, exp_c]
        prefix, depth = _prefix_tokens(trie, exp_node)  # depth >= 1: the root is done
        logits = prompts.next_logits(users[exp_u], prefix, depth)  # (R, V)
        width = int((trie.child_ptr[exp_node + 1] - trie.child_ptr[exp_node]).max())
        logp, edge = _child_logprobs(trie, logits[:, None], exp_node[:, None], width, scoring)
        new_score = (exp_score[:, None] + logp[:, 0]).reshape(-1)  # (R*F,)
        new_node = trie.child_node[edge[:, 0].clamp(min=0)].reshape(-1)
        new_user = exp_u[:, None].expand(-1, width).reshape(-1)
        # Rebuild the frontier: the finite old entries plus the new children, packed per user.
        old_u, old_c = torch.isfinite(f_score).nonzero(as_tuple=True)
        keep_new = torch.isfinite(new_score)
        all_u = torch.cat([old_u, new_user[keep_new]])
        all_s = torch.cat([f_score[old_u, old_c], new_score[keep_new]])
        all_n = torch.cat([f_node[old_u, old_c], new_node[keep_new]])
        order = torch.argsort(all_u, stable=True)
        all_u, all_s, all_n = all_u[order], all_s[order], all_n[order]
        counts = torch.bincount(all_u, minlength=U)
        col = torch.arange(all_u.shape[0], device=device) - (counts.cumsum(0) - counts)[all_u]
        C = max(int(counts.max()), 1)
        f_score = torch.full((U, C), neg_inf, device=device)
        f_node = torch.full((U, C), -1, dtype=torch.int64, device=device)
        f_score[all_u, col] = all_s
        f_node[all_u, col] = all_n
    return _sort_results(_leaf_to_item(trie, res_leaf[:, :k]), res_score[:, :k])

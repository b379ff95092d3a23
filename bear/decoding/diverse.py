"""Diverse (group) beam search over the trie (Vijayakumar et al. 2018; Hugging Face's
``num_beam_groups``): the decoder ``diverse``.

The B beams form G groups of B/G. At each step the groups expand in turn; a candidate's score in
group g is lowered by ``diversity_penalty`` × the number of beams of the groups before g (this
user, this step) that chose the same token, so later groups are pushed off the tokens earlier
groups took. Each group is a beam search of width B/G with its own finished pool and stopping
test (``bear.decoding.pool.FinishedPool``, on the penalised scores, as Hugging Face's); the user
is done when every group is. The B items the groups finish are returned ranked by their own
score (the sum of their log-probabilities / length^α, without the penalty), as a recommender
ranks them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bear.decoding.beam_cache import TreeKVCache
from bear.decoding.common import (
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
from bear.decoding.pool import FinishedPool, length_penalty_factor
from bear.decoding.registry import register_decoder
from bear.trie import ItemTrie

__all__ = ["DiverseBeamSearch", "diverse_beam_search"]


def _expand_group(trie, logits, node, pen, true, width, beams, scoring, counts, penalty):
    """One group's step: candidates (beam, child) scored s + log p - penalty · counts[token]; the
    top 2·beams; the best ``beams`` non-EOS become the next beams. Returns (top (U, k2)
    penalised, top_true (U, k2), child (U, k2), is_eos (U, k2), next node / pen / true / token /
    src (U, nb), nan (U,))."""
    U, Bc = node.shape
    logp, edge = child_logprobs(trie, logits.view(U, Bc, -1), node, width, scoring)
    tok = trie.child_token[edge.clamp(min=0)]  # (U, Bc, F)
    seen = counts.gather(1, tok.view(U, -1)).view_as(logp).to(logp.dtype)  # earlier groups' picks
    cand = (pen[..., None] + logp - penalty * seen).view(U, -1)  # (U, Bc·F)
    cand_true = (true[..., None] + logp).view(U, -1)
    k2 = min(2 * beams, cand.shape[1])
    top, idx = topk_stable(cand, k2)
    e = edge.view(U, -1).gather(1, idx).clamp(min=0).long()
    token, child = trie.child_token[e].long(), e + 1
    ok = torch.isfinite(top)
    is_eos = ok & (token == trie.eos_token_id)
    live, li = topk_stable(torch.where(ok & ~is_eos, top, float("-inf")), min(beams, k2))
    alive = torch.isfinite(live)
    nxt = (
        torch.where(alive, child.gather(1, li), -1),
        torch.where(alive, live, float("-inf")),
        torch.where(alive, cand_true.gather(1, idx).gather(1, li), float("-inf")),
        torch.where(alive, token.gather(1, li), trie.eos_token_id),
        idx.gather(1, li) // width,
    )
    return top, cand_true.gather(1, idx), child, is_eos, nxt, torch.isnan(cand).any(1)


@torch.no_grad()
def diverse_beam_search(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    trie: ItemTrie,
    beam_width: int = 10,
    groups: int = 2,
    diversity_penalty: float = 0.5,
    scoring: str = "before",
    length_penalty: float = 0.0,
    prompt=None,
):
    """Trie-constrained diverse beam search (module docstring), batched over users and beams.

    Args:
        model, input_ids, attention_mask, trie, scoring, length_penalty, prompt: as
            ``beam_search`` (the beams share each prompt's cache through tree attention).
        beam_width: B, a multiple of ``groups``.
        groups: G >= 1 (G = 1: beam search, up to its skipping of beams that cannot matter).
        diversity_penalty: >= 0, subtracted per earlier-group beam on the same token.

    Returns:
        DecodeResult with item_ids (U, B) and their scores (U, B), best first.

    Raises:
        As ``beam_search``, and ValueError for G not dividing B or a negative penalty.
    """
    mask = check_inputs(model, input_ids, attention_mask, trie, scoring)
    B = check_positive_int("beam_width", beam_width)
    G = check_positive_int("groups", groups)
    alpha = check_finite_float("length_penalty", length_penalty)
    penalty = check_finite_float("diversity_penalty", diversity_penalty)
    if B % G or penalty < 0:
        raise ValueError(
            f"groups={G}, diversity_penalty={penalty}: expected groups dividing beam_width={B} "
            "and a penalty >= 0"
        )
    device, U, Bg = input_ids.device, input_ids.shape[0], B // G
    trie = trie.to(device)
    kv = TreeKVCache(model, input_ids, mask, prompt)
    pools = [FinishedPool(U, Bg, alpha, device) for _ in range(G)]
    kept_true = [torch.full((U, Bg), float("-inf"), device=device) for _ in range(G)]
    root = torch.zeros(U, 1, dtype=torch.long, device=device)
    zero = torch.zeros(U, 1, device=device)
    beams = [(root, zero, zero) for _ in range(G)]  # (node, penalised, true): one root beam each
    done = torch.zeros(U, G, dtype=torch.bool, device=device)
    logits, width = kv.logits.repeat_interleave(G, dim=0), trie.depth_fanout_list[0]
    for t in range(trie.max_len + 2):
        counts = torch.zeros(U, trie.vocab_size, dtype=torch.long, device=device)
        per_beam = logits.view(U, -1, logits.shape[-1])
        offset, parts = 0, []
        for g in range(G):
            node, pen, true = beams[g]
            group = per_beam[:, offset : offset + node.shape[1]].reshape(-1, per_beam.shape[-1])
            top, top_true, child, is_eos, nxt, nan = _expand_group(
                trie, group, node, pen, true, width, Bg, scoring, counts, penalty
            )
            check_no_nan_scores(nan.cpu())
            fin_true = torch.where(is_eos, top_true, float("-inf"))
            _merge(pools[g], kept_true, g, top, child, is_eos & ~done[:, g, None], fin_true, t)
            node, pen, true, token, src = nxt
            done[:, g] |= pools[g].done(torch.where(done[:, g], float("-inf"), pen[:, 0]), t)
            node = torch.where(done[:, g, None], -1, node)
            counts.scatter_add_(1, token, (node >= 0).long())
            parents = src + offset if t > 0 else src  # step 0: every group's parent is the prompt
            parts.append((node, pen, true, token, parents))
            offset += beams[g][0].shape[1]
            beams[g] = (node, pen, true)
        width = max(int(max_fanout(trie, torch.cat([p[0] for p in parts], 1))), 1)
        if bool(done.all()):
            break
        src = torch.cat([p[4] for p in parts], 1)
        tokens = torch.cat([p[3] for p in parts], 1)
        logits = kv.step(src, tokens)
    leaves = torch.cat([p.leaf for p in pools], 1)  # (U, B)
    scores = torch.cat(kept_true, 1)
    # groups may finish the same item: keep it once
    repeat = (leaves[:, :, None] == leaves[:, None, :]).tril(diagonal=-1).any(2) & (leaves >= 0)
    return ranked_result(
        trie, torch.where(repeat, -1, leaves), torch.where(repeat, float("-inf"), scores)
    )


def _merge(pool, kept_true, g, top, child, fin, fin_true, t) -> None:
    """Merge a group's finished candidates into its pool, carrying their unpenalised scores
    (length-penalised) into ``kept_true[g]`` in the pool's order."""
    alpha = pool.alpha
    before = pool.leaf.clone()
    pool.add(top, child, fin, t)
    factor = length_penalty_factor(t + 1, alpha)
    leaf_true = torch.cat([before, torch.where(fin, child, -1)], 1)
    true_scores = torch.cat([kept_true[g], fin_true / factor], 1)
    # the pool's leaves are distinct trie leaves: look each one's unpenalised score up
    match = (pool.leaf[:, :, None] == leaf_true[:, None, :]) & (pool.leaf[:, :, None] >= 0)
    picked = torch.where(match, true_scores[:, None, :], float("-inf")).max(2).values
    kept_true[g] = torch.where(pool.leaf >= 0, picked, float("-inf"))


@register_decoder
@dataclass(frozen=True)
class DiverseBeamSearch(Decoder):
    """``diverse_beam_search`` as the evaluation's decoder ``diverse``: options ``groups`` G
    (dividing the width) and ``diversity_penalty``."""

    name: ClassVar[str] = "diverse"
    groups: int = 2
    diversity_penalty: float = 0.5

    def decode(
        self, model, input_ids, attention_mask, trie, width, scoring, length_penalty, prompt=None
    ):
        return diverse_beam_search(
            model,
            input_ids,
            attention_mask,
            trie,
            width,
            groups=self.groups,
            diversity_penalty=self.diversity_penalty,
            scoring=scoring,
            length_penalty=length_penalty,
            prompt=prompt,
        )

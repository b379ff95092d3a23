"""Where each decoded batch puts its targets (SPEC §5): the decoder's rank, the exact rank by
full score behind PR@K, the margins behind the violation share, and the items a user's own
history rules out (``--exclude-history``).

``evaluate_split`` (``bear.evaluate``) runs these per batch of prompts, after one prefill.
(``bear.metrics.target_ranks`` turns a list into ranks.)
"""

from __future__ import annotations

import torch

from bear.decoding.best_first import exact_topk
from bear.decoding.common import DecodeResult
from bear.decoding.count_above import count_items_above
from bear.decoding.teacher_forcing import item_logits
from bear.items import IGNORE_INDEX
from bear.metrics import UNDECIDED, target_ranks
from bear.model import autocast_for
from bear_kernels import ce_margin

__all__ = ["EXACT_K", "SCORE_TOLERANCE", "drop_items", "exact_ranks", "target_terms"]

EXACT_K = 10  # exact top-K depth: PR@5 and PR@10 need the exact top-10 (SPEC §5)
SCORE_TOLERANCE = 1e-3  # decoder scores vs teacher-forced sums: float noise well below this


def drop_items(found: DecodeResult, excluded: torch.Tensor) -> DecodeResult:
    """``found`` without the items of ``excluded`` (U, H) canonical ids (-1: none), the others
    kept in order and moved up; -1 / -inf padding at the end."""
    item_ids, scores = found.item_ids, found.scores  # (U, B)
    gone = ((item_ids[:, :, None] == excluded[:, None, :]) & (item_ids[:, :, None] >= 0)).any(2)
    order = torch.argsort(gone.long(), dim=1, stable=True)  # kept first, in their order
    kept_ids = torch.where(gone, -1, item_ids).gather(1, order)
    kept_scores = torch.where(gone, float("-inf"), scores).gather(1, order)
    return DecodeResult(kept_ids, kept_scores, found.complete)


def _full_scores(found: DecodeResult, trie, length_penalty: float) -> torch.Tensor:
    """(U, B) the decoded items' scores at α = 0 (sums of log-probabilities): score · length^α,
    length = the item's tokens including EOS; -inf where padded."""
    scores = found.scores.float()  # (U, B)
    if length_penalty == 0:
        return scores
    tokens = trie.item_tokens(found.item_ids.clamp(min=0).reshape(-1))  # (U·B, L + 1)
    lengths = (tokens != IGNORE_INDEX).sum(1).reshape(scores.shape).to(scores.dtype)  # (U, B)
    return torch.where(torch.isfinite(scores), scores * lengths**length_penalty, scores)


def target_terms(model, prompt, trie, batch, width: int, scorings: tuple[str, ...]):
    """Teacher-forced target terms of a batch from its prompts' cache: (depth (U,) int64, the
    position in the title of the first counted token whose Δ > 0 at width B over its trie
    children, -1 where none is (the necessary condition (3.2) holds); {scoring: s_y (U,)} the
    target's score at α = 0 under each scoring)."""
    with autocast_for(trie.device):
        logits, target, nodes = item_logits(model, prompt, trie, batch.items)  # (U, W, V)
    U, W, V = logits.shape
    mask = trie.allowed_mask(nodes.reshape(-1))  # (U·W, words)
    target = target.reshape(-1)  # (U·W,)
    flat = logits.reshape(U * W, V)
    ce, margin, counted = ce_margin(flat, target, width, allowed_mask=mask, return_counted=True)
    bad = ((margin > 0) & counted).reshape(U, W)  # (U, W)
    depth = torch.where(bad.any(1), bad.long().argmax(1), -1)
    scores = {}
    for scoring in scorings:
        if scoring == "after":  # full-vocabulary log-probabilities, restricted to the trie
            ce, _ = ce_margin(flat, target, beam_width=width)
        scores[scoring] = -ce.reshape(U, W).sum(1)
    return depth, scores


def exact_ranks(model, prompt, trie, batch, found, target, settings, excluded, exact_all):
    """(U,) each target's rank in the exact top-``EXACT_K`` by full score among the items not in
    ``excluded`` (U, H), -1 outside it (or when the target itself is excluded), UNDECIDED where
    the budget left it open (``evaluate_split``'s docstring).

    ``found``: the decoder's list (excluded items dropped); ``target``: (canonical ids (U,), s_y
    (U,) the teacher-forced scores); ``settings``: an ``EvalSettings`` (its ``scoring`` is the
    one s_y and the search use)."""
    canon, s_y = target
    beats = _full_scores(found, trie, settings.length_penalty) > s_y[:, None] + SCORE_TOLERANCE
    above = (beats & (found.item_ids != canon[:, None])).sum(1)  # (U,)
    out = (excluded == canon[:, None]).any(1)  # (U,) a target the user's history rules out
    need = ~out & (torch.ones_like(out) if exact_all else above < EXACT_K)
    ranks = torch.full((canon.shape[0],), -1, dtype=torch.long)
    rows = need.nonzero().flatten()
    if not rows.numel():
        return ranks
    prompts = (batch.prompt_ids[rows], batch.prompt_mask[rows])
    if exact_all:  # the best items in order (excluded ones dropped), the target's rank among them
        k = EXACT_K + excluded.shape[1]
        with autocast_for(trie.device):
            exact = exact_topk(model, *prompts, trie, k=k, scoring=settings.scoring)
        kept = drop_items(exact, excluded[rows]).item_ids[:, :EXACT_K]
        ranks[rows.cpu()] = target_ranks(kept, canon[rows]).cpu()
        return ranks
    seen = torch.where(beats, found.item_ids, -1)[rows]  # (R, B) not counted again
    with autocast_for(trie.device):
        count, complete = count_items_above(
            model,
            *prompts,
            trie,
            s_y[rows] + SCORE_TOLERANCE,
            k=EXACT_K - above[rows],
            scoring=settings.scoring,
            exclude=torch.cat([canon[rows, None], seen, excluded[rows]], 1),
            max_expansions=settings.exact_budget,
            prompt=prompt.select(rows),
        )
    rank = above[rows] + count
    found_rank = torch.where(rank < EXACT_K, rank, -1)
    ranks[rows.cpu()] = torch.where(complete, found_rank, UNDECIDED).cpu()
    return ranks

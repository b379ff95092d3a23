"""count_items_above on a tiny random Llama: brute force, budgets, depth-first reach, bad input."""

from __future__ import annotations

import pytest
import torch

from bear.decoding import exact_topk, score_items
from bear.decoding.count_above import count_items_above
from bear.trie import ItemTrie
from tests._helpers_decoding import (
    EOS,
    FIRST_TOKEN,
    ITEM_TOKENS,
    VOCAB,
    build,
    prompts,
    tiny_model,
)

LENGTHS = (7, 4, 9)


@pytest.fixture(scope="module")
def setup():
    model = tiny_model()
    seqs, ids, trie = build()
    input_ids, mask = prompts(LENGTHS)
    canon = torch.unique(trie.canonical(torch.tensor(ids)))
    return model, trie, input_ids, mask, canon


def all_scores(setup, scoring):
    model, trie, input_ids, mask, canon = setup
    return score_items(model, input_ids, mask, trie, canon.expand(input_ids.shape[0], -1), scoring)


def fed_tokens(model):
    """A list that collects the tokens of every forward pass (the prefill first)."""
    fed = []
    hook = model.register_forward_hook(
        lambda _m, _a, kw, _o: fed.append(kw["input_ids"].numel()), with_kwargs=True
    )
    return fed, hook


@pytest.mark.parametrize("scoring", ["before", "after"])
@pytest.mark.parametrize("per_round", [1, 3, 64, None])
def test_count_equals_brute_force(setup, scoring, per_round):
    """For thresholds between the items' scores, with and without an excluded item, the count is
    min(k, items other than the excluded one scoring above the threshold)."""
    model, trie, input_ids, mask, canon = setup
    scores = all_scores(setup, scoring)  # (U, n)
    ranked = scores.sort(1, descending=True).values
    U, n = scores.shape
    for j, k in [(0, 10), (3, 10), (6, 4), (n - 1, n), (n - 1, 10)]:
        threshold = ranked[:, j] - 1e-4  # item j sits just above it
        exclude = canon[scores.argmax(1)] if j % 2 else torch.full((U,), -1)
        got, complete = count_items_above(model, input_ids, mask, trie, threshold, k, scoring,
                                          exclude=exclude, expand_per_round=per_round)  # fmt: skip
        above = (scores > threshold[:, None]) & (canon[None] != exclude[:, None])
        assert torch.equal(got, above.sum(1).clamp(max=k)), (j, k)
        assert complete.all()


@pytest.mark.parametrize("scoring", ["before", "after"])
def test_count_leaves_out_known_items_with_k_per_user(setup, scoring):
    """exclude (U, E) with k lowered per user (how evaluation seeds the count with the beam's
    items): known + counted equals the count of a search that knew nothing, up to the full k."""
    model, trie, input_ids, mask, canon = setup
    scores = all_scores(setup, scoring)
    order = scores.argsort(1, descending=True)
    threshold = scores.gather(1, order[:, 7:8])[:, 0] - 1e-4  # 8 items above it
    known = torch.stack([order[:, 0], order[:, 3], order[:, 5]], 1)  # (U, 3) of those 8
    known[1, 2] = -1  # a padded entry
    k_known = (known >= 0).sum(1)
    full, _ = count_items_above(model, input_ids, mask, trie, threshold, 6, scoring)
    exclude = torch.where(known >= 0, canon[known.clamp(min=0)], -1)
    got, complete = count_items_above(model, input_ids, mask, trie, threshold, 6 - k_known,
                                      scoring, exclude=exclude)  # fmt: skip
    assert full.tolist() == [6] * 3 and complete.all()
    assert torch.equal(got, 6 - k_known)
    none_left = torch.zeros_like(k_known)  # k 0: nothing to count
    got, complete = count_items_above(model, input_ids, mask, trie, threshold, none_left, scoring)
    assert got.tolist() == [0] * 3 and complete.all()


def test_count_reaches_k_items_in_k_dives():
    """threshold -inf: every item is above it; one prefix a round, depth first, counts k items
    feeding at most k times the title length, where best-first order (exact_topk's) first
    expands every prefix scoring above the k-th best item: on equally long random titles under
    "after" scoring, most of the trie."""
    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    seqs = torch.randint(FIRST_TOKEN, ITEM_TOKENS, (40, 12), generator=g).tolist()
    trie = ItemTrie(seqs, list(range(40)), EOS, vocab_size=VOCAB)
    input_ids, mask = prompts(LENGTHS)
    U = input_ids.shape[0]
    fed, hook = fed_tokens(model)
    try:
        got, complete = count_items_above(model, input_ids, mask, trie, torch.full((U,), -1e30),
                                          3, "after", expand_per_round=1)  # fmt: skip
        depth_first = sum(fed[1:])
        fed.clear()
        exact_topk(model, input_ids, mask, trie, 3, "after", expand_per_round=1)
        best_first = sum(fed[1:])
    finally:
        hook.remove()
    assert got.tolist() == [3] * U and complete.all()
    assert depth_first <= U * 3 * 12 < best_first


def test_count_widens_its_rounds_when_few_users_are_left(setup):
    """expand_per_round None: one user alone expands up to PrefixKVCache.ROWS prefixes a round
    (4 per user while many are left); an explicit value is kept."""
    model, trie, input_ids, mask, canon = setup
    rows = []
    hook = model.register_forward_hook(
        lambda _m, _a, kw, _o: rows.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    one = (input_ids[:1], mask[:1], trie, torch.full((1,), -1e30), 40, "after")
    try:
        wide, _ = count_items_above(model, *one)
        widest = max(rows[1:])
        rows.clear()
        narrow, _ = count_items_above(model, *one, expand_per_round=4)
    finally:
        hook.remove()
    assert torch.equal(wide, narrow)
    assert widest > 4 and max(rows[1:]) <= 4


def test_count_budget_gives_a_lower_bound_and_says_so(setup):
    """max_expansions: at most that many prefix tokens fed per user; the count never exceeds the
    unbounded one, and complete says where it may be short; a budget not reached changes
    nothing."""
    model, trie, input_ids, mask, canon = setup
    U = input_ids.shape[0]
    threshold = all_scores(setup, "after").sort(1, descending=True).values[:, 8] - 1e-4
    full, _ = count_items_above(model, input_ids, mask, trie, threshold, 10, "after")
    roomy = count_items_above(model, input_ids, mask, trie, threshold, 10, "after",
                              max_expansions=10**6)  # fmt: skip
    assert torch.equal(roomy[0], full) and roomy[1].all()
    fed, hook = fed_tokens(model)
    short = 0
    try:
        for budget in (0, 3, 6, 12):
            fed.clear()
            got, complete = count_items_above(model, input_ids, mask, trie, threshold, 10,
                                              "after", max_expansions=budget)  # fmt: skip
            assert sum(fed[1:]) <= U * budget
            assert (got <= full).all()
            assert torch.equal(got[complete], full[complete])
            short += int((~complete).sum())
    finally:
        hook.remove()
    assert short > 0


def test_count_rejects_bad_input(setup):
    model, trie, input_ids, mask, canon = setup
    U = input_ids.shape[0]
    zeros = torch.zeros(U)
    with pytest.raises(ValueError, match="threshold"):
        count_items_above(model, input_ids, mask, trie, torch.zeros(U, 1))
    with pytest.raises(ValueError, match="threshold"):
        count_items_above(model, input_ids, mask, trie, torch.full((U,), torch.nan))
    with pytest.raises(ValueError, match="exclude"):
        count_items_above(model, input_ids, mask, trie, zeros, exclude=torch.zeros(U + 1))
    with pytest.raises(ValueError, match="k"):
        count_items_above(model, input_ids, mask, trie, zeros, k=0)
    with pytest.raises(ValueError, match="k"):
        count_items_above(model, input_ids, mask, trie, zeros, k=torch.full((U,), 2.0))
    with pytest.raises(ValueError, match="k"):
        count_items_above(model, input_ids, mask, trie, zeros, k=torch.tensor([1, -1, 1]))
    with pytest.raises(ValueError, match="max_expansions"):
        count_items_above(model, input_ids, mask, trie, zeros, max_expansions=-1)
    with pytest.raises(TypeError, match="max_expansions"):
        count_items_above(model, input_ids, mask, trie, zeros, max_expansions=2.5)

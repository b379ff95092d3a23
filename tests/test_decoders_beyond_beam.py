"""Decoders beyond beam search (issue: the paper's questions): diverse (group) beam search and
constrained sampling, on the decoder seam, against beam search and teacher forcing."""

from __future__ import annotations

import pytest
import torch
from _helpers_decoding import EOS, VOCAB, prompts, random_catalogue, tiny_model

from bear.decoding import beam_search, constrained_sampling, diverse_beam_search, score_items
from bear.decoding.registry import get_decoder
from bear.trie import ItemTrie


@pytest.fixture(scope="module")
def case():
    model = tiny_model()
    seqs, ids = random_catalogue(40)
    trie = ItemTrie(seqs, ids, EOS, vocab_size=VOCAB)
    input_ids, mask = prompts((5, 3, 7))
    return model, trie, input_ids, mask


def _check_list(model, trie, input_ids, mask, found, scoring):
    """Catalogue items, no repeats, best first, scores = teacher-forced scores (α = 0)."""
    items = found.item_ids
    for row in items.tolist():
        kept = [i for i in row if i >= 0]
        assert len(kept) == len(set(kept)) and kept == row[: len(kept)]
    assert (found.scores[:, :-1] >= found.scores[:, 1:]).all()
    ok = items >= 0
    rescored = score_items(model, input_ids, mask, trie, torch.where(ok, items, items[:, :1]),
                           scoring)  # fmt: skip
    torch.testing.assert_close(rescored[ok], found.scores[ok], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scoring", ["before", "after"])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_one_group_without_penalty_is_beam_search(case, scoring, alpha):
    model, trie, input_ids, mask = case
    want = beam_search(model, input_ids, mask, trie, 4, scoring, length_penalty=alpha)
    got = diverse_beam_search(model, input_ids, mask, trie, 4, groups=1, diversity_penalty=0.0,
                              scoring=scoring, length_penalty=alpha)  # fmt: skip
    assert torch.equal(got.item_ids, want.item_ids)
    torch.testing.assert_close(got.scores, want.scores)


@pytest.mark.parametrize("scoring", ["before", "after"])
def test_groups_without_penalty_repeat_one_search_and_repeats_are_dropped(case, scoring):
    """Two groups of 2 with no penalty run the same width-2 search: its 2 items, once each."""
    model, trie, input_ids, mask = case
    half = beam_search(model, input_ids, mask, trie, 2, scoring)
    got = diverse_beam_search(model, input_ids, mask, trie, 4, groups=2, diversity_penalty=0.0,
                              scoring=scoring)  # fmt: skip
    assert torch.equal(got.item_ids[:, :2], half.item_ids)
    assert (got.item_ids[:, 2:] == -1).all()


@pytest.mark.parametrize("scoring", ["before", "after"])
def test_diverse_and_sampled_lists_are_items_ranked_by_their_own_scores(case, scoring):
    model, trie, input_ids, mask = case
    diverse = diverse_beam_search(model, input_ids, mask, trie, 6, groups=3,
                                  diversity_penalty=1.5, scoring=scoring)  # fmt: skip
    _check_list(model, trie, input_ids, mask, diverse, scoring)
    sampled = constrained_sampling(model, input_ids, mask, trie, 6, samples=25, scoring=scoring)
    _check_list(model, trie, input_ids, mask, sampled, scoring)


def test_sampling_is_seeded_and_a_cold_sampler_is_greedy(case):
    model, trie, input_ids, mask = case
    a = constrained_sampling(model, input_ids, mask, trie, 5, samples=12, seed=3)
    b = constrained_sampling(model, input_ids, mask, trie, 5, samples=12, seed=3)
    assert torch.equal(a.item_ids, b.item_ids)
    greedy = beam_search(model, input_ids, mask, trie, 1, "before")
    for cold in ({"temperature": 1e-4}, {"top_p": 1e-6}):
        got = constrained_sampling(model, input_ids, mask, trie, 3, samples=4, **cold)
        assert torch.equal(got.item_ids[:, 0], greedy.item_ids[:, 0])
        assert (got.item_ids[:, 1:] == -1).all()  # every sample drew the greedy item


def test_bad_arguments_are_named(case):
    model, trie, input_ids, mask = case
    with pytest.raises(ValueError, match="groups=3.*dividing beam_width=4"):
        diverse_beam_search(model, input_ids, mask, trie, 4, groups=3)
    with pytest.raises(ValueError, match="temperature=0.0"):
        constrained_sampling(model, input_ids, mask, trie, 4, temperature=0.0)
    with pytest.raises(ValueError, match="top_p=1.5"):
        constrained_sampling(model, input_ids, mask, trie, 4, top_p=1.5)
    assert get_decoder("sample").from_options(["samples=8", "top_p=0.9"]).samples == 8
    assert get_decoder("diverse").from_options(["groups=5"]).groups == 5


@pytest.mark.parametrize("scoring", ["before", "after"])
def test_every_decoder_feeds_the_model_int64_token_ids(case, scoring):
    """The trie stores tokens as int32; what reaches the model's input_ids is int64 (as
    tokenizers give it), so no model or compiled graph meets a second dtype mid-search."""
    from bear.decoding import beam_thresholds, exact_topk

    model, trie, input_ids, mask = case
    seen = set()
    hook = model.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.add(kwargs.get("input_ids", args[0] if args else None).dtype),
        with_kwargs=True,
    )
    try:
        for kv in ("tree", "copy"):
            beam_search(model, input_ids, mask, trie, 4, scoring=scoring, kv_sharing=kv)
        beam_thresholds(model, input_ids, mask, trie, 4, scoring=scoring)
        exact_topk(model, input_ids, mask, trie, k=3, scoring=scoring)
        diverse_beam_search(model, input_ids, mask, trie, 4, groups=2, scoring=scoring)
        constrained_sampling(model, input_ids, mask, trie, 4, scoring=scoring, seed=0)
    finally:
        hook.remove()
    assert seen == {torch.int64}

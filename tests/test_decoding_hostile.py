"""Hostile inputs of decoding (SPEC §10): NaN models, bad widths and prompts, small tries, long
titles."""

from __future__ import annotations

import pytest
import torch

from bear.decoding import beam_search, beam_thresholds, exact_topk, score_items
from bear.trie import ItemTrie
from tests._helpers_decoding import (
    EOS,
    VOCAB,
    build,
    prompts,
    random_catalogue,
    tiny_model,
    with_shared_head,
)


@pytest.fixture(scope="module")
def setup():
    model = tiny_model()
    seqs, ids, trie = build()
    input_ids, mask = prompts((7, 4, 9))
    return model, seqs, ids, trie, input_ids, mask


@pytest.fixture(scope="module")
def nan_model():
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight[:, 0] = float("nan")  # every logit is NaN
    return model


@pytest.mark.parametrize("scoring", ["before", "after"])
@pytest.mark.parametrize("decoder", ["beam", "thresholds", "exact"])
def test_a_model_with_nan_scores_raises_instead_of_empty_rankings(setup, nan_model, scoring,
                                                                   decoder):  # fmt: skip
    _, _, _, trie, input_ids, mask = setup
    run = {
        "beam": lambda: beam_search(nan_model, input_ids, mask, trie, 3, scoring),
        "thresholds": lambda: beam_thresholds(nan_model, input_ids, mask, trie, 3, scoring),
        "exact": lambda: exact_topk(nan_model, input_ids, mask, trie, 3, scoring),
    }[decoder]
    with pytest.raises(ValueError, match=r"scores are NaN for users \[0, 1, 2\]"):
        run()


def test_nan_logits_outside_the_children_do_not_matter_when_scoring_before(setup):
    model, _, _, trie, input_ids, mask = setup
    hostile = tiny_model()
    with torch.no_grad():
        hostile.lm_head.weight[VOCAB - 1] = float("nan")  # a token no item uses
    for fn in (beam_search, exact_topk):
        want, got = fn(model, input_ids, mask, trie, 4), fn(hostile, input_ids, mask, trie, 4)
        assert torch.equal(got.item_ids, want.item_ids)
        torch.testing.assert_close(got.scores, want.scores)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"beam_width": True}, TypeError, "beam_width must be an integer >= 1, got the bool"),
        ({"beam_width": 2.0}, TypeError, "beam_width must be an integer"),
        ({"length_penalty": float("nan")}, ValueError, "length_penalty must be a finite"),
        ({"length_penalty": float("-inf")}, ValueError, "length_penalty must be a finite"),
        ({"length_penalty": True}, TypeError, "length_penalty must be a finite"),
    ],
)
def test_beam_search_rejects_bad_widths_and_penalties(setup, kwargs, error, match):
    model, _, _, trie, input_ids, mask = setup
    with pytest.raises(error, match=match):
        beam_search(model, input_ids, mask, trie, **({"beam_width": 3} | kwargs))


def test_exact_topk_rejects_a_bool_k(setup):
    model, _, _, trie, input_ids, mask = setup
    with pytest.raises(TypeError, match="k must be an integer >= 1, got the bool"):
        exact_topk(model, input_ids, mask, trie, k=True)


@pytest.mark.parametrize("decoder", ["beam", "exact", "score"])
def test_prompts_with_bad_token_ids_raise_naming_input_ids(setup, decoder):
    model, _, ids, trie, input_ids, mask = setup
    run = {
        "beam": lambda x: beam_search(model, x, mask, trie, 3),
        "exact": lambda x: exact_topk(model, x, mask, trie, 3),
        "score": lambda x: score_items(model, x, mask, trie, torch.tensor([ids[:2]] * 3)),
    }[decoder]
    too_big = input_ids.clone()
    too_big[1, -1] = VOCAB
    with pytest.raises(ValueError, match=rf"input_ids must be token ids in \[0, {VOCAB}\)"):
        run(too_big)
    with pytest.raises(TypeError, match="input_ids must hold integer token ids"):
        run(input_ids.float())


@pytest.mark.parametrize("scoring", ["before", "after"])
def test_a_trie_smaller_than_the_model_vocabulary_decodes_as_a_full_one(setup, scoring):
    model, seqs, ids, full, input_ids, mask = setup
    small = ItemTrie(seqs, ids, EOS)  # as SPEC §4 builds it: vocab_size = largest token + 1
    assert small.vocab_size < VOCAB
    items = torch.tensor([ids[:6]] * 3)
    want = score_items(model, input_ids, mask, full, items, scoring)
    torch.testing.assert_close(score_items(model, input_ids, mask, small, items, scoring), want)
    for fn in (beam_search, exact_topk):
        want, got = fn(model, input_ids, mask, full, 4), fn(model, input_ids, mask, small, 4)
        assert torch.equal(got.item_ids, want.item_ids)
        torch.testing.assert_close(got.scores, want.scores)


def test_exact_topk_feeds_one_token_per_expansion_on_long_titles():
    """A long title costs one decoding step per token, never a re-run of its whole prefix."""
    model = tiny_model()
    seqs, ids = random_catalogue(12)
    seqs.append([3 + i % 8 for i in range(60)])  # a 60-token title
    ids.append(max(ids) + 1)
    trie = ItemTrie(seqs, ids, EOS, vocab_size=VOCAB)
    input_ids, mask = prompts((5, 8))
    widths = []
    hook = model.register_forward_pre_hook(
        lambda _m, _a, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        top = exact_topk(model, input_ids, mask, trie, k=len(seqs))  # walks every title
    finally:
        hook.remove()
    assert widths[0] == input_ids.shape[1]  # the prompts' prefill
    assert set(widths[1:]) == {1}
    assert (top.item_ids == ids[-1]).any(1).all()  # the long title was reached


def test_ties_at_the_cut_keep_the_lowest_indices():
    """topk_stable ranks by (value desc, index asc) over the whole row, ties at the k-th value
    included (Tensor.topk picks any of them: on this CPU zeros(40).topk(6) gave 25, 29, ...)."""
    from bear.decoding.common import topk_stable

    val, idx = topk_stable(torch.zeros(2, 40), 6)
    assert idx.tolist() == [list(range(6))] * 2 and (val == 0).all()
    x = torch.tensor([[1.0, 3.0, 3.0, float("-inf"), 3.0, 2.0]])
    assert topk_stable(x, 4)[1].tolist() == [[1, 2, 4, 5]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_topk_stable_is_the_stable_sorts_first_k(dtype):
    """The selection (int64 keys of value and index) gives exactly the stable descending sort's
    first k, with ties, ±inf, -0.0 beside +0.0, and k past the row's end."""
    from bear.decoding.common import topk_stable

    g = torch.Generator().manual_seed(4)
    specials = torch.tensor([float("-inf"), float("inf"), -0.0, 0.0, 0.5, -0.5])
    for _ in range(200):
        n, k = (
            int(torch.randint(1, 50, (1,), generator=g)),
            int(torch.randint(1, 60, (1,), generator=g)),
        )
        x = specials[torch.randint(0, 6, (3, n), generator=g)].to(dtype)
        x = torch.where(
            torch.rand(3, n, generator=g) < 0.3, torch.randn(3, n, generator=g).to(dtype), x
        )
        want_val, want_idx = x.sort(dim=-1, descending=True, stable=True)
        val, idx = topk_stable(x, k)
        assert torch.equal(idx, want_idx[..., :k]) and torch.equal(val, want_val[..., :k])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_tensor_topk_ranks_nan_above_every_number(device):
    """topk_stable's first try (and beam search's NaN check on its output) relies on this."""
    x = torch.tensor([[1.0, float("nan"), float("inf"), 3.0] * 300], device=device)
    val = x.topk(301, dim=-1).values
    assert val[0, :300].isnan().all() and val[0, 300] == float("inf")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_topk_stable_on_wide_rows_is_the_stable_sorts_first_k(dtype):
    """Rows of SELECT_FIRST_WIDTH entries or more take Tensor.topk first: distinct values keep
    it; ties at the cut, NaN, and rows with fewer than k finite entries (-inf padding) fall back;
    every case gives exactly the stable descending sort's first k."""
    from bear.decoding.common import SELECT_FIRST_WIDTH, _topk_without_cut_ties, topk_stable

    g = torch.Generator().manual_seed(7)
    n, k = SELECT_FIRST_WIDTH + 37, 20
    j = torch.randperm(3 * n, generator=g).view(3, n)
    distinct = ((j % 128 + 128) * 2.0 ** (j // 128 - 8)).to(dtype)  # exact even in bfloat16
    tied = distinct.clone()
    cut = tied.sort(dim=-1, descending=True).values[:, k - 1 : k]
    tied[:, -5:] = cut  # the k-th value again, at higher indices than the first
    with_nan = distinct.clone()
    with_nan[1, 500] = float("nan")
    inner = distinct.clone()  # ties inside the first k, none at the cut: the lower index first
    inner[:, -1] = inner.max(dim=-1).values
    inner[:, -3] = inner.sort(dim=-1, descending=True).values[:, 4]
    padded = torch.full((3, n), float("-inf"), dtype=dtype)
    padded[:, :7] = distinct[:, :7]
    assert _topk_without_cut_ties(distinct, k) is not None
    for x in (distinct, tied, with_nan, padded, -tied, inner):
        want_val, want_idx = x.sort(dim=-1, descending=True, stable=True)
        val, idx = topk_stable(x, k)
        assert torch.equal(idx, want_idx[..., :k])
        assert torch.equal(val.nan_to_num(7.0), want_val[..., :k].nan_to_num(7.0))
    assert _topk_without_cut_ties(tied, k) is None and _topk_without_cut_ties(padded, k) is None
    assert _topk_without_cut_ties(inner, k) is not None


@pytest.mark.parametrize("scoring", ["before", "after"])
@pytest.mark.parametrize("kv_sharing", ["tree", "copy"])
def test_a_model_that_ties_everything_decodes_the_same_items_whatever_beams_are_dropped(
    scoring, kv_sharing, monkeypatch
):
    """All logits 0: every sibling ties. Dropping the beams that cannot reach the pool must not
    change which tied items the search keeps (it did, through Tensor.topk's arbitrary choice
    among ties, before topk_stable sorted stably)."""
    import bear.decoding.beam

    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    input_ids, mask = prompts((7, 4, 9))
    for seed in range(1, 9):
        seqs, ids = random_catalogue(60, seed=seed, max_len=6)
        trie = ItemTrie(seqs, ids, EOS, vocab_size=VOCAB)
        for alpha in (0.0, 1.0):
            args = (model, input_ids, mask, trie, 5, scoring)
            dropped = beam_search(*args, length_penalty=alpha, kv_sharing=kv_sharing)
            with monkeypatch.context() as patch:
                patch.setattr(bear.decoding.beam, "_beams_that_matter",
                              lambda step, worst, done, a: step.alive & ~done[:, None])  # fmt: skip
                kept = beam_search(*args, length_penalty=alpha, kv_sharing=kv_sharing)
            assert torch.equal(dropped.item_ids, kept.item_ids), (seed, alpha)


def test_prompts_share_nothing_when_the_cache_drops_positions(monkeypatch):
    """A model whose cache does not keep every position (a sliding window: the head's entries
    cannot be read back) is prefilled without a shared head, and the copy cache, which needs
    nothing more, decodes as before."""
    import bear.decoding.prompt_cache

    model = tiny_model()
    seqs, ids, trie = build()
    input_ids, mask = prompts((7, 4, 9))
    input_ids = with_shared_head(input_ids, mask, 2)
    assert bear.decoding.prompt_cache.shared_head_length(input_ids, mask) == 2
    want = beam_search(model, input_ids, mask, trie, 4, kv_sharing="copy")

    def no_full_cache(cache, length):
        raise ValueError("the model's cache holds fewer positions")

    monkeypatch.setattr(bear.decoding.prompt_cache, "layer_tensors", no_full_cache)
    _, kv_mask, _, _ = bear.decoding.prompt_cache.prefill(model, input_ids, mask)
    assert torch.equal(kv_mask, mask)
    got = beam_search(model, input_ids, mask, trie, 4, kv_sharing="copy")
    assert torch.equal(got.item_ids, want.item_ids)
    torch.testing.assert_close(got.scores, want.scores, atol=1e-5, rtol=1e-5)


def test_score_items_runs_each_prompt_once_and_falls_back_without_a_full_cache(monkeypatch):
    """score_items prefills the prompts once and feeds only the items after them (the model sees
    no prompt token again); a prefilled PromptCache gives the same scores; a model whose cache
    drops positions runs prompt and item together, to the same scores."""
    import bear.decoding.teacher_forcing
    from bear.decoding import score_items
    from bear.decoding.prompt_cache import PromptCache

    model = tiny_model()
    seqs, ids, trie = build()
    input_ids, mask = prompts((7, 4, 9))
    pick = torch.tensor(ids[:5]).expand(3, -1)
    fed = []
    hook = model.model.embed_tokens.register_forward_hook(
        lambda module, args, out: fed.append(args[0].numel())
    )
    want = score_items(model, input_ids, mask, trie, pick, "after")
    hook.remove()
    longest = max(len(seqs[ids.index(i)]) for i in ids[:5])
    # prompts once, then the items only (and the one token of the model's head proof,
    # blocked_head.plain_head, made once per model)
    assert sum(fed) <= input_ids.numel() + 1 + 15 * longest
    cache = PromptCache.prefill(model, input_ids, mask)
    reused = score_items(model, input_ids, mask, trie, pick, "after", prompt=cache)
    torch.testing.assert_close(reused, want, atol=1e-5, rtol=1e-5)

    def no_full_cache(cache, length):
        raise ValueError("the model's cache holds fewer positions")

    monkeypatch.setattr(bear.decoding.teacher_forcing, "layer_tensors", no_full_cache)
    again = score_items(model, input_ids, mask, trie, pick, "after")
    torch.testing.assert_close(again, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="holds other prompts"):
        score_items(model, input_ids[:2], mask[:2], trie, pick[:2], "after", prompt=cache)


@pytest.mark.parametrize("scoring", ["before", "after"])
def test_beam_children_are_the_padded_candidates_without_the_padding(scoring):
    """Each user's candidates side by side (beam_children) are child_logprobs' (beam, child)
    candidates in the same order, with the same log-probabilities, and nothing else."""
    from bear.decoding.common import beam_children, child_logprobs, max_candidates, max_fanout

    seqs, ids, trie = build(60, seed=3)
    g = torch.Generator().manual_seed(5)
    node = torch.randint(-1, trie.num_nodes, (4, 5), generator=g)
    node[trie.leaf_item[node.clamp(min=0)] >= 0] = -1  # leaves have no children
    logits = torch.randn(4, 5, trie.vocab_size, generator=g)
    F, W = max(int(max_fanout(trie, node)), 1), max(int(max_candidates(trie, node)), 1)
    padded, padded_edge = child_logprobs(trie, logits, node, F, scoring)
    logp, edge, beam = beam_children(trie, logits, node, W, scoring)
    for u in range(4):
        keep = padded_edge[u].reshape(-1) >= 0
        n = int(keep.sum())
        assert torch.equal(edge[u, :n], padded_edge[u].reshape(-1)[keep])
        torch.testing.assert_close(logp[u, :n], padded[u].reshape(-1)[keep])
        beams = torch.arange(5)[:, None].expand(5, F).reshape(-1)[keep]
        assert torch.equal(beam[u, :n], beams)
        assert (edge[u, n:] == -1).all() and torch.isinf(logp[u, n:]).all()


def test_score_items_of_no_items_is_an_empty_score_table():
    from bear.decoding import score_items

    seqs, ids, trie = build()
    input_ids, mask = prompts((5, 3))
    out = score_items(tiny_model(), input_ids, mask, trie, torch.zeros(2, 0, dtype=torch.long))
    assert out.shape == (2, 0)


@pytest.mark.parametrize("scoring", ["before", "after"])
def test_root_children_are_the_roots_candidates_in_child_order(scoring):
    """The first step's gather over the root's edges gives exactly beam_children's candidates at
    the root, in the same order, with the same log-probabilities (model logits wider than the
    trie's vocabulary included)."""
    from bear.decoding.common import beam_children, root_children

    seqs, ids, trie = build(60, seed=3)
    logits = torch.randn(3, 1, trie.vocab_size + 5, generator=torch.Generator().manual_seed(6))
    root = torch.zeros(3, 1, dtype=torch.long)
    width = trie.depth_fanout_list[0]
    want_logp, want_edge, _ = beam_children(trie, logits, root, width, scoring)
    logp, edge, beam = root_children(trie, logits, scoring)
    assert edge.shape == (3, width) and (beam == 0).all()
    assert torch.equal(edge, want_edge)
    torch.testing.assert_close(logp, want_logp)


@pytest.mark.parametrize("scoring", ["before", "after"])
def test_a_float64_default_dtype_decodes_and_scores_as_float32(setup, scoring):
    """torch.set_default_dtype(torch.float64) in the user's process: the float32 model decodes to
    the same items and scores (score_items failed on an index_put of float32 into a float64
    buffer; the chain cache's "after" log p likewise), and scores stay float32."""
    model, seqs, ids, trie, input_ids, mask = setup
    pick = torch.tensor([ids[:4]] * 3)
    runs = {
        "score": lambda: score_items(model, input_ids, mask, trie, pick, scoring),
        "tree": lambda: beam_search(model, input_ids, mask, trie, 4, scoring, chain_limit=3),
        "copy": lambda: beam_search(model, input_ids, mask, trie, 4, scoring, kv_sharing="copy"),
        "thresholds": lambda: beam_thresholds(model, input_ids, mask, trie, 4, scoring),
    }
    want = {name: run() for name, run in runs.items()}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = {name: run() for name, run in runs.items()}
    finally:
        torch.set_default_dtype(previous)
    assert got["score"].dtype == torch.float32
    torch.testing.assert_close(got["score"], want["score"])
    for name in ("tree", "copy"):
        assert torch.equal(got[name].item_ids, want[name].item_ids)
        torch.testing.assert_close(got[name].scores.float(), want[name].scores)
    torch.testing.assert_close(got["thresholds"].float(), want["thresholds"])

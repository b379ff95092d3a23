"""Decoding on a tiny random Llama: brute force, teacher forcing, batching, Hugging Face parity."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import bear.decoding.beam
from bear.decoding import beam_search, beam_thresholds, exact_topk, score_items
from bear.decoding.beam_cache import check_tree_attention
from bear.decoding.count_above import count_items_above
from bear.decoding.prompt_cache import PromptCache, cache_kwarg, shared_head_length
from bear.decoding.teacher_forcing import continuation_logits, item_logits
from bear.protocol import PROTOCOLS
from bear.trie import ItemTrie
from tests._helpers_decoding import (
    EOS,
    FIRST_TOKEN,
    ITEM_TOKENS,
    PAD,
    VOCAB,
    build,
    prefix_tokens,
    prompts,
    random_catalogue,
    tiny_model,
    with_shared_head,
)

LENGTHS = (7, 4, 9)  # prompts of different lengths, left-padded into one batch


@pytest.fixture(scope="module")
def setup():
    model = tiny_model()
    seqs, ids, trie = build()
    input_ids, mask = prompts(LENGTHS)
    return model, seqs, ids, trie, input_ids, mask


def brute_force(model, input_ids, mask, trie, ids, scoring, alpha=0.0):
    """Every canonical item scored by teacher forcing, sorted by (score desc, id asc)."""
    canon = torch.unique(trie.canonical(torch.tensor(ids)))  # ascending ids
    U = input_ids.shape[0]
    s = score_items(model, input_ids, mask, trie, canon.expand(U, -1), scoring)  # (U, n)
    length = (trie.item_tokens(canon) != -100).sum(-1).float()  # tokens incl. EOS
    s = s / length**alpha
    order = torch.argsort(s, dim=1, descending=True, stable=True)
    return canon[order], s.gather(1, order)


@pytest.mark.parametrize("scoring", ["before", "after"])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_beam_search_equals_exhaustive_ranking_when_beam_covers_catalogue(setup, scoring, alpha):
    model, seqs, ids, trie, input_ids, mask = setup
    items, scores = brute_force(model, input_ids, mask, trie, ids, scoring, alpha)
    n = items.shape[1]
    res = beam_search(model, input_ids, mask, trie, n + 3, scoring, length_penalty=alpha)
    assert torch.equal(res.item_ids[:, :n], items)
    torch.testing.assert_close(res.scores[:, :n], scores, atol=1e-5, rtol=1e-5)
    assert (res.item_ids[:, n:] == -1).all() and torch.isneginf(res.scores[:, n:]).all()


@pytest.mark.parametrize("scoring", ["before", "after"])
def test_exact_topk_equals_brute_force_for_every_k(setup, scoring):
    model, seqs, ids, trie, input_ids, mask = setup
    items, scores = brute_force(model, input_ids, mask, trie, ids, scoring)
    n = items.shape[1]
    for k in [1, 2, 5, 10, n, n + 2]:
        top = exact_topk(model, input_ids, mask, trie, k, scoring, expand_per_round=3)
        m = min(k, n)
        assert torch.equal(top.item_ids[:, :m], items[:, :m]), k
        torch.testing.assert_close(top.scores[:, :m], scores[:, :m], atol=1e-5, rtol=1e-5)
        assert (top.item_ids[:, m:] == -1).all()


@pytest.mark.parametrize("scoring", ["before", "after"])
def test_exact_topk_floor_keeps_every_item_above_it(setup, scoring):
    """With a floor per user (here the score of the user's 3rd and 7th best items, and -inf)
    the search returns exactly the unbounded top-k's items at or above it, with fewer forwards
    where it cuts (tokens fed to the model, the prompts' prefill included)."""
    model, seqs, ids, trie, input_ids, mask = setup
    calls = []
    hook = model.register_forward_hook(
        lambda _m, _a, kwargs, _o: calls.append(kwargs["input_ids"].numel()), with_kwargs=True
    )
    try:
        full = exact_topk(model, input_ids, mask, trie, 10, scoring)
        n_full = sum(calls)
        floor = torch.stack([full.scores[0, 2], full.scores[1, 6], torch.tensor(float("-inf"))])
        calls.clear()
        cut = exact_topk(model, input_ids, mask, trie, 10, scoring, floor=floor - 1e-6)
    finally:
        hook.remove()
    kept = full.scores >= floor[:, None] - 1e-6
    assert kept.sum(1).tolist() == [3, 7, 10]
    assert torch.equal(cut.item_ids, torch.where(kept, full.item_ids, -1))
    torch.testing.assert_close(cut.scores[kept], full.scores[kept])
    assert torch.isneginf(cut.scores[~kept]).all()
    assert sum(calls) < n_full


def test_exact_topk_budget_keeps_the_best_found_in_order(setup):
    """A search stopped by max_expansions feeds at most that many prefix tokens per user, holds a
    prefix of the unbounded ranking and says it is incomplete; a budget it does not reach
    changes nothing."""
    model, seqs, ids, trie, input_ids, mask = setup
    U = input_ids.shape[0]
    full = exact_topk(model, input_ids, mask, trie, 10, "after")
    roomy = exact_topk(model, input_ids, mask, trie, 10, "after", max_expansions=10**6)
    assert torch.equal(roomy.item_ids, full.item_ids) and roomy.complete.all()
    assert full.complete is None
    fed = []
    hook = model.register_forward_hook(
        lambda _m, _a, kwargs, _o: fed.append(kwargs["input_ids"].numel()), with_kwargs=True
    )
    partial = 0  # users stopped with some but not all of their items
    try:
        for budget in (0, 4, 8, 16):
            fed.clear()
            cut = exact_topk(model, input_ids, mask, trie, 10, "after", expand_per_round=1,
                             max_expansions=budget)  # fmt: skip
            assert sum(fed[1:]) <= U * budget  # fed[0]: the prompts' prefill
            n = (cut.item_ids >= 0).sum(1)
            assert torch.equal(cut.complete, n == 10)
            for u in range(U):
                assert torch.equal(cut.item_ids[u, : n[u]], full.item_ids[u, : n[u]])
            partial += int(((n > 0) & (n < 10)).sum())
    finally:
        hook.remove()
    assert partial > 0


def test_exact_topk_skips_one_child_chains_under_before_scoring(setup):
    """Every item of a catalogue of long unshared tails, by "before" scoring: the ranking of
    teacher forcing every item, with fewer prefix tokens fed than the catalogue's inner nodes
    (one expansion each without the skip)."""
    model, input_ids, mask = setup[0], setup[4], setup[5]
    trie = _long_tail_catalogue()
    ids = trie.leaf_item[trie.leaf_item >= 0].tolist()
    items, scores = brute_force(model, input_ids, mask, trie, ids, "before")
    fed = []
    hook = model.register_forward_hook(
        lambda _m, _a, kwargs, _o: fed.append(kwargs["input_ids"].numel()), with_kwargs=True
    )
    try:
        top = exact_topk(model, input_ids, mask, trie, items.shape[1], "before")
    finally:
        hook.remove()
    assert torch.equal(top.item_ids, items)
    torch.testing.assert_close(top.scores, scores, atol=1e-5, rtol=1e-5)
    inner = int(((trie.leaf_item < 0) & (trie.node_parent >= 0)).sum())  # nodes but root, leaves
    assert sum(fed[1:]) < input_ids.shape[0] * inner / 2


def test_exact_topk_rejects_a_bad_floor_or_budget(setup):
    model, seqs, ids, trie, input_ids, mask = setup
    with pytest.raises(ValueError, match="floor"):
        exact_topk(model, input_ids, mask, trie, 3, floor=torch.zeros(len(input_ids), 1))
    with pytest.raises(ValueError, match="floor"):
        exact_topk(model, input_ids, mask, trie, 3, floor=torch.full((len(input_ids),), torch.nan))
    with pytest.raises(ValueError, match="max_expansions"):
        exact_topk(model, input_ids, mask, trie, 3, max_expansions=-1)
    with pytest.raises(TypeError, match="max_expansions"):
        exact_topk(model, input_ids, mask, trie, 3, max_expansions=2.5)


@pytest.mark.parametrize("scoring", ["before", "after"])
def test_score_items_equals_teacher_forcing(setup, scoring):
    model, seqs, ids, trie, input_ids, mask = setup
    pick = torch.tensor([ids[0], ids[-1], ids[-2], ids[5]])
    got = score_items(model, input_ids, mask, trie, pick.expand(3, -1), scoring)
    item_of = dict(zip(ids, seqs, strict=True))
    children = {}  # prefix -> allowed next tokens (a test oracle, so a plain dict)
    for s in seqs:
        for t in range(len(s) + 1):
            children.setdefault(tuple(s[:t]), set()).add(s[t] if t < len(s) else EOS)
    for u in range(3):
        prompt = input_ids[u, mask[u].bool()]
        for j, item in enumerate(pick.tolist()):
            target = item_of[item] + [EOS]
            x = torch.cat([prompt, torch.tensor(target[:-1])])[None]
            with torch.no_grad():
                logits = model(input_ids=x).logits[0, len(prompt) - 1 :].double()
            total = 0.0
            for t, y in enumerate(target):
                z = logits[t]
                if scoring == "before":
                    allowed = torch.tensor(sorted(children[tuple(target[:t])]))
                    total += (z[y] - torch.logsumexp(z[allowed], 0)).item()
                else:
                    total += torch.log_softmax(z, 0)[y].item()
            assert abs(got[u, j].item() - total) < 1e-4


@pytest.mark.parametrize("scoring", ["before", "after"])
def test_score_items_in_chunks_of_one_item_keeps_each_users_order(setup, scoring, monkeypatch):
    """score_items groups items of like length into chunks and writes each score back to its
    (user, item) place: one item per chunk gives the same scores as all in one."""
    import bear.decoding.teacher_forcing as teacher_forcing

    model, seqs, ids, trie, input_ids, mask = setup
    lengths = {i: len(s) for i, s in zip(ids, seqs, strict=True)}
    pick = torch.tensor([sorted(ids, key=lengths.get)[::-1][:5], sorted(ids, key=lengths.get)[:5],
                         ids[3:8]])  # fmt: skip
    assert len({lengths[i] for i in pick.flatten().tolist()}) > 2
    together = score_items(model, input_ids, mask, trie, pick, scoring)
    monkeypatch.setattr(teacher_forcing, "ROW_BUDGET", 1)
    monkeypatch.setattr(teacher_forcing, "CACHE_BUDGET", 1)
    one_by_one = score_items(model, input_ids, mask, trie, pick, scoring)
    torch.testing.assert_close(one_by_one, together, rtol=0, atol=1e-5)


@pytest.mark.parametrize("scoring", ["before", "after"])
def test_kv_sharing_modes_agree(setup, scoring):
    model, seqs, ids, trie, input_ids, mask = setup
    b = beam_search(model, input_ids, mask, trie, 5, scoring, kv_sharing="copy")
    for limit in (1, 2, 16):
        a = beam_search(model, input_ids, mask, trie, 5, scoring, chain_limit=limit)
        assert torch.equal(a.item_ids, b.item_ids)
        torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=1e-5)


def _long_tail_catalogue():
    """12 two-token heads, each with one or two tails of 3-7 tokens (one tail per head forks
    again half way): long runs of one-child nodes, as item titles have."""
    g = torch.Generator().manual_seed(5)
    seqs = []
    for head in range(12):
        prefix = [FIRST_TOKEN + head % 3, FIRST_TOKEN + 3 + head // 3]
        for _ in range(1 + head % 2):
            n = int(torch.randint(3, 8, (1,), generator=g))
            seqs.append(
                prefix + torch.randint(FIRST_TOKEN, ITEM_TOKENS, (n,), generator=g).tolist()
            )
        seqs.append(seqs[-1][:4] + [FIRST_TOKEN + (seqs[-1][4] + 1 - FIRST_TOKEN) % 8] * 2)
    return ItemTrie(seqs, list(range(len(seqs))), EOS, vocab_size=VOCAB)


@pytest.mark.parametrize("scoring", ["before", "after"])
def test_one_child_steps_run_no_forward_and_change_nothing(setup, scoring):
    """Under either scoring the tree cache feeds a one-child chain in one forward ("after": ahead,
    up to chain_limit tokens; "before": when the beam reaches a branching node) and runs none at
    a depth where no kept beam needs logits: fewer forwards, and the same items and scores as
    the copy cache's one forward per step."""
    model, input_ids, mask = setup[0], setup[4], setup[5]
    trie = _long_tail_catalogue()
    calls = {"tree": 0, "copy": 0}
    results = {}
    for kv in calls:
        hook = model.register_forward_hook(lambda *_, kv=kv: calls.__setitem__(kv, calls[kv] + 1))
        try:
            results[kv] = beam_search(model, input_ids, mask, trie, 3, scoring, kv_sharing=kv,
                                      chain_limit=16)  # fmt: skip
        finally:
            hook.remove()
    assert torch.equal(results["tree"].item_ids, results["copy"].item_ids)
    torch.testing.assert_close(results["tree"].scores, results["copy"].scores, atol=1e-5, rtol=0)
    assert calls["tree"] < calls["copy"]


def test_by_default_a_cpu_search_feeds_few_chains_ahead(setup):
    """With no chain_limit a CPU search feeds one token per chain while many chains are fed, and
    up to 16 // N tokens each to N < 16 chains (``default_feed_budget``): on long one-child
    chains fewer forwards than chain_limit=1, the same items and scores."""
    model, input_ids, mask = setup[0], setup[4], setup[5]
    trie = _long_tail_catalogue()
    calls, results = {}, {}
    for limit in (None, 1):
        calls[limit] = 0
        hook = model.register_forward_hook(lambda *_, k=limit: calls.__setitem__(k, calls[k] + 1))
        try:
            results[limit] = beam_search(model, input_ids, mask, trie, 3, "after",
                                         chain_limit=limit)  # fmt: skip
        finally:
            hook.remove()
    assert torch.equal(results[None].item_ids, results[1].item_ids)
    torch.testing.assert_close(results[None].scores, results[1].scores, atol=1e-5, rtol=0)
    assert calls[None] < calls[1]


def test_a_peft_model_gets_the_cache_under_its_base_models_name(setup):
    """peft's forward takes **kwargs and passes them on, so its own signature names no cache
    argument: the name comes from the base model (transformers 5.x calls it `cache`, and warns
    that `past_key_values` goes away), and a LoRA model decodes as its base model does."""
    from peft import LoraConfig, get_peft_model

    *_, trie, input_ids, mask = setup
    lora = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj"]))
    assert cache_kwarg(lora) == cache_kwarg(lora.get_base_model())
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        got = beam_search(lora, input_ids, mask, trie, 4, "before")
    want = beam_search(tiny_model(), input_ids, mask, trie, 4, "before")  # LoRA B = 0: the same
    assert torch.equal(got.item_ids, want.item_ids)
    torch.testing.assert_close(got.scores, want.scores)


@pytest.mark.parametrize("head", [0, 3])
@pytest.mark.parametrize("scoring", ["before", "after"])
def test_batched_equals_one_by_one(setup, scoring, head):
    """Batched decoding equals decoding each unpadded prompt alone; with prompts that share
    their first tokens (head 3), the batch runs those once (shared_head_length) and still
    equals the single prompts, which share nothing."""
    model, seqs, ids, trie, input_ids, mask = setup
    input_ids = with_shared_head(input_ids, mask, head)
    assert shared_head_length(input_ids, mask) == head
    batched = beam_search(model, input_ids, mask, trie, 4, scoring, length_penalty=0.5)
    top = exact_topk(model, input_ids, mask, trie, 6, scoring)
    pick = torch.tensor(ids[:7]).expand(3, -1)
    sc = score_items(model, input_ids, mask, trie, pick, scoring)
    for u, n in enumerate(LENGTHS):
        x, m = input_ids[u : u + 1, -n:], mask[u : u + 1, -n:]  # unpadded single prompt
        one = beam_search(model, x, m, trie, 4, scoring, length_penalty=0.5)
        assert torch.equal(one.item_ids[0], batched.item_ids[u])
        torch.testing.assert_close(one.scores[0], batched.scores[u], atol=1e-5, rtol=1e-5)
        one = exact_topk(model, x, m, trie, 6, scoring)
        assert torch.equal(one.item_ids[0], top.item_ids[u])
        s1 = score_items(model, x, m, trie, pick[:1], scoring)
        torch.testing.assert_close(s1[0], sc[u], atol=1e-5, rtol=1e-5)
    copied = beam_search(model, input_ids, mask, trie, 4, scoring, length_penalty=0.5,
                         kv_sharing="copy")  # fmt: skip
    assert torch.equal(copied.item_ids, batched.item_ids)
    items = torch.tensor(ids[:3])
    logits = item_logits(model, PromptCache.prefill(model, input_ids, mask), trie, items)[0]
    for u, n in enumerate(LENGTHS):
        x, m = input_ids[u : u + 1, -n:], mask[u : u + 1, -n:]
        one = item_logits(model, PromptCache.prefill(model, x, m), trie, items[u : u + 1])[0]
        width = one.shape[1]
        torch.testing.assert_close(one[0], logits[u, :width], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scoring", ["before", "after"])
def test_beam_results_are_complete_distinct_and_teacher_forced(setup, scoring):
    model, seqs, ids, trie, input_ids, mask = setup
    res = beam_search(model, input_ids, mask, trie, 5, scoring)
    canon = set(trie.canonical(torch.tensor(ids)).tolist())
    for u in range(3):
        got = [i for i in res.item_ids[u].tolist() if i >= 0]
        assert len(got) == len(set(got)) == 5 and set(got) <= canon
    assert (res.scores[:, :-1] >= res.scores[:, 1:]).all()  # sorted, best first
    tf = score_items(model, input_ids, mask, trie, res.item_ids, scoring)
    torch.testing.assert_close(tf, res.scores, atol=1e-5, rtol=1e-5)


def test_item_that_prefixes_another_is_reachable():
    model = tiny_model()
    trie = ItemTrie([[5], [5, 6], [5, 6, 7]], [0, 1, 2], EOS, vocab_size=VOCAB)
    x, m = prompts((5,))
    res = beam_search(model, x, m, trie, 3, "before")
    assert sorted(res.item_ids[0].tolist()) == [0, 1, 2]


def _hf_generate(model, input_ids, mask, seqs, ids, trie, B, alpha):
    """generate(num_beams=B, prefix_allowed_tokens_fn=...) over a plain dict trie, minus its
    artefacts: incomplete sequences and the -1e9 filler beams are dropped."""
    allowed = {}
    for s in seqs:
        for t in range(len(s) + 1):
            allowed.setdefault(tuple(s[:t]), set()).add(s[t] if t < len(s) else EOS)
    allowed = {k: sorted(v) for k, v in allowed.items()}
    item_of = {
        tuple(s): i for s, i in zip(seqs, trie.canonical(torch.tensor(ids)).tolist(), strict=True)
    }
    P = input_ids.shape[1]

    def fn(batch_id, sent):
        return allowed.get(tuple(sent[P:].tolist()), [EOS])

    out = model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        num_beams=B,
        num_return_sequences=B,
        prefix_allowed_tokens_fn=fn,
        do_sample=False,
        max_new_tokens=trie.max_len + 1,
        **({} if alpha is None else {"length_penalty": alpha}),  # None: generate's default
        early_stopping=False,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    gen = out.sequences[:, P:].view(input_ids.shape[0], B, -1).tolist()
    scores = out.sequences_scores.view(input_ids.shape[0], B).tolist()
    result = []
    for u in range(input_ids.shape[0]):
        row = []
        for toks, sc in zip(gen[u], scores[u], strict=True):
            if EOS not in toks or sc < -1e8:
                continue
            key = tuple(toks[: toks.index(EOS)])
            if key in item_of:
                row.append((item_of[key], sc))
        result.append(row)
    return result


@pytest.mark.parametrize(
    ("kv_sharing", "chain_limit"), [("tree", 1), ("tree", 3), ("tree", None), ("copy", 1)]
)
@pytest.mark.parametrize("alpha", [0.0, 1.0])
@pytest.mark.parametrize("B", [2, 3, 6])  # num_beams=1 is greedy search in HF
def test_after_mode_equals_hf_generate(setup, alpha, B, kv_sharing, chain_limit):
    model, seqs, ids, trie, input_ids, mask = setup
    ours = beam_search(model, input_ids, mask, trie, B, "after", length_penalty=alpha,
                       kv_sharing=kv_sharing, chain_limit=chain_limit)  # fmt: skip
    hf = _hf_generate(model, input_ids, mask, seqs, ids, trie, B, alpha)
    for u in range(input_ids.shape[0]):
        got = [
            (i, s)
            for i, s in zip(ours.item_ids[u].tolist(), ours.scores[u].tolist(), strict=True)
            if i >= 0
        ]
        assert [i for i, _ in got] == [i for i, _ in hf[u]], (u, got, hf[u])
        for (_, a), (_, b) in zip(got, hf[u], strict=True):
            assert abs(a - b) < 1e-4


@pytest.mark.parametrize(("seed", "scoring"), [(4, "before"), (6, "after"), (9, "before")])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_beams_that_cannot_reach_the_pool_are_not_fed_and_change_nothing(alpha, seed, scoring,
                                                                          monkeypatch):  # fmt: skip
    """Titles of 1-8 tokens: short items fill the pool while longer beams run on. Dead beams
    (every alpha) and, at alpha = 0, live beams at or below a full pool's worst (seen here at
    least once) are dropped from the feed: fewer than B beam tokens per user in some forward of
    the copy cache (one token per fed beam), the items and scores of the search that keeps every
    live beam under either cache, and generate's ("after")."""
    model = tiny_model()
    seqs, ids = random_catalogue(60, seed=seed, max_len=8)
    trie = ItemTrie(seqs, ids, EOS, vocab_size=VOCAB)
    input_ids, mask = prompts(LENGTHS)
    B, widths, live_dropped = 5, [], []
    matter = bear.decoding.beam._beams_that_matter

    def recording(step, pool_worst, done, a):
        useful = matter(step, pool_worst, done, a)
        live_dropped.append(int((step.alive & ~done[:, None] & ~useful).sum()))
        return useful

    hook = model.register_forward_hook(
        lambda _m, _a, kw, _o: widths.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        with monkeypatch.context() as patch:
            patch.setattr(bear.decoding.beam, "_beams_that_matter", recording)
            ours = beam_search(model, input_ids, mask, trie, B, scoring, length_penalty=alpha,
                               kv_sharing="copy")  # fmt: skip
    finally:
        hook.remove()
    assert min(widths[1:]) < B  # widths[0]: the prompts' prefill
    assert (sum(live_dropped) > 0) == (alpha == 0)
    with monkeypatch.context() as patch:
        patch.setattr(bear.decoding.beam, "_beams_that_matter",
                      lambda step, worst, done, a: step.alive & ~done[:, None])  # fmt: skip
        every = beam_search(model, input_ids, mask, trie, B, scoring, length_penalty=alpha)
    tree = beam_search(model, input_ids, mask, trie, B, scoring, length_penalty=alpha)
    for got in (ours, tree):
        assert torch.equal(got.item_ids, every.item_ids)
        torch.testing.assert_close(got.scores, every.scores, atol=1e-5, rtol=1e-5)
    if scoring == "before":
        return
    hf = _hf_generate(model, input_ids, mask, seqs, ids, trie, B, alpha)
    for u in range(input_ids.shape[0]):
        got = [(i, s) for i, s in zip(ours.item_ids[u].tolist(), ours.scores[u].tolist(),
                                      strict=True) if i >= 0]  # fmt: skip
        assert [i for i, _ in got] == [i for i, _ in hf[u]]
        assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(got, hf[u], strict=True))


def test_upstream_length_penalty_is_generates_default(setup):
    """The upstream protocol's α ranks as generate does when no length_penalty is given (the
    paper's decoding), and differently from α = 0 (ours) for some prompt."""
    model, seqs, ids, trie, input_ids, mask = setup
    B = 6
    alpha = PROTOCOLS["upstream"].length_penalty
    ours = beam_search(model, input_ids, mask, trie, B, "after", length_penalty=alpha)
    hf = _hf_generate(model, input_ids, mask, seqs, ids, trie, B, None)
    plain = beam_search(model, input_ids, mask, trie, B, "after", length_penalty=0.0)
    for u in range(input_ids.shape[0]):
        got = [i for i in ours.item_ids[u].tolist() if i >= 0]
        assert got == [i for i, _ in hf[u]], u
        scores = [s for s in ours.scores[u].tolist() if s > float("-inf")]
        torch.testing.assert_close(scores, [s for _, s in hf[u]], atol=1e-4, rtol=0)
    assert not torch.equal(ours.item_ids, plain.item_ids)


def test_beam_thresholds_match_a_reference_simulation(setup):
    model, seqs, ids, trie, input_ids, mask = setup
    B = 3
    theta = beam_thresholds(model, input_ids, mask, trie, B, "before")
    assert theta.shape == (3, trie.max_len + 1)
    # Reference: per user, a plain Python simulation over prefix scores from score_items-style
    # teacher forcing of every trie node.
    nodes = torch.arange(trie.num_nodes)
    parent, token = trie.node_parent.tolist(), trie.node_token.tolist()
    for u in range(3):
        x, m = input_ids[u : u + 1], mask[u : u + 1]
        with torch.no_grad():
            pre, depth = prefix_tokens(trie, nodes)
            logits = continuation_logits(model, x, m, torch.zeros_like(nodes), pre)
            logits = logits[nodes, depth]  # next-token logits at every node
        allowed = trie.children_dense(nodes)
        logp = torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), -1)
        score = {0: 0.0}
        for n in range(1, trie.num_nodes):
            score[n] = score[parent[n]] + logp[parent[n], token[n]].item()
        beam = [0]
        for t in range(trie.max_len + 1):
            cand = [n for n in range(1, trie.num_nodes) if parent[n] in beam]
            cand.sort(key=lambda n: -score[n])
            want = score[cand[B - 1]] if len(cand) >= B else float("-inf")
            assert abs(theta[u, t].item() - want) < 1e-4 or want == theta[u, t].item() == -1e999
            beam = [n for n in cand[: 2 * B] if token[n] != EOS][:B]
            if not beam:
                break


@pytest.mark.parametrize("scoring", ["before", "after"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_thresholds_equal_the_thresholds_of_the_real_beam_search(scoring, seed, monkeypatch):
    """θ_t must be the B-th best candidate score at step t of beam_search itself: record it from
    the expansion steps of real beam searches (one user at a time, both length penalties, which
    change when the search stops) and compare with beam_thresholds, one by one and batched.
    The search keeps every live beam here, as Hugging Face's does: θ is defined on that beam;
    the beams beam_search drops change none of its results (see
    test_beams_that_cannot_reach_the_pool_are_not_fed_and_change_nothing), but their
    candidates are missing from its expansion steps."""
    model = tiny_model(seed)
    _, _, trie = build(seed=seed + 1)
    input_ids, mask = prompts(LENGTHS, seed=seed + 2)
    B = 3
    batched = beam_thresholds(model, input_ids, mask, trie, B, scoring)
    expand_beams = bear.decoding.beam.expand_beams
    recorded = []  # the B-th best candidate score of each step of the running beam_search

    def recording_expand_beams(*args, **kwargs):
        step = expand_beams(*args, **kwargs)
        top = step.top[0]
        recorded.append(top[B - 1].item() if top.shape[0] >= B else float("-inf"))
        return step

    def every_live_beam(step, pool_worst, done, alpha):
        return step.alive & ~done[:, None]

    for u, n in enumerate(LENGTHS):
        x, m = input_ids[u : u + 1, -n:], mask[u : u + 1, -n:]  # unpadded single prompt
        theta = beam_thresholds(model, x, m, trie, B, scoring)[0]
        torch.testing.assert_close(batched[u], theta, atol=1e-5, rtol=1e-5)
        for alpha in (0.0, 1.0):
            recorded.clear()
            with monkeypatch.context() as patch:
                patch.setattr(bear.decoding.beam, "expand_beams", recording_expand_beams)
                patch.setattr(bear.decoding.beam, "_beams_that_matter", every_live_beam)
                beam_search(model, x, m, trie, B, scoring, length_penalty=alpha)
            assert len(recorded) >= 2, "the beam search should run past its first step"
            assert theta[: len(recorded)].tolist() == recorded, (u, alpha)


def test_invalid_inputs_raise_clear_errors(setup):
    model, seqs, ids, trie, input_ids, mask = setup
    with pytest.raises(ValueError, match="empty"):
        ItemTrie([], [], EOS)
    with pytest.raises(ValueError, match="exceeds the model's vocabulary"):
        big = ItemTrie([[VOCAB + 3]], [0], EOS)
        beam_search(model, input_ids, mask, big, 2)
    with pytest.raises(ValueError, match="beam_width"):
        beam_search(model, input_ids, mask, trie, 0)
    right = torch.flip(mask, [1])
    with pytest.raises(ValueError, match="left-padded"):
        beam_search(model, input_ids, right, trie, 2)
    with pytest.raises(ValueError, match="sequences but"):
        ItemTrie([[3], [4]], [0], EOS)
    with pytest.raises(ValueError, match="scoring"):
        beam_search(model, input_ids, mask, trie, 2, scoring="middle")
    with pytest.raises(ValueError, match="kv_sharing"):
        beam_search(model, input_ids, mask, trie, 2, kv_sharing="none")
    with pytest.raises(ValueError, match="chain_limit must be an integer >= 1, got 0"):
        beam_search(model, input_ids, mask, trie, 2, chain_limit=0)
    with pytest.raises(TypeError, match="chain_limit"):
        beam_search(model, input_ids, mask, trie, 2, chain_limit=2.5)
    with pytest.raises(ValueError, match="k must"):
        exact_topk(model, input_ids, mask, trie, 0)
    with pytest.raises(ValueError, match="not in the trie"):
        score_items(model, input_ids, mask, trie, torch.full((3, 1), 10**6))


@pytest.mark.parametrize("attn", ["flash_attention_2", "flex_attention", None])
def test_tree_sharing_refuses_attention_that_ignores_or_may_ignore_4d_masks(
    setup, monkeypatch, attn
):
    model, seqs, ids, trie, input_ids, mask = setup
    monkeypatch.setattr(model.config, "_attn_implementation", attn)
    with pytest.raises(ValueError, match="kv_sharing='copy'"):
        beam_search(model, input_ids, mask, trie, 2)


def test_tree_sharing_refuses_a_model_without_a_config(setup):
    model, seqs, ids, trie, input_ids, mask = setup

    class NoConfig(torch.nn.Module):  # a causal LM wrapper that exposes no transformers config
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

    with pytest.raises(ValueError, match="None: unknown"):
        check_tree_attention(NoConfig(model))


@pytest.mark.parametrize("scoring", ["before", "after"])
def test_one_prefill_read_by_every_decoder_gives_their_own_results(setup, scoring):
    """A PromptCache read by beam search (both caches), count_items_above, item_logits and
    score_items gives what each computes from its own prefill, and no reader writes into it
    (score_items overwrites the logits of its own forwards, never the prompt's)."""
    model, seqs, ids, trie, input_ids, mask = setup
    prompt = PromptCache.prefill(model, input_ids, mask)
    fields = ("input_ids", "mask", "last_pos", "logits")
    before = [(k.clone(), v.clone()) for k, v in prompt.layers]
    before_fields = [getattr(prompt, f).clone() for f in fields]
    for sharing in ("tree", "copy"):
        own = beam_search(model, input_ids, mask, trie, 4, scoring, kv_sharing=sharing)
        read = beam_search(model, input_ids, mask, trie, 4, scoring, kv_sharing=sharing,
                           prompt=prompt)  # fmt: skip
        assert torch.equal(read.item_ids, own.item_ids)
        torch.testing.assert_close(read.scores, own.scores, atol=1e-5, rtol=1e-5)
    rows = torch.tensor([2, 0])
    threshold = own.scores[rows, -1] - 0.5
    want = count_items_above(model, input_ids[rows], mask[rows], trie, threshold, 6, scoring)
    got = count_items_above(model, input_ids[rows], mask[rows], trie, threshold, 6, scoring,
                            prompt=prompt.select(rows))  # fmt: skip
    assert torch.equal(got[0], want[0]) and got[1].all()
    items = torch.tensor([ids[0], ids[-1], ids[5]])
    logits, targets, nodes = item_logits(model, prompt, trie, items)
    valid = targets != -100
    longest = max(len(seqs[ids.index(i)]) for i in items.tolist())
    assert longest + 1 < trie.item_tokens(torch.tensor(ids)).shape[1]  # the catalogue's is longer
    assert logits.shape[:2] == targets.shape == nodes.shape == (3, longest + 1)  # EOS included
    if scoring == "before":
        children = trie.children_dense(nodes.clamp(min=0).reshape(-1)).view(*nodes.shape, -1)
        allowed = F.pad(children, (0, VOCAB - trie.vocab_size))
        logits = logits.masked_fill(~allowed, float("-inf"))
    logp = torch.log_softmax(logits.double(), -1).gather(-1, targets.clamp(min=0)[..., None])
    scores = torch.where(valid, logp.squeeze(-1), 0.0).sum(1)
    expected = score_items(model, input_ids, mask, trie, items[:, None], scoring)[:, 0]
    torch.testing.assert_close(scores.float(), expected, atol=1e-4, rtol=1e-4)
    read = score_items(model, input_ids, mask, trie, items[:, None], scoring, prompt=prompt)
    assert torch.equal(read[:, 0], expected)
    for (k, v), (k0, v0) in zip(prompt.layers, before, strict=True):
        assert torch.equal(k, k0) and torch.equal(v, v0)
    for name, old in zip(fields, before_fields, strict=True):
        assert torch.equal(getattr(prompt, name), old), name


def test_the_in_place_target_log_softmax_is_the_out_of_place_one():
    """``_target_log_softmax(in_place=True)`` (score_items' own logits) gives bit for bit what
    `torch.logsumexp` gives, also on rows with +inf, -inf everywhere, NaN or a huge maximum."""
    from bear.decoding.teacher_forcing import _target_log_softmax

    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, 37, generator=g) * 30
    z[1, 5] = float("inf")
    z[2] = float("-inf")
    z[3, 7] = float("nan")
    z[4, 0] = 3e38
    z_y = z[:, 11].clone()
    want = _target_log_softmax(z_y, z)
    got = _target_log_softmax(z_y, z.clone(), in_place=True)
    assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))
    assert torch.equal(got.isnan(), want.isnan()) and want[[1, 2, 3]].isnan().all()


def test_a_prompt_cache_of_other_prompts_is_refused(setup):
    """A PromptCache serves only the prompts it was prefilled from (the same shape is not
    enough); bad prompts and bad item ids name the argument."""
    model, seqs, ids, trie, input_ids, mask = setup
    fewer = PromptCache.prefill(model, input_ids[:2], mask[:2])
    other = PromptCache.prefill(model, input_ids.flip(0), mask.flip(0))  # same shape
    for prompt in (fewer, other):
        with pytest.raises(ValueError, match="prompt: this PromptCache holds other prompts"):
            beam_search(model, input_ids, mask, trie, 4, prompt=prompt)
        with pytest.raises(ValueError, match="prompt: this PromptCache holds other prompts"):
            count_items_above(model, input_ids, mask, trie, torch.zeros(3), 2, prompt=prompt)
    with pytest.raises(ValueError, match="left-padded"):
        PromptCache.prefill(model, input_ids, mask.flip(1))
    prompt = PromptCache.prefill(model, input_ids, mask)
    with pytest.raises(ValueError, match=r"item_ids: expected one integer item id per prompt"):
        item_logits(model, prompt, trie, torch.tensor(ids[:2]))
    with pytest.raises(ValueError, match=r"item_ids: expected one integer item id per prompt"):
        item_logits(model, prompt, trie, torch.tensor([0.5, 1.0, 2.0]))

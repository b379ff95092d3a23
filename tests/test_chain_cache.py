"""ChainKVCache: a new beam's forced chain fed in one forward gives the log-probabilities and the
logits that feeding its title one token at a time gives (SPEC §4)."""

from __future__ import annotations

import pytest
import torch

from bear.decoding.chain_cache import ChainKVCache, forced_chains
from bear.decoding.teacher_forcing import continuation_logits
from bear.trie import ItemTrie
from tests._helpers_decoding import EOS, VOCAB, prompts, tiny_model

# root -> 3 | 5; 3 -> 4 | 10; 3 4 -> 5 | 8 (each then a forced tail); 3 10 ends; 5 ... one chain
TITLES = [[3, 4, 5, 6, 7], [3, 4, 8, 9], [3, 10], [5, 6, 7, 8, 9, 10]]


def _trie():
    return ItemTrie(TITLES, list(range(len(TITLES))), EOS, vocab_size=VOCAB)


def test_a_chain_runs_through_lone_children_and_stops_before_a_branch_or_the_end():
    trie = _trie()
    node = trie.child(torch.tensor([0, 0, 0]), torch.tensor([3, 5, 3]))
    node[2] = trie.child(node[2], 10)
    tokens, nodes, length = forced_chains(trie, node, torch.tensor([3, 5, 10]), limit=8)
    assert length.tolist() == [1, 6, 1]  # 3 branches at once; 5 runs to its title's end
    # K = min(limit, the longest title + EOS) = 7 columns, -1 after each chain's end
    assert tokens.tolist() == [[3] + [-1] * 6, [5, 6, 7, 8, 9, 10, -1], [10] + [-1] * 6]
    assert nodes[1].tolist() == _path(trie, [5, 6, 7, 8, 9, 10]) + [-1]


def _path(trie, tokens):
    node, out = torch.tensor(0), []
    for t in tokens:
        node = trie.child(node, t)
        out.append(int(node))
    return out


def _logp(model, input_ids, mask, user: int, prefix: list[int]) -> torch.Tensor:
    """(V,) log p of the next token after ``prefix`` following prompt ``user``, one sequence."""
    with torch.no_grad():
        logits = continuation_logits(
            model, input_ids, mask, torch.tensor([user]), torch.tensor([prefix])
        )
    return torch.log_softmax(logits[0, len(prefix)], -1)


def _step(kv, src, tokens, prefixes, depth, keep=None):
    """kv.step to the nodes of ``prefixes`` (the same for every user); returns the shapes of the
    forwards it ran."""
    trie, calls = kv.trie, []
    U = kv.prompt_mask.shape[0] if keep is None else keep.shape[0]
    node = torch.tensor([[_path(trie, p)[-1] for p in prefixes]] * U)
    hook = kv.model.register_forward_hook(
        lambda _m, _a, kw, _o: calls.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    try:
        with torch.no_grad():
            kv.step(torch.tensor([src] * U), torch.tensor([tokens] * U), node, depth, keep)
    finally:
        hook.remove()
    return calls


def test_after_scoring_chains_give_the_log_probabilities_of_one_token_at_a_time():
    """Two steps by hand, a user leaving between them: the forced log p of each chain token and
    the log-probabilities kept where chains branch equal teacher forcing of the same titles."""
    model, trie = tiny_model(), _trie()
    input_ids, mask = prompts([5, 3, 4])
    kv = ChainKVCache(model, input_ids, mask, trie, "after", None, limit=8)
    assert _step(kv, [0, 0], [3, 5], [[3], [5]], 1) == [(3, 7)]  # 3, then 5 6 7 8 9 10
    is_forced, lp = kv.forced()
    assert is_forced.tolist() == [[False, True]] * 3  # 3 branches; 5 is a forced chain
    tail = [5, 6, 7, 8, 9, 10, EOS]
    for u in range(3):
        want = _logp(model, input_ids, mask, u, [3])
        torch.testing.assert_close(kv.rows[u, 0], want, atol=1e-5, rtol=0)  # log-probabilities
        expected = [float(_logp(model, input_ids, mask, u, tail[: i + 1])[tail[i + 1]])
                    for i in range(6)]  # fmt: skip
        got = kv.ahead[u, 1, : int(kv.length[u, 1])].tolist()
        assert got == pytest.approx(expected, abs=1e-5)
    # users 0 and 2 stay: beam 0 (at 3) splits into 3 4 (branches) and 3 10 (ends), beam 1 moves
    # one step down its chain without being fed
    calls = _step(kv, [0, 0, 1], [4, 10, 6], [[3, 4], [3, 10], [5, 6]], 2, torch.tensor([0, 2]))
    assert calls == [(2, 2)]
    is_forced, lp = kv.forced()
    assert is_forced.tolist() == [[False, True, True]] * 2
    for row, u in enumerate([0, 2]):
        want = _logp(model, input_ids, mask, u, [3, 4])
        torch.testing.assert_close(kv.rows[row, 0], want, atol=1e-5, rtol=0)
        end = float(_logp(model, input_ids, mask, u, [3, 10])[EOS])
        seven = float(_logp(model, input_ids, mask, u, [5, 6])[7])
        assert lp[row].tolist()[1:] == pytest.approx([end, seven], abs=1e-5)


def test_before_scoring_feeds_a_path_only_where_it_branches():
    """ "before": a lone child's log p is 0, so nothing is fed down a chain until a node with
    several children, where the chain's tokens go in at once; a title's unshared tail is never
    fed. Titles 3 | 5 6 7 8 9 | 5 6 7 8 11: 3 ends at once, 5 ... 8 branches at depth 4."""
    model = tiny_model()
    trie = ItemTrie([[3], [5, 6, 7, 8, 9], [5, 6, 7, 8, 11]], [0, 1, 2], EOS, vocab_size=VOCAB)
    input_ids, mask = prompts([5, 3])
    kv = ChainKVCache(model, input_ids, mask, trie, "before", None, limit=1)
    forwards = _step(kv, [0, 0], [3, 5], [[3], [5]], 1)
    is_forced, lp = kv.forced()
    assert is_forced.tolist() == [[True, True]] * 2 and not lp.any()  # 3 -> EOS, 5 -> 6
    for depth in (2, 3, 4):  # beam 1 alone walks on (beam 0's EOS left for the finished pool)
        forwards += _step(
            kv, [int(depth == 2)], [[5, 6, 7, 8][depth - 1]], [[5, 6, 7, 8][:depth]], depth
        )
        is_forced, lp = kv.forced()
        assert is_forced.tolist() == [[depth < 4]] * 2 and not lp.any()
    assert forwards == [(2, 4)]  # once, at depth 4: 5 6 7 8
    for u in range(2):
        want = _logp(model, input_ids, mask, u, [5, 6, 7, 8])
        torch.testing.assert_close(torch.log_softmax(kv.rows[u, 0], -1), want, atol=1e-5, rtol=0)


def test_a_chain_cut_at_the_limit_goes_on_in_a_later_forward():
    """ "after", limit=2 down the six-token chain 5 ... 10: forwards at depths 1, 3 and 5 only,
    and every forced log p (EOS last) that of teacher forcing."""
    model, trie = tiny_model(), _trie()
    input_ids, mask = prompts([4, 6])
    kv = ChainKVCache(model, input_ids, mask, trie, "after", None, limit=2)
    title, fed, got = [5, 6, 7, 8, 9, 10], [], []
    for depth in range(1, 7):
        if _step(kv, [0], title[depth - 1 : depth], [title[:depth]], depth):
            fed.append(depth)
        is_forced, lp = kv.forced()
        assert is_forced.all()
        got.append(lp[:, 0])
    assert fed == [1, 3, 5]
    tail = title + [EOS]
    for u in range(2):
        want = [float(_logp(model, input_ids, mask, u, tail[: i + 1])[tail[i + 1]])
                for i in range(6)]  # fmt: skip
        assert [float(x[u]) for x in got] == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize(("users", "fed_at"), [(2, [1, 3, 5]), (1, [1, 5])])
def test_a_budget_feeds_few_chains_further_ahead(users, fed_at):
    """limit=1, budget=4: a forward of N chains gives each max(1, 4 // N) tokens. Down the
    six-token chain 5 ... 10, two users (two chains a forward, two tokens each) are fed at depths
    1, 3 and 5, one user (four tokens) at depths 1 and 5; every forced log p (EOS last) is that
    of teacher forcing either way."""
    model, trie = tiny_model(), _trie()
    input_ids, mask = prompts([4, 6][:users])
    kv = ChainKVCache(model, input_ids, mask, trie, "after", None, limit=1, budget=4)
    title, fed, got = [5, 6, 7, 8, 9, 10], [], []
    for depth in range(1, 7):
        if _step(kv, [0], title[depth - 1 : depth], [title[:depth]], depth):
            fed.append(depth)
        got.append(kv.forced()[1][:, 0])
    assert fed == fed_at
    tail = title + [EOS]
    for u in range(users):
        want = [float(_logp(model, input_ids, mask, u, tail[: i + 1])[tail[i + 1]])
                for i in range(6)]  # fmt: skip
        assert [float(x[u]) for x in got] == pytest.approx(want, abs=1e-5)

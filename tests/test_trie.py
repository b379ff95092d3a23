"""ItemTrie: hand-built cases, a dict-trie oracle on a random catalogue, the bitmask layout."""

import pytest
import torch

from bear.trie import ItemTrie

EOS = 2


def _bits(mask_row: torch.Tensor, vocab: int) -> set[int]:
    """Decode one SPEC §2 bitmask row: j allowed iff (mask[j // 32] >> (j % 32)) & 1."""
    return {j for j in range(vocab) if (int(mask_row[j // 32]) >> (j % 32)) & 1}


def test_hand_built_trie():
    # items: 10 = [5, 6], 3 = [5], 4 = [5, 6] (same title as 10), 1 = [7, 8, 9]
    trie = ItemTrie([[5, 6], [5], [5, 6], [7, 8, 9]], [10, 3, 4, 1], EOS, vocab_size=40)
    assert trie.num_items == 4 and trie.num_leaves == 3
    assert trie.canonical(torch.tensor([10, 3, 4, 1])).tolist() == [4, 3, 4, 1]
    root = trie.children_dense(torch.tensor([0]))[0].nonzero().view(-1).tolist()
    assert root == [5, 7]
    n5 = int(trie.child(torch.tensor(0), torch.tensor(5)))
    # [5] is a prefix of [5, 6]: its inner node has an explicit EOS child
    assert trie.children_dense(torch.tensor([n5]))[0].nonzero().view(-1).tolist() == [EOS, 6]
    assert int(trie.child(torch.tensor(0), torch.tensor(6))) == -1
    assert trie.item_tokens(torch.tensor([3, 1])).tolist() == [
        [5, EOS, -100, -100],
        [7, 8, 9, EOS],
    ]
    paths = trie.path_nodes(torch.tensor([3, 1]))
    assert paths[0].tolist()[:2] == [0, n5] and paths[0, 2:].tolist() == [-1, -1]
    # walking the path with the item's tokens reaches the leaf of the canonical id
    node = torch.tensor(0)
    for tok in [7, 8, 9, EOS]:
        node = trie.child(node, torch.tensor(tok))
    assert int(trie.leaf_item[node]) == 1


def test_trie_matches_a_dict_oracle():
    g = torch.Generator().manual_seed(0)
    seqs = [
        torch.randint(3, 9, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        for _ in range(300)
    ]
    ids = list(range(1000, 1300))
    trie = ItemTrie(seqs, ids, EOS, vocab_size=70)
    oracle, canon = {}, {}
    for s, i in zip(seqs, ids, strict=True):
        for t in range(len(s) + 1):
            oracle.setdefault(tuple(s[:t]), set()).add(s[t] if t < len(s) else EOS)
        canon.setdefault(tuple(s), i)  # ids ascend, so the first is the smallest
    assert trie.num_leaves == len(canon)
    assert trie.canonical(torch.tensor(ids)).tolist() == [canon[tuple(s)] for s in seqs]
    nodes = trie.path_nodes(torch.tensor(ids))  # (M, L+1)
    toks = trie.item_tokens(torch.tensor(ids))
    masks = trie.allowed_mask(nodes.reshape(-1)).view(len(ids), nodes.shape[1], -1)
    for m, s in enumerate(seqs):
        assert toks[m, : len(s) + 1].tolist() == s + [EOS]
        for t in range(len(s) + 1):
            assert _bits(masks[m, t], 70) == oracle[tuple(s[:t])]
        assert (nodes[m, len(s) + 1 :] == -1).all() and (masks[m, len(s) + 1 :] == 0).all()
    # CSR children are contiguous and sorted by token
    ptr, tok = trie.child_ptr, trie.child_token
    for n in range(trie.num_nodes):
        c = tok[ptr[n] : ptr[n + 1]]
        assert (c[1:] > c[:-1]).all()


def test_allowed_mask_bit_layout_and_sign_bit():
    # tokens 31 and 63 sit on the int32 sign bit; vocab 70 leaves a partial last word
    trie = ItemTrie([[31], [63], [69], [0]], [0, 1, 2, 3], EOS, vocab_size=70)
    mask = trie.allowed_mask(torch.tensor([0, -1]))
    assert mask.dtype == torch.int32 and mask.shape == (2, 3)
    assert _bits(mask[0], 70) == {0, 31, 63, 69}
    assert mask[0, 0].item() == -(2**31) + 1  # bits 0 and 31
    assert (mask[1] == 0).all()  # node -1: no token allowed


def test_to_device_keeps_everything():
    trie = ItemTrie([[3, 4], [3]], [1, 2], EOS)
    same = trie.to("cpu")
    assert same.num_nodes == trie.num_nodes and same.device.type == "cpu"
    assert trie.vocab_size == 5  # max token id + 1


@pytest.mark.parametrize(
    "args, match",
    [
        (([], [], EOS), "empty"),
        (([[3]], [0, 1], EOS), "sequences but"),
        (([[3], [4]], [1, 1], EOS), "distinct"),
        (([[3]], [-1], EOS), "non-negative"),
        (([[3, -4]], [0], EOS), "non-negative"),
        (([[3, EOS, 4]], [0], EOS), "contains eos"),
        (([[3, 9]], [0], EOS, 8), "vocab_size=8"),
    ],
)
def test_bad_catalogues_raise(args, match):
    with pytest.raises(ValueError, match=match):
        ItemTrie(*args)


def test_unknown_item_ids_raise():
    trie = ItemTrie([[3]], [5], EOS)
    with pytest.raises(ValueError, match="not in the trie"):
        trie.path_nodes(torch.tensor([6]))


def test_node_arrays_are_int32_and_cost_at_most_32_bytes_per_node():
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 500, (int(n),), generator=gen).tolist() for n in
            torch.randint(1, 12, (3000,), generator=gen)]  # fmt: skip
    trie = ItemTrie(seqs, range(len(seqs)), EOS, vocab_size=500)
    for name in ("node_parent", "node_token", "node_depth", "leaf_item", "child_ptr"):
        assert getattr(trie, name).dtype == torch.int32, name
    assert trie.child_token.data_ptr() == trie.node_token[1:].data_ptr()  # a view, not a copy
    assert trie.canonical(torch.tensor([0, 1])).dtype == torch.int64  # what users get stays int64
    held = sum(getattr(trie, name).nbytes for name in trie._TENSORS)
    assert held / trie.num_nodes <= 32
    moved = trie.to("meta")
    assert (
        moved.child_token.device.type == "meta"
        and moved.child_token.shape == trie.child_token.shape
    )


def test_item_ids_past_int32_keep_their_value():
    from bear.decoding.common import ranked_result

    ids = [2**40, 3, 2**31]
    trie = ItemTrie([[5, 6], [5], [7]], ids, EOS, vocab_size=10)
    assert trie.leaf_item.dtype == torch.int64
    assert trie.canonical(torch.tensor(ids)).tolist() == ids
    assert trie.canonical(torch.tensor([3])).dtype == torch.int64
    leaves = trie.path_nodes(torch.tensor(ids))  # walk to each leaf: the node after EOS
    leaf = torch.stack(
        [trie.child(leaves[m, len(s)], EOS) for m, s in enumerate([[5, 6], [5], [7]])]
    )
    result = ranked_result(trie, leaf[None], torch.tensor([[-1.0, -2.0, -3.0]]))
    assert result.item_ids.dtype == torch.int64 and result.item_ids.tolist() == [ids]

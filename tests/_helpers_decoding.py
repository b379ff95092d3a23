"""Shared fixtures for the decoding tests: a tiny random Llama and a random catalogue."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bear.trie import ItemTrie

VOCAB = 61  # odd on purpose: the bitmask's last word is partial
EOS, PAD = 2, 0
FIRST_TOKEN = 3  # item tokens live in [FIRST_TOKEN, ITEM_TOKENS)
ITEM_TOKENS = 11  # a small alphabet so items share prefixes


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=EOS,
        pad_token_id=PAD,
        bos_token_id=1,
    )
    model = LlamaForCausalLM(cfg).eval()
    # Sharpen the random model a little so that rankings are far from ties.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def random_catalogue(num: int, seed: int = 1, max_len: int = 4):
    """Random item sequences with shared prefixes, one item that is a prefix of another and one
    duplicate title; returns (sequences, item_ids)."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for _ in range(num):
        n = int(torch.randint(1, max_len + 1, (1,), generator=g))
        seqs.append(torch.randint(FIRST_TOKEN, ITEM_TOKENS, (n,), generator=g).tolist())
    long = next(s for s in seqs if len(s) >= 2)
    seqs.append(long[:-1])  # an item that is a prefix of another item
    seqs.append(list(seqs[0]))  # a duplicate title
    ids = (torch.randperm(len(seqs), generator=g) * 3 + 5).tolist()  # non-contiguous ids
    return seqs, ids


def prompts(lengths, seed: int = 2):
    """Left-padded prompts of the given lengths: (U, P) ids and mask."""
    g = torch.Generator().manual_seed(seed)
    P = max(lengths)
    ids = torch.full((len(lengths), P), PAD, dtype=torch.int64)
    mask = torch.zeros(len(lengths), P, dtype=torch.int64)
    for u, n in enumerate(lengths):
        ids[u, P - n :] = torch.randint(ITEM_TOKENS, VOCAB, (n,), generator=g)
        mask[u, P - n :] = 1
    return ids, mask


def with_shared_head(input_ids, mask, head: int):
    """The left-padded prompts with their first ``head`` real tokens made equal to the first
    prompt's (a template's instruction)."""
    input_ids = input_ids.clone()
    start = input_ids.shape[1] - mask.sum(1)
    for u in range(input_ids.shape[0]):
        input_ids[u, start[u] : start[u] + head] = input_ids[0, start[0] : start[0] + head]
    return input_ids


def build(num: int = 40, seed: int = 1):
    seqs, ids = random_catalogue(num, seed)
    return seqs, ids, ItemTrie(seqs, ids, EOS, vocab_size=VOCAB)


def prefix_tokens(trie: ItemTrie, nodes: torch.Tensor):
    """Tokens from the root to each node (the reference simulation's teacher-forcing input).

    Args:
        nodes: (R,) trie node ids.

    Returns:
        tokens (R, D) left-aligned, -1 padded (D = the deepest node's depth, at least 1), and
        depth (R,).
    """
    depth = trie.node_depth[nodes]
    D = int(depth.max()) if nodes.numel() else 0
    out = torch.full((nodes.shape[0], max(D, 1)), -1, dtype=torch.int64, device=nodes.device)
    rows = torch.arange(nodes.shape[0], device=nodes.device)
    cur = nodes
    for _ in range(D):
        d = trie.node_depth[cur]
        live = d > 0
        out[rows[live], d[live] - 1] = trie.node_token[cur[live]].long()
        cur = torch.where(live, trie.node_parent[cur].clamp(min=0), cur)
    return out, depth

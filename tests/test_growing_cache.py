"""bear.decoding.growing_cache: a KV cache appended to in spare room, not copied whole."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from bear.decoding import beam_cache, beam_search, chain_cache
from bear.decoding.growing_cache import GrowingLayer, growing_cache
from bear.decoding.prompt_cache import PromptCache
from tests._helpers_decoding import build, prompts, tiny_model


def _kv(U=3, H=2, S=5, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(U, H, S, d, generator=g), torch.randn(U, H, S, d, generator=g)


def test_updates_equal_concatenation_and_reallocate_only_when_full():
    """Five updates of 1-6 positions give the keys and values `torch.cat` gives; the buffers are
    replaced only when the update does not fit, by buffers of max(S + T, 2 S) positions."""
    k0, v0 = _kv()
    layer, want_k, want_v = GrowingLayer(k0, v0), k0, v0
    buffers, capacities = set(), []
    for i, T in enumerate([1, 3, 6, 2, 2]):
        k, v = _kv(S=T, seed=i + 1)
        before = layer._key_buffer
        full = before is None or layer.get_seq_length() + T > before.shape[2]
        got_k, got_v = layer.update(k, v)
        want_k, want_v = torch.cat([want_k, k], 2), torch.cat([want_v, v], 2)
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
        assert torch.equal(layer.keys, want_k) and layer.get_seq_length() == want_k.shape[2]
        assert (layer._key_buffer is not before) == full
        buffers.add(layer._key_buffer.data_ptr())
        capacities.append(layer._key_buffer.shape[2])
    assert capacities == [10, 10, 18, 18, 34] and len(buffers) == 3  # max(S + T, 2 S)


def test_the_tensors_it_was_given_are_never_written():
    """A prompt cache's entries are handed to the layer as they are: updates write into buffers
    of the layer's own, so the given tensors keep their values."""
    k0, v0 = _kv()
    saved = k0.clone(), v0.clone()
    layer = GrowingLayer(k0, v0)
    layer.update(*_kv(S=2, seed=1))
    assert layer.keys.data_ptr() != k0.data_ptr()
    assert torch.equal(k0, saved[0]) and torch.equal(v0, saved[1])


def test_selecting_rows_keeps_their_entries_and_room():
    k0, v0 = _kv(U=4)
    layer = GrowingLayer(k0, v0)
    k1, v1 = _kv(U=4, S=2, seed=1)
    layer.update(k1, v1)
    capacity = layer._key_buffer.shape[2]
    rows = torch.tensor([3, 1])
    layer.batch_select_indices(rows)
    assert torch.equal(layer.keys, torch.cat([k0, k1], 2)[rows])
    assert torch.equal(layer.values, torch.cat([v0, v1], 2)[rows])
    assert layer._key_buffer.shape[2] == capacity
    k2, v2 = _kv(U=2, S=1, seed=2)
    layer.update(k2, v2)
    assert torch.equal(layer.keys, torch.cat([torch.cat([k0, k1], 2)[rows], k2], 2))


def test_keys_replaced_by_a_parent_method_are_copied_into_new_buffers():
    """`DynamicLayer.crop` (or any method that reassigns ``keys``) leaves tensors that are not
    the buffers' views: the next update starts buffers from them and writes nothing else."""
    k0, v0 = _kv(S=6)
    layer = GrowingLayer(k0, v0)
    layer.update(*_kv(S=2, seed=1))
    layer.crop(-3)  # keeps the first 5 positions
    k, v = _kv(S=1, seed=2)
    layer.update(k, v)
    assert torch.equal(layer.keys, torch.cat([k0[:, :, :5], k], 2))
    assert torch.equal(layer.values, torch.cat([v0[:, :, :5], v], 2))


def test_growing_cache_swaps_dynamic_layers_only():
    cache = DynamicCache()
    for i in range(2):
        cache.update(*_kv(seed=i), i)

    class Other(DynamicLayer):
        pass

    other = Other()
    cache.layers.append(other)
    same = growing_cache(cache)
    assert same is cache
    assert [type(layer) for layer in cache.layers] == [GrowingLayer, GrowingLayer, Other]
    assert torch.equal(cache.layers[1].keys, _kv(seed=1)[0]) and cache.get_seq_length() == 5


@pytest.mark.parametrize("scoring", ["before", "after"])
def test_beam_search_grows_its_cache_and_decodes_as_with_concatenation(scoring, monkeypatch):
    """The tree caches run on GrowingLayer layers (the cache is not copied whole at each
    forward) and return what plain DynamicLayer layers return; a PromptCache read by the search
    is left as it was."""
    model = tiny_model()
    _, _, trie = build(60, seed=3)
    ids, mask = prompts([5, 9, 7, 3], seed=5)
    prompt = PromptCache.prefill(model, ids, mask)
    saved = [k.clone() for k, _ in prompt.layers]
    seen = []
    real = chain_cache.growing_cache

    def spy(cache):
        out = real(cache)
        seen.append(out)
        return out

    monkeypatch.setattr(chain_cache, "growing_cache", spy)
    grown = beam_search(model, ids, mask, trie, 5, scoring, prompt=prompt)
    assert len(seen) == 1
    assert all(type(layer) is GrowingLayer for layer in seen[0].layers)
    assert all(torch.equal(k, s) for (k, _), s in zip(prompt.layers, saved, strict=True))
    monkeypatch.setattr(chain_cache, "growing_cache", lambda cache: cache)
    plain = beam_search(model, ids, mask, trie, 5, scoring, prompt=prompt)
    assert torch.equal(grown.item_ids, plain.item_ids)
    torch.testing.assert_close(grown.scores, plain.scores, rtol=0, atol=1e-5)


def test_the_token_tree_cache_grows_too():
    """TreeKVCache (one cache row per user, one token per beam and step) is grown as well."""
    model = tiny_model()
    ids, mask = prompts([5, 9], seed=5)
    kv = beam_cache.TreeKVCache(model, ids, mask)
    assert all(type(layer) is GrowingLayer for layer in kv.cache.layers)

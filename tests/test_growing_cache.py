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
    replaced only when the update does not fit, their room doubling with what was appended (not
    with the 5 positions the layer started from)."""
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
    # S + T + max(T, positions appended since the first buffers): 6 + 1, 9 + 4, 15 + 10
    assert capacities == [7, 13, 25, 25, 25] and len(buffers) == 3


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
    """`DynamicLayer.batch_repeat_interleave` (like any method that reassigns ``keys``) leaves
    tensors that are not the buffers' views: the next update copies them into new buffers and
    writes nothing into them. `crop` leaves a prefix view of the buffers, which stay in use."""
    k0, v0 = _kv(U=2, S=4)
    layer = GrowingLayer(k0, v0)
    layer.update(*_kv(U=2, S=1, seed=1))
    layer.crop(-2)  # the first 3 positions: still the buffers' view
    assert layer._owns_views() and layer.get_seq_length() == 3
    layer.batch_repeat_interleave(2)  # (4, H, 3, d), new tensors
    repeated, buffer = layer.keys.clone(), layer._key_buffer
    k, v = _kv(U=4, S=1, seed=2)
    layer.update(k, v)
    assert layer._key_buffer is not buffer and layer._owns_views()
    assert torch.equal(layer.keys, torch.cat([repeated, k], 2))
    assert torch.equal(layer.keys[:, :, :3], k0[:, :, :3].repeat_interleave(2, dim=0))


def test_an_update_of_another_shape_or_dtype_behaves_as_concatenation():
    """Rows that do not match are refused as `torch.cat` refuses them; another dtype is
    concatenated as `DynamicLayer` does (the layer then starts new buffers)."""
    layer = GrowingLayer(*_kv(U=3))
    layer.update(*_kv(U=3, S=1, seed=1))
    with pytest.raises(RuntimeError):
        layer.update(*_kv(U=1, S=1, seed=2))
    k, v = (t.double() for t in _kv(U=3, S=1, seed=3))
    got, _ = layer.update(k, v)
    assert got.dtype == torch.float64 and got.shape[2] == 7


def test_a_reset_layer_behaves_as_a_reset_dynamic_layer():
    """`reset` (transformers 5.x: drops the entries; 4.x: zeroes them) then two updates give
    what the same calls give on a `DynamicLayer`."""
    k0, v0 = _kv()
    plain, grown = DynamicLayer(), GrowingLayer(k0, v0)
    plain.update(k0, v0)
    for layer in (plain, grown):
        layer.update(*_kv(S=2, seed=1))
        layer.reset()
        for i in range(2):
            layer.update(*_kv(S=2, seed=2 + i))
    assert grown.get_seq_length() == plain.get_seq_length()
    assert torch.equal(grown.keys, plain.keys) and torch.equal(grown.values, plain.values)


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

"""bear.decoding.grouped_attention: grouped-query sdpa without repeated keys and values."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from bear.decoding import beam_search
from bear.decoding import grouped_attention as ga
from tests._helpers_decoding import build, prompts, tiny_model


class _Layer(torch.nn.Module):
    """What the attention functions read of a layer: its groups, whether it trains."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def _qkv(U=3, Hk=2, g=3, T=5, S=11, d=4):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(U, Hk * g, T, d, generator=gen, dtype=torch.float64)
    k = torch.randn(U, Hk, S, d, generator=gen, dtype=torch.float64)
    v = torch.randn(U, Hk, S, d, generator=gen, dtype=torch.float64)
    return q, k, v


def _mask(shape, kind: str):
    """A 4-D mask of that shape with about a third of the entries masked and every row keeping
    its first key (a fully masked row is NaN in either function)."""
    keep = torch.rand(shape, generator=torch.Generator().manual_seed(1)) > 0.33
    keep[..., 0] = True
    if kind == "bool":
        return keep
    return torch.zeros(shape, dtype=torch.float64).masked_fill(
        ~keep, torch.finfo(torch.float64).min
    )


@pytest.mark.parametrize("kind", ["float", "bool"])
@pytest.mark.parametrize("heads", ["shared", "per head"])
@pytest.mark.parametrize("g", [1, 3])
def test_grouped_sdpa_equals_transformers_sdpa(kind, heads, g):
    q, k, v = _qkv(g=g)
    U, H, T, _ = q.shape
    S = k.shape[2]
    mask = _mask((U, 1 if heads == "shared" else H, T, S), kind)
    layer = _Layer(g)
    want, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](layer, q, k, v, mask, scaling=0.5)
    got, weights = ga.grouped_sdpa(layer, q, k, v, mask, scaling=0.5)
    assert weights is None
    assert got.shape == (U, T, H, v.shape[-1])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_grouped_sdpa_without_a_mask_is_transformers_sdpa():
    q, k, v = _qkv(T=4, S=4)
    layer = _Layer(3)
    want, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](layer, q, k, v, None)
    got, _ = ga.grouped_sdpa(layer, q, k, v, None)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_a_mask_wider_than_the_keys_goes_to_transformers_sdpa_as_it_is(monkeypatch):
    """Which columns such a mask means is the installed transformers' call (4.x cuts it to the
    keys, 5.x refuses it), so it is handed on untouched."""
    q, k, v = _qkv()
    mask = _mask((q.shape[0], 1, q.shape[2], k.shape[2] + 2), "float")
    seen = []
    monkeypatch.setitem(
        AttentionInterface._global_mapping, "sdpa", lambda *args, **kw: seen.append(args[4])
    )
    ga.grouped_sdpa(_Layer(3), q, k, v, mask)
    assert len(seen) == 1 and seen[0] is mask


def _implementation(model) -> str:
    return model.config.get_text_config()._attn_implementation


def test_an_sdpa_model_runs_grouped_inside_the_block_and_plain_after_it():
    model = tiny_model()
    assert _implementation(model) == "sdpa"
    with ga.grouped_attention(model):
        assert _implementation(model) == ga.GROUPED_SDPA
        with ga.grouped_attention(model):  # nested: the outer block restores
            assert _implementation(model) == ga.GROUPED_SDPA
        assert _implementation(model) == ga.GROUPED_SDPA
    assert _implementation(model) == "sdpa"
    with pytest.raises(RuntimeError, match="inside"):
        with ga.grouped_attention(model):
            raise RuntimeError("inside")
    assert _implementation(model) == "sdpa"


def test_an_eager_model_is_left_as_it_is():
    model = tiny_model()
    model.config._attn_implementation = "eager"
    with ga.grouped_attention(model):
        assert _implementation(model) == "eager"
    assert _implementation(model) == "eager"


def test_beam_search_attends_through_the_grouped_function_and_decodes_the_same(monkeypatch):
    """The tree cache's forwards of a grouped-query model (4 heads, 2 key/value heads) go through
    grouped_sdpa, packed, and the search returns what the copied cache (one row per beam, no 4-D
    mask) returns."""
    model = tiny_model()
    _, _, trie = build(60, seed=3)
    ids, mask = prompts([5, 9, 7, 3], seed=5)
    calls, shapes = [], []  # per grouped call: (T, its sdpa ran packed); sdpa's query shapes
    real, real_sdpa = ga.grouped_sdpa, torch.nn.functional.scaled_dot_product_attention

    def sdpa(query, *args, **kwargs):
        shapes.append(tuple(query.shape))
        return real_sdpa(query, *args, **kwargs)

    def spy(module, query, key, value, attention_mask, *args, **kwargs):
        first = len(shapes)
        out = real(module, query, key, value, attention_mask, *args, **kwargs)
        U, _, T, d = query.shape
        calls.append((T, shapes[first:] == [(U, key.shape[1], 2 * T, d)]))  # g = 4 / 2
        return out

    monkeypatch.setattr(ga, "grouped_sdpa", spy)  # what grouped_attention registers
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    tree = beam_search(model, ids, mask, trie=trie, beam_width=5, scoring="after")
    assert any(T > 1 for T, _ in calls) and all(packed for _, packed in calls)
    calls.clear()
    copy = beam_search(
        model, ids, mask, trie=trie, beam_width=5, scoring="after", kv_sharing="copy"
    )
    assert not calls
    assert torch.equal(tree.item_ids, copy.item_ids)
    torch.testing.assert_close(tree.scores, copy.scores, rtol=0, atol=1e-5)
    assert _implementation(model) == "sdpa"

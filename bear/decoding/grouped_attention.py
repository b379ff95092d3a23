"""Grouped-query attention under a 4-D mask without copying keys and values per query head.

A grouped-query model (SmolLM2, Llama 3, Qwen 2: Hk key/value heads shared by H = g * Hk query
heads) attends under Hugging Face's "sdpa" implementation on a CPU or a CUDA device with
``repeat_kv`` whenever a mask is given (transformers 4.x: always; 5.x: unless one token is fed):
the keys and values of the whole cache are copied g times, every layer, every forward. The tree
caches (`bear.decoding.chain_cache`, `beam_cache`) feed several tokens per user under a 4-D mask
at every step, so they pay those copies at every step (without them, beam search with
SmolLM2-135M on a 2-core CPU took 61.6 and 62.1 s for 32 Office users against 67.1 and 68.5 s
in two interleaved runs: benchmarks/README, "A pretrained model").

Query head h reads key/value head h // g, so the g query heads of one key/value head can be laid
end to end as g * T queries of that head, the mask repeated for each:

    q (U, H, T, d) -> (U, Hk, g*T, d),   mask (U, 1, T, S) -> (U, 1, g*T, S),
    out = sdpa(q, k, v, mask) (U, Hk, g*T, dv) -> (U, H, T, dv)

which is the same attention, row for row, reading each key/value head once (transformers 5.x
does the same for one fed token). `grouped_attention(model)` runs the model's forwards under this
function, registered with transformers' public `AttentionInterface` (and the "sdpa" mask builder
under the same name); any other call (no 4-D mask, one query head per key/value head, a mask of
another width than the keys, a position bias or a softcap) goes to transformers' own "sdpa"
function unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

__all__ = ["GROUPED_SDPA", "grouped_attention", "grouped_sdpa"]

GROUPED_SDPA = "bear_grouped_sdpa"  # the name registered with transformers' AttentionInterface
PLAIN_SDPA = "sdpa"  # the implementation it stands in for


def grouped_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Scaled dot-product attention of a grouped-query layer, its query heads packed per
    key/value head (module docstring); transformers' "sdpa" function where that does not apply.

    softmax(q k^T * scaling + mask) v for every query head h against key/value head h // g; a
    4-D mask makes ``is_causal`` moot (transformers' sdpa drops it too).

    Args:
        module: the attention layer (``num_key_value_groups`` = g, 1 when absent).
        query: (U, H, T, d); key (U, Hk, S, d), value (U, Hk, S, dv) with H = g * Hk.
        attention_mask: (U or 1, 1 or H, T, S) additive float or boolean (True: attend) mask;
            anything else goes to transformers' "sdpa" as it is.
        dropout, scaling: as `torch.nn.functional.scaled_dot_product_attention`'s dropout_p and
            scale.

    Returns:
        (out (U, T, H, dv), None), as transformers' attention functions return.
    """
    g = getattr(module, "num_key_value_groups", 1)
    U, H, T, d = query.shape
    Hk, S = key.shape[1], key.shape[2]
    packable = (
        g > 1
        and H == g * Hk
        and attention_mask is not None
        and attention_mask.dim() == 4
        and attention_mask.shape[1] in (1, H)
        and attention_mask.shape[2:] == (T, S)
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
    )
    if not packable:
        plain = ALL_ATTENTION_FUNCTIONS[PLAIN_SDPA]
        return plain(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    b = attention_mask.shape[0]
    if attention_mask.shape[1] == 1:
        mask = attention_mask[:, :, None].expand(b, 1, g, T, S).reshape(b, 1, g * T, S)
    else:
        mask = attention_mask.reshape(b, Hk, g * T, S)
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(U, Hk, g * T, d),  # (U, Hk, g*T, d): head h = k*g + r is row block r
        key,
        value,
        attn_mask=mask,
        dropout_p=dropout,
        scale=scaling,
    )
    return out.reshape(out.shape[0], H, T, value.shape[-1]).transpose(1, 2).contiguous(), None


def _register() -> None:
    """Register this module's `grouped_sdpa` (and "sdpa"'s mask builder) under GROUPED_SDPA,
    again on every call (another copy of this module, a before/after benchmark's, may have
    registered its own)."""
    AttentionInterface.register(GROUPED_SDPA, grouped_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GROUPED_SDPA, ALL_MASK_ATTENTION_FUNCTIONS[PLAIN_SDPA])


@contextmanager
def grouped_attention(model):
    """Run the model's forwards inside the block under `grouped_sdpa`.

    Only a model whose text config records "sdpa" is switched (its
    ``config.get_text_config()._attn_implementation``, the public switch transformers reads at
    every forward), and it is switched back to "sdpa" on leaving the block, also on an error.
    Any other implementation, a model already switched (a nested or concurrent block: the outer
    one restores it, and a forward still running in another thread then finishes under plain
    sdpa, the same attention to rounding) runs as it is.
    """
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    if text is None or getattr(text, "_attn_implementation", None) != PLAIN_SDPA:
        yield
        return
    _register()
    text._attn_implementation = GROUPED_SDPA
    try:
        yield
    finally:
        text._attn_implementation = PLAIN_SDPA

"""A prompt's KV cache for the decoders: one prefill, read by any number of searches (SPEC §4).

`prefill` runs left-padded prompts once (the first tokens every prompt shares, a template's
instruction, run once for all); a `PromptCache` holds its entries so that a full test's beam
search, teacher forcing and exact count read one prefill. The other caches build on it:
`bear.decoding.beam_cache` (the beams of a search) and `bear.decoding.prefix_cache` (prefixes
extended in any order). Only public cache API is used (`Cache.batch_select_indices`,
`Cache.update`, the layers' `keys` and `values`); no private Hugging Face method is overridden.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from bear.decoding.common import check_prompt_ids

__all__ = [
    "PromptCache",
    "cache_kwarg",
    "keeps_logits",
    "layer_tensors",
    "output_cache",
    "prefill",
    "prefilled",
    "shared_head_length",
]


def cache_kwarg(model) -> str:
    """Name of the KV-cache argument of `model.forward` (`cache` since transformers 5.x), read
    from the base model of a peft model (whose forward takes **kwargs and passes them on: its own
    signature names neither, and the old name is deprecated by the base model)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out):
    """The KV cache a forward pass returned, under either transformers name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def keeps_logits(model) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (Hugging Face causal LMs: an int, the
    last positions, or a tensor of positions). A peft model passes it on to its base model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def shared_head_length(input_ids: torch.Tensor, mask: torch.Tensor) -> int:
    """The number of first tokens every left-padded prompt shares (a prompt template's
    instruction), leaving each prompt at least one token of its own; 0 for a single prompt."""
    lengths = mask.sum(1)  # (U,)
    n = int(lengths.min()) - 1
    if input_ids.shape[0] < 2 or n < 1:
        return 0
    start = input_ids.shape[1] - lengths  # (U,) each prompt's first token
    heads = input_ids.gather(1, start[:, None] + torch.arange(n, device=input_ids.device))
    return int((heads == heads[:1]).all(0).long().cumprod(0).sum())


def prefill(model, input_ids: torch.Tensor, mask: torch.Tensor):
    """Run the left-padded prompts once with a cache.

    The first tokens every prompt shares (`shared_head_length`: the instruction of a prompt
    template) run once, for one row, and every row's cache starts with their entries; each
    prompt's own tokens follow, left-padded among themselves. The cache's layout is then
    [shared head | padding | own tokens] with attention mask ``kv_mask``, which is ``mask``
    itself when nothing is shared (also for a cache that does not keep every position).
    Positions count real tokens only, as `generate` does. Only the last position's logits are
    computed when the model accepts `logits_to_keep` (the prompt's other logits are never
    used).

    Args:
        input_ids, mask: (U, P) left-padded prompts and their attention mask.

    Returns:
        (cache, kv_mask (U, S) int64 the attention mask of the cache's S <= P positions,
        last_pos (U,) position of each prompt's last token, logits (U, V) float32 of the next
        token).
    """
    extra = {"logits_to_keep": 1} if keeps_logits(model) else {}
    past = {}
    shared = _shared_head_cache(model, input_ids, mask, extra)
    if shared is not None:
        U, P = input_ids.shape
        head = shared.get_seq_length()
        own = mask.sum(1) - head  # (U,) >= 1
        width = int(own.max())
        input_ids = input_ids[:, P - width :]  # each prompt's own tokens, left-padded
        tail = (torch.arange(width, device=mask.device) >= width - own[:, None]).to(mask.dtype)
        mask = torch.cat([mask.new_ones(U, head), tail], dim=1)  # (U, head + width)
        past = {cache_kwarg(model): shared}
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -input_ids.shape[1] :]
    out = model(
        input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True, **past, **extra
    )
    return output_cache(out), mask, pos[:, -1], out.logits[:, -1].float()


def _shared_head_cache(model, input_ids, mask, extra) -> DynamicCache | None:
    """A cache of U rows holding the entries of the prompts' shared head (views of one row's:
    the next forward copies them), or None when nothing is shared or the model's cache does not
    keep every head position (a sliding window)."""
    head = shared_head_length(input_ids, mask)
    if not head:
        return None
    U, P = input_ids.shape
    start = P - int(mask[0].sum())
    out = model(
        input_ids=input_ids[:1, start : start + head],
        attention_mask=mask.new_ones(1, head),
        position_ids=torch.arange(head, device=mask.device)[None],
        use_cache=True,
        **extra,
    )
    try:
        layers = layer_tensors(output_cache(out), head)
    except ValueError:
        return None
    shared = DynamicCache()
    for layer, (k, v) in enumerate(layers):
        shared.update(k.expand(U, -1, -1, -1), v.expand(U, -1, -1, -1), layer)
    return shared


@dataclass(frozen=True)
class PromptCache:
    """The KV entries of left-padded prompts after one prefill, reusable by any number of readers.

    Readers never write into it: each gets a fresh `DynamicCache` (`dynamic_cache`) whose update
    concatenates new entries into new tensors (the tree caches then grow their copy in place,
    `bear.decoding.growing_cache`), so while a reader runs the prompts' entries exist at least
    twice. Needs a cache that keeps every prompt position in every layer (a full-attention
    DynamicCache, as Llama-style models return); its readers decode on a DynamicCache.

    Fields: layers [(keys, values) (U, H, S, d)] per layer, input_ids (U, P) the prompts, mask
    (U, P) int64 their attention mask, kv_mask (U, S) int64 the attention mask of the cached
    positions (see `prefill`: a shared head, then each prompt's own tokens), last_pos (U,)
    position of each prompt's last token, logits (U, V) float32 of the next token.
    """

    layers: list
    input_ids: torch.Tensor
    mask: torch.Tensor
    kv_mask: torch.Tensor
    last_pos: torch.Tensor
    logits: torch.Tensor

    @classmethod
    @torch.no_grad()
    def prefill(cls, model, input_ids: torch.Tensor, attention_mask=None) -> PromptCache:
        """Prefill (U, P) left-padded prompts once, without autograd.

        Raises:
            TypeError / ValueError: bad prompts (see `bear.decoding.common.check_prompt_ids`);
                ValueError for a cache that does not keep every prompt position.
        """
        mask = check_prompt_ids(model, input_ids, attention_mask)
        cache, kv_mask, last_pos, logits = prefill(model, input_ids, mask)
        layers = layer_tensors(cache, kv_mask.shape[1])
        return cls(layers, input_ids, mask, kv_mask, last_pos, logits)

    def select(self, rows: torch.Tensor | slice, *, logits: bool = True) -> PromptCache:
        """The prompts ``rows``: (R,) indices (repeats allowed, copies) or a slice (views);
        ``logits=False``: (R, 0) logits, for a reader of the keys and values only (not a cache
        to decode from)."""
        layers = [(k[rows], v[rows]) for k, v in self.layers]
        picked = (
            self.input_ids[rows],
            self.mask[rows],
            self.kv_mask[rows],
            self.last_pos[rows],
            self.logits[rows] if logits else self.logits[rows, :0],
        )
        return PromptCache(layers, *picked)

    def dynamic_cache(self) -> DynamicCache:
        """A new DynamicCache holding the prompts' entries (U rows)."""
        cache = DynamicCache()
        for layer, (k, v) in enumerate(self.layers):
            cache.update(k, v, layer)
        return cache

    def check_prompts(self, input_ids: torch.Tensor, mask: torch.Tensor) -> None:
        """ValueError unless this cache was prefilled from exactly these prompts and mask."""
        same = self.input_ids.shape == input_ids.shape and self.mask.shape == mask.shape
        if not (same and torch.equal(self.input_ids, input_ids) and torch.equal(self.mask, mask)):
            raise ValueError(
                f"prompt: this PromptCache holds other prompts (shape {tuple(self.mask.shape)}) "
                f"than input_ids / attention_mask (shape {tuple(input_ids.shape)}): prefill these "
                "prompts (PromptCache.prefill) or pass prompt=None"
            )


def prefilled(model, input_ids, mask, prompt: PromptCache | None):
    """(cache, kv_mask, last_pos, logits) of the prompts (see `prefill`): a copy of
    ``prompt``'s, or a new prefill."""
    if prompt is None:
        return prefill(model, input_ids, mask)
    prompt.check_prompts(input_ids, mask)
    return prompt.dynamic_cache(), prompt.kv_mask, prompt.last_pos, prompt.logits


def layer_tensors(cache, length: int):
    """[(keys, values)] per layer of a Hugging Face cache, each (rows, heads, length, head dim).

    ValueError when the cache has no layers of keys and values, or a layer does not hold all
    `length` positions (a sliding-window or quantised cache): PromptCache needs them all.
    """
    need = (
        "exact_topk, count_items_above and a full test (which prefills its prompts once, "
        "PromptCache) need a KV cache that keeps every position in every layer (a full-attention "
        "DynamicCache)"
    )
    layers = getattr(cache, "layers", None)  # transformers >= 4.56
    if layers is None:
        raise ValueError(f"{need}; the model returned a {type(cache).__name__} without layers")
    pairs = [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in layers]
    for k, _ in pairs:
        if k is None or k.dim() != 4 or k.shape[2] != length:
            raise ValueError(
                f"{need}; the model's cache holds {None if k is None else tuple(k.shape)} where "
                f"{length} positions were expected"
            )
    return pairs

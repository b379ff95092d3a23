"""A KV cache that grows into spare room instead of being copied whole at every forward.

Hugging Face's `DynamicLayer` appends a forward's keys and values with ``torch.cat``: the whole
cache is copied at every forward, in every layer. The tree caches (`bear.decoding.chain_cache`,
`beam_cache`) run dozens of forwards on one cache of U prompts and their beams' tokens, so these
copies grow with the cache and the forwards (benchmarks/README, "A pretrained model").

`GrowingLayer` keeps each layer's keys and values in buffers with room to spare (doubling with
what has been appended) and writes a forward's entries into that room: its ``keys`` and
``values`` are views of the buffers' first positions, so all the rest of transformers (sequence
length, mask sizes, attention) reads them as a `DynamicLayer`'s. `growing_cache(cache)` swaps a
cache's `DynamicLayer` layers for these, in place. A layer never writes into tensors it did not
allocate (a `PromptCache`'s entries stay untouched); if a method of its parent class replaced
``keys`` or ``values`` with other tensors, the next update copies them into new buffers.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

__all__ = ["GrowingLayer", "growing_cache"]


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose ``keys`` and ``values`` (rows, heads, S, d) are views of the first S
    positions of buffers of capacity C >= S; an update of T positions writes them at S .. S + T,
    first moving the S positions to buffers of S + T + max(T, A) when S + T > C, A the positions
    appended since the layer's first buffers (S0 held then, A = S + T - S0): the room doubles with
    what is appended, not with what the layer started from (a prompt), so the buffers hold at
    most S0 + 2 A + T; amortised O(T) copied per update where `DynamicLayer` copies O(S + T). An
    update of other rows, heads, head size or dtype than the buffers' goes to `DynamicLayer` as
    it is (concatenated, or refused, as there)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        """Hold ``keys`` and ``values`` (rows, heads, S, d) as they are; the first update copies
        them into buffers of this layer's own."""
        super().__init__()
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True  # transformers 5.x reads it; 4.x reads ``keys``
        self.keys, self.values = keys, values
        self._key_buffer = self._value_buffer = None
        self._base = None  # positions held when the first buffers were made

    def _owns_views(self) -> bool:
        """Whether ``keys`` and ``values`` are still the prefix views of this layer's buffers."""
        buffers = (self._key_buffer, self._value_buffer)
        return all(
            buf is not None
            and view is not None
            and view.data_ptr() == buf.data_ptr()
            and view.shape[:2] == buf.shape[:2]
            and view.stride() == buf.stride()
            for view, buf in zip((self.keys, self.values), buffers, strict=True)
        )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append (rows, heads, T, d) keys and values; return the layer's keys and values."""
        S, T = self.get_seq_length(), key_states.shape[-2]
        if S and not all(
            new.shape[:2] == old.shape[:2]
            and new.shape[-1] == old.shape[-1]
            and new.dtype == old.dtype
            for new, old in ((key_states, self.keys), (value_states, self.values))
        ):
            return super().update(key_states, value_states, *args, **kwargs)
        self.is_initialized = True  # also after a `reset`, which clears it
        owned = self._owns_views()
        if not owned or S + T > self._key_buffer.shape[-2]:
            if not owned:
                self._base = S
            capacity = S + T + max(T, S + T - self._base)
            self._key_buffer = self._grown(key_states, capacity, self.keys if S else None)
            self._value_buffer = self._grown(value_states, capacity, self.values if S else None)
        self._key_buffer[:, :, S : S + T] = key_states
        self._value_buffer[:, :, S : S + T] = value_states
        self.keys = self._key_buffer[:, :, : S + T]
        self.values = self._value_buffer[:, :, : S + T]
        return self.keys, self.values

    @staticmethod
    def _grown(new: torch.Tensor, capacity: int, old: torch.Tensor | None) -> torch.Tensor:
        """A buffer of ``capacity`` positions shaped as ``new``, holding ``old`` first."""
        buffer = new.new_empty(*new.shape[:2], capacity, new.shape[-1])
        if old is not None:
            buffer[:, :, : old.shape[-2]] = old
        return buffer

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices``: their filled positions, copied into buffers of the same
        capacity."""
        if not self._owns_views():
            super().batch_select_indices(indices)
            return
        S, capacity = self.get_seq_length(), self._key_buffer.shape[-2]
        keys, values = self.keys[indices], self.values[indices]
        self._key_buffer = self._grown(keys, capacity, keys)
        self._value_buffer = self._grown(values, capacity, values)
        self.keys = self._key_buffer[:, :, :S]
        self.values = self._value_buffer[:, :, :S]


def growing_cache(cache):
    """``cache`` with each of its `DynamicLayer` layers (exactly that class: a sliding-window or
    other layer is left as it is) replaced by a `GrowingLayer` holding the same keys and values;
    the same cache object, changed in place. A cache without ``layers`` (transformers < 4.56) or
    with empty layers is returned unchanged."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return cache
    for i, layer in enumerate(layers):
        keys = getattr(layer, "keys", None)
        if type(layer) is DynamicLayer and keys is not None and keys.dim() == 4:
            layers[i] = GrowingLayer(keys, layer.values)
    return cache

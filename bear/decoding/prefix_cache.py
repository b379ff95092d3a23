"""The KV cache of searches extending trie prefixes in any order (exact top-K, the exact count)."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from bear.decoding.prompt_cache import PromptCache, cache_kwarg, layer_tensors, output_cache

__all__ = ["PrefixKVCache"]


class PrefixKVCache:
    """The prompts' KV cache plus the KV entry of every prefix token fed so far (exact_topk).

    Best-first search extends prefixes in any order, so the cache is kept as a tree of slots:
    slot s holds one token's keys and values in every layer, and row s of `chain` lists the
    slots from the first prefix token to s. Extending a prefix by one token runs that token alone
    on a cache rebuilt from the prompt's entries and its chain's, so a step costs what one step of
    autoregressive decoding costs, however many steps came before. The slot buffers grow by
    doubling. Only the public `Cache.update` builds caches; the prefill cache must keep every
    prompt position in every layer (a full-attention DynamicCache, as Llama-style models return).
    """

    ROWS = 64  # prefixes per forward pass (bounds the rebuilt cache)

    def __init__(self, model, input_ids, mask, prompt: PromptCache | None = None):
        self.model = model
        self.cache_kw = cache_kwarg(model)
        if prompt is None:
            prompt = PromptCache.prefill(model, input_ids, mask)
        prompt.check_prompts(input_ids, mask)
        self.mask = prompt.kv_mask  # (U, S) the prompts' cached positions
        self.last_pos, self.logits = prompt.last_pos, prompt.logits  # (U,), (U, V)
        self.prompt_kv = prompt.layers  # [(K, V) (U, H, S, d)]
        # slot buffers: keys / values (H, capacity, d) per layer, chain (capacity, width)
        self.slot_kv = [(k[0, :, :0], v[0, :, :0]) for k, v in self.prompt_kv]  # (H, 0, d)
        self.chain = torch.full((0, 0), -1, dtype=torch.int64, device=mask.device)
        self.slots = 0  # slots in use
        self.width = 0  # longest chain in use
        self._grow()

    def extend(self, rows, parent, tokens, depth):
        """Feed one token after each prefix; store its KV entry in a new slot.

        Args:
            rows: (R,) the prompt of each prefix.
            parent: (R,) slot of the prefix's last token so far, -1 for an empty prefix.
            tokens: (R,) the token to feed.
            depth: (R,) >= 1, the prefix length once `tokens` is appended (parent's + 1).

        Returns:
            (logits (R, V) float32 of the next token, slots (R,) of the fed tokens).
        """
        logits, slots = [], []
        for s in range(0, rows.shape[0], self.ROWS):
            part = slice(s, s + self.ROWS)
            out = self._extend(rows[part], parent[part], tokens[part], depth[part])
            logits.append(out[0])
            slots.append(out[1])
        return torch.cat(logits), torch.cat(slots)

    def _extend(self, rows, parent, tokens, depth):
        R, D = rows.shape[0], self.width
        has_parent = (parent >= 0)[:, None]  # (R, 1)
        chain = torch.where(has_parent, self.chain[parent.clamp(min=0), :D], -1)  # (R, D)
        idx = chain.clamp(min=0).view(-1)  # (R*D,)
        cache = DynamicCache()
        for layer, ((pk, pv), (sk, sv)) in enumerate(
            zip(self.prompt_kv, self.slot_kv, strict=True)
        ):
            ck = sk[:, idx].unflatten(1, (R, D)).transpose(0, 1)  # (R, H, D, d)
            cv = sv[:, idx].unflatten(1, (R, D)).transpose(0, 1)  # (R, H, D, d)
            cache.update(torch.cat([pk[rows], ck], 2), torch.cat([pv[rows], cv], 2), layer)
        ones = self.mask.new_ones(R, 1)
        mask = torch.cat([self.mask[rows], (chain >= 0).to(self.mask.dtype), ones], dim=1)
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=(self.last_pos[rows] + depth)[:, None],
            use_cache=True,
            **{self.cache_kw: cache},
        )
        fed = layer_tensors(output_cache(out), mask.shape[1])  # [(K, V) (R, H, P+D+1, d)]
        return out.logits[:, -1].float(), self._store(fed, chain, depth)

    def _store(self, fed, chain, depth):
        """Keep the fed tokens' KV entries (the cache's last position) as new slots (R,)."""
        R = chain.shape[0]
        first, self.slots = self.slots, self.slots + R
        self.width = max(self.width, int(depth.max()))
        if self.slots > self.chain.shape[0] or self.width > self.chain.shape[1]:
            self._grow()
        slots = torch.arange(first, self.slots, device=chain.device)  # (R,)
        for (sk, sv), (k, v) in zip(self.slot_kv, fed, strict=True):
            sk[:, first : self.slots] = k[:, :, -1].transpose(0, 1)  # (H, R, d)
            sv[:, first : self.slots] = v[:, :, -1].transpose(0, 1)
        self.chain[first : self.slots, : chain.shape[1]] = chain
        self.chain[slots, depth - 1] = slots
        return slots

    def _grow(self):
        """Double the slot buffers until `slots` rows and `width` columns fit."""
        rows, cols = max(self.chain.shape[0], 64), max(self.chain.shape[1], 16)
        while rows < self.slots:
            rows *= 2
        while cols < self.width:
            cols *= 2
        chain = self.chain.new_full((rows, cols), -1)  # (capacity, width)
        chain[: self.chain.shape[0], : self.chain.shape[1]] = self.chain
        self.chain = chain
        grown = []
        for sk, sv in self.slot_kv:
            k, v = (
                sk.new_empty(sk.shape[0], rows, sk.shape[2]),
                sv.new_empty(sv.shape[0], rows, sv.shape[2]),
            )
            k[:, : sk.shape[1]], v[:, : sv.shape[1]] = sk, sv
            grown.append((k, v))
        self.slot_kv = grown

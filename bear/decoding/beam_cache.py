"""The KV caches of a beam search: one prompt prefill shared by the beams of each user.

- `CopiedKVCache`: one cache row per beam, rows copied and reordered every step (any model).
- `TreeKVCache`: one cache row per user; the beams' tokens are appended side by side and a 4-D
  attention mask (tree attention) keeps each beam to its own ancestors (sdpa / eager attention;
  sdpa runs as `bear.decoding.grouped_attention`, which reads each key/value head once).
  `bear.decoding.chain_cache.ChainKVCache` builds on the same layout for beam search.
"""

from __future__ import annotations

import torch

from bear.decoding.grouped_attention import GROUPED_SDPA, grouped_attention
from bear.decoding.growing_cache import growing_cache
from bear.decoding.prompt_cache import (
    PromptCache,
    cache_kwarg,
    output_cache,
    prefilled,
)

__all__ = ["CopiedKVCache", "TreeKVCache", "attention_implementation", "check_tree_attention"]

# attention implementations known to apply a 4-D attention mask (what TreeKVCache needs)
TREE_ATTENTION = ("sdpa", "eager", GROUPED_SDPA)


def attention_implementation(model) -> str | None:
    """The model's attention implementation as transformers records it, or None when unknown.

    Read from the text config (`config.get_text_config()._attn_implementation`): transformers sets
    it to a string whenever a model is built or loaded (peft models pass their base's config
    through); a composite model in transformers 5.x may hold one per sub-config.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        return None
    attn = getattr(config.get_text_config(), "_attn_implementation", None)
    return attn if isinstance(attn, str) else None


def check_tree_attention(model) -> None:
    """Raise ValueError unless the model's attention is known to honour a 4-D mask (TreeKVCache).

    An unknown implementation (no config, or no recorded `_attn_implementation`) is refused too:
    an attention that ignores the mask would decode wrong beams without any error.
    """
    attn = attention_implementation(model)
    if attn not in TREE_ATTENTION:
        raise ValueError(
            f"kv_sharing='tree' needs an attention implementation known to honour a 4-D mask "
            f"({list(TREE_ATTENTION)}); the model's is {attn!r} (None: unknown): pass "
            "kv_sharing='copy' to beam_search"
        )


class CopiedKVCache:
    """KV cache with one row per beam (kv_sharing="copy").

    The prompts are prefilled once (one row per user); the rows are then expanded to the beams
    and reordered every step through the public `Cache.batch_select_indices`.
    """

    def __init__(self, model, input_ids, mask, prompt: PromptCache | None = None):
        self.model = model
        self.cache_kw = cache_kwarg(model)
        # mask: (R, S + t) of the cached positions, R = users * beams
        self.cache, self.mask, self.last_pos, self.logits = prefilled(
            model, input_ids, mask, prompt
        )
        self.beams = 1  # cache rows per user

    def step(
        self, src: torch.Tensor, tokens: torch.Tensor, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """As `CopiedKVCache.step`: (U', Bn) parents and tokens -> (U' * Bn, V) logits."""
        if keep is None:
            keep = torch.arange(src.shape[0], device=src.device)
        rows = (keep[:, None] * self.beams + src).view(-1)  # (U' * Bn,) may repeat
        self.beams = src.shape[1]
        # `batch_select_indices` indexes each layer's keys/values with `keys[rows]`, which accepts
        # repeated rows (beam expansion and reordering) and is ~25x faster on CPU than the
        # `index_select` of `reorder_cache` for 4-D tensors (torch 2.13).
        self.cache.batch_select_indices(rows)
        self.mask = torch.cat([self.mask[rows], self.mask.new_ones(rows.shape[0], 1)], dim=1)
        self.last_pos = self.last_pos[rows] + 1
        out = self.model(
            input_ids=tokens.reshape(-1, 1),
            attention_mask=self.mask,
            position_ids=self.last_pos.view(-1, 1),
            use_cache=True,
            **{self.cache_kw: self.cache},
        )
        self.cache = output_cache(out)
        self.logits = out.logits[:, -1].float()
        return self.logits


class TreeKVCache:
    """KV cache with one row per user that its beams share through tree attention (the
    diverse and sampling searches; beam search feeds whole chains, `ChainKVCache`).

    The row holds the prompt, then every step appends the user's Bn beam tokens (after G slots
    so far, beam j's token at slot G + j). A 4-D attention mask lets each new token attend to its
    prompt and the slots of its own ancestors only, which is exactly the attention of a separate
    sequence per beam; positions are prompt length + t for every beam. Nothing is copied between
    beams and the cache is never reordered; users that leave are dropped through
    `Cache.batch_select_indices`.
    """

    def __init__(self, model, input_ids, mask, prompt: PromptCache | None = None):
        check_tree_attention(model)
        self.model = model
        self.cache_kw = cache_kwarg(model)
        self.cache, kv_mask, self.last_pos, self.logits = prefilled(model, input_ids, mask, prompt)
        self.cache = growing_cache(self.cache)  # appended to at every step
        self.prompt_mask = kv_mask.bool()  # (U, S) the prompts' cached positions
        self.ancestors = torch.zeros(
            input_ids.shape[0], 1, 0, dtype=torch.int64, device=mask.device
        )
        self.generated = 0  # slots appended after the prompt
        self.dtype = next(model.parameters()).dtype

    def _select_users(self, keep: torch.Tensor) -> None:
        self.cache.batch_select_indices(keep)
        self.prompt_mask = self.prompt_mask[keep]
        self.last_pos = self.last_pos[keep]
        self.ancestors = self.ancestors[keep]

    def step(
        self, src: torch.Tensor, tokens: torch.Tensor, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """As `CopiedKVCache.step`: (U', Bn) parents and tokens -> (U' * Bn, V) logits."""
        if keep is not None and keep.shape[0] < self.prompt_mask.shape[0]:
            self._select_users(keep)
        U, Bn = tokens.shape
        G, t = self.generated, self.ancestors.shape[2]
        device = tokens.device
        new_slot = G + torch.arange(Bn, device=device).view(1, Bn, 1).expand(U, -1, -1)
        anc = self.ancestors.gather(1, src[..., None].expand(-1, -1, t))  # (U, Bn, t)
        self.ancestors = torch.cat([anc, new_slot], dim=2)  # (U, Bn, t + 1)
        own = torch.zeros(U, Bn, G + Bn, dtype=torch.bool, device=device)
        own.scatter_(2, self.ancestors, True)  # the beam's ancestors and its own slot
        allowed = torch.cat([self.prompt_mask[:, None, :].expand(-1, Bn, -1), own], dim=2)
        neg = torch.finfo(self.dtype).min
        mask4d = torch.zeros(allowed.shape, dtype=self.dtype, device=device)
        mask4d = mask4d.masked_fill(~allowed, neg)[:, None]  # (U, 1, Bn, P + G + Bn)
        pos = (self.last_pos[:, None] + t + 1).expand(-1, Bn)  # (U, Bn)
        with grouped_attention(self.model):
            out = self.model(
                input_ids=tokens.reshape(U, Bn),
                attention_mask=mask4d,
                position_ids=pos,
                use_cache=True,
                **{self.cache_kw: self.cache},
            )
        self.cache = output_cache(out)
        self.generated = G + Bn
        self.logits = out.logits.float().reshape(U * Bn, -1)
        return self.logits

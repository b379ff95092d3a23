"""The KV caches of a beam search: one prompt prefill shared by the beams of each user.

- `CopiedKVCache`: one cache row per beam, rows copied and reordered every step (any model).
- `TreeKVCache`: one cache row per user; the beams' tokens are appended side by side and a 4-D
  attention mask (tree attention) keeps each beam to its own ancestors (sdpa / eager attention).
"""

from __future__ import annotations

import torch

from bear.decoding.prompt_cache import (
    PromptCache,
    cache_kwarg,
    keeps_logits,
    output_cache,
    prefilled,
)

__all__ = ["CopiedKVCache", "TreeKVCache", "attention_implementation", "check_tree_attention"]

# attention implementations known to apply a 4-D attention mask (what TreeKVCache needs)
TREE_ATTENTION = ("sdpa", "eager")


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
    """KV cache with one row per user that its beams share through tree attention
    (kv_sharing="tree").

    The row holds the prompt, then every step appends the user's Bn beam tokens (after G slots
    so far, beam j's token at slot G + j; k tokens per beam after deferred steps: G + j·k + i).
    A 4-D attention mask lets each new token attend to its prompt and the slots of its own
    ancestors only, which is exactly the attention of a separate sequence per beam;
    positions are prompt length + t for every beam. Nothing is copied between beams and the cache
    is never reordered; users that leave are dropped through `Cache.batch_select_indices`.

    A step whose logits nobody needs (`step(..., defer=True)`: every next beam has one trie
    child, whose "before" log-probability is 0 whatever the logits) is only recorded; the next
    step that needs logits feeds each beam's deferred tokens and its new one in one forward
    (k tokens per beam side by side, causal along the beam, logits of its last token only).
    Beams never split across deferred steps (one child each), so no token is fed twice.
    """

    def __init__(self, model, input_ids, mask, prompt: PromptCache | None = None):
        check_tree_attention(model)
        self.model = model
        self.cache_kw = cache_kwarg(model)
        self.cache, kv_mask, self.last_pos, self.logits = prefilled(model, input_ids, mask, prompt)
        self.prompt_mask = kv_mask.bool()  # (U, S) the prompts' cached positions
        self.ancestors = torch.zeros(
            input_ids.shape[0], 1, 0, dtype=torch.int64, device=mask.device
        )
        self.generated = 0  # slots appended after the prompt
        self.dtype = next(model.parameters()).dtype
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # deferred (src, tokens)
        self.keeps_logits = keeps_logits(model)  # a flush asks for its last tokens' logits only

    def _select_users(self, keep: torch.Tensor) -> None:
        self.cache.batch_select_indices(keep)
        self.prompt_mask = self.prompt_mask[keep]
        self.last_pos = self.last_pos[keep]
        self.ancestors = self.ancestors[keep]
        self.pending = [(src[keep], tok[keep]) for src, tok in self.pending]

    def step(
        self,
        src: torch.Tensor,
        tokens: torch.Tensor,
        keep: torch.Tensor | None = None,
        defer: bool = False,
    ) -> torch.Tensor | None:
        """As `CopiedKVCache.step`: (U', Bn) parents and tokens -> (U' * Bn, V) logits; with
        ``defer`` the step is recorded and None returned (see the class docstring)."""
        if keep is not None and keep.shape[0] < self.prompt_mask.shape[0]:
            self._select_users(keep)
        self.pending.append((src, tokens))
        if defer:
            return None
        # each final beam's chain through the pending steps: its tokens, oldest first, and
        # its parent among the beams whose slots `ancestors` holds
        chain, parent = [tokens], src
        for s, tok in reversed(self.pending[:-1]):
            chain.append(tok.gather(1, parent))
            parent = s.gather(1, parent)
        self.pending = []
        k = len(chain)
        U, Bn = tokens.shape
        G, t = self.generated, self.ancestors.shape[2]
        device = tokens.device
        # beam j's i-th token goes to slot G + j·k + i
        new_slot = G + torch.arange(Bn * k, device=device).view(1, Bn, k).expand(U, -1, -1)
        anc = self.ancestors.gather(1, parent[..., None].expand(-1, -1, t))  # (U, Bn, t)
        self.ancestors = torch.cat([anc, new_slot], dim=2)  # (U, Bn, t + k)
        own = torch.zeros(U, Bn, k, G + Bn * k, dtype=torch.bool, device=device)
        own.scatter_(3, anc[:, :, None, :].expand(-1, -1, k, -1), True)  # the beam's ancestors
        causal = torch.ones(k, k, dtype=torch.bool, device=device).tril()  # its own tokens <= i
        own.scatter_(3, new_slot[:, :, None, :].expand(-1, -1, k, -1), causal.expand(U, Bn, k, k))
        prompt = self.prompt_mask[:, None, None, :].expand(-1, Bn, k, -1)
        allowed = torch.cat([prompt, own], dim=3).reshape(U, Bn * k, -1)
        neg = torch.finfo(self.dtype).min
        mask4d = torch.zeros(allowed.shape, dtype=self.dtype, device=device)
        mask4d = mask4d.masked_fill(~allowed, neg)[:, None]  # (U, 1, Bn·k, P + G + Bn·k)
        pos = self.last_pos[:, None] + t + 1 + torch.arange(k, device=device)  # (U, k)
        extra, keep_last = {}, k > 1 and self.keeps_logits
        if keep_last:  # the logits of each beam's last token only
            extra["logits_to_keep"] = torch.arange(k - 1, Bn * k, k, device=device)
        out = self.model(
            input_ids=torch.stack(chain[::-1], dim=2).reshape(U, Bn * k),
            attention_mask=mask4d,
            position_ids=pos[:, None, :].expand(-1, Bn, -1).reshape(U, Bn * k),
            use_cache=True,
            **{self.cache_kw: self.cache},
            **extra,
        )
        self.cache = output_cache(out)
        self.generated = G + Bn * k
        logits = out.logits if keep_last or k == 1 else out.logits[:, k - 1 :: k]
        self.logits = logits.float().reshape(U * Bn, -1)
        return self.logits

"""Hugging Face KV-cache plumbing for the decoders: prompt prefill and three ways to reuse it.

- `CopiedKVCache`: one cache row per beam, rows copied and reordered every step (any model).
- `TreeKVCache`: one cache row per user; the beams' tokens are appended side by side and a 4-D
  attention mask (tree attention) keeps each beam to its own ancestors (sdpa / eager attention).
- `PrefixKVCache`: the prompts' cache plus one stored entry per fed prefix token, so that any
  prefix extends by one token (best-first search).

A `PromptCache` holds one prefill's entries so that several of these (and teacher forcing) share
it: evaluation prefills each batch's prompts once for its beam search, margins and exact ranks.

Only public cache API is used (`Cache.batch_select_indices`, `Cache.update`, the layers' `keys`
and `values`); no private Hugging Face method is overridden.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from bear.decode_common import check_prompt_ids

__all__ = [
    "CopiedKVCache",
    "PrefixKVCache",
    "PromptCache",
    "TreeKVCache",
    "cache_kwarg",
    "check_tree_attention",
    "keeps_logits",
    "prefill",
    "shared_head_length",
]

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
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True,
                **past, **extra)  # fmt: skip
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
    out = model(input_ids=input_ids[:1, start : start + head],
                attention_mask=mask.new_ones(1, head),
                position_ids=torch.arange(head, device=mask.device)[None], use_cache=True,
                **extra)  # fmt: skip
    try:
        layers = _layer_tensors(output_cache(out), head)
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
    concatenates new entries into new tensors, so while a reader runs the prompts' entries exist
    twice. Needs a cache that keeps every prompt position in every layer (a full-attention
    DynamicCache, as Llama-style models return); its readers decode on a plain DynamicCache.

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
            TypeError / ValueError: bad prompts (see `bear.decode_common.check_prompt_ids`);
                ValueError for a cache that does not keep every prompt position.
        """
        mask = check_prompt_ids(model, input_ids, attention_mask)
        cache, kv_mask, last_pos, logits = prefill(model, input_ids, mask)
        layers = _layer_tensors(cache, kv_mask.shape[1])
        return cls(layers, input_ids, mask, kv_mask, last_pos, logits)

    def select(self, rows: torch.Tensor | slice) -> PromptCache:
        """The prompts ``rows``: (R,) indices (repeats allowed, copies) or a slice (views)."""
        layers = [(k[rows], v[rows]) for k, v in self.layers]
        picked = (self.input_ids[rows], self.mask[rows], self.kv_mask[rows], self.last_pos[rows],
                  self.logits[rows])  # fmt: skip
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


def _prefilled(model, input_ids, mask, prompt: PromptCache | None):
    """(cache, kv_mask, last_pos, logits) of the prompts (see `prefill`): a copy of
    ``prompt``'s, or a new prefill."""
    if prompt is None:
        return prefill(model, input_ids, mask)
    prompt.check_prompts(input_ids, mask)
    return prompt.dynamic_cache(), prompt.kv_mask, prompt.last_pos, prompt.logits


class CopiedKVCache:
    """KV cache with one row per beam (kv_sharing="copy").

    The prompts are prefilled once (one row per user); the rows are then expanded to the beams
    and reordered every step through the public `Cache.batch_select_indices`.
    """

    def __init__(self, model, input_ids, mask, prompt: PromptCache | None = None):
        self.model = model
        self.cache_kw = cache_kwarg(model)
        # mask: (R, S + t) of the cached positions, R = users * beams
        self.cache, self.mask, self.last_pos, self.logits = _prefilled(
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
        self.cache, kv_mask, self.last_pos, self.logits = _prefilled(model, input_ids, mask, prompt)
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
        fed = _layer_tensors(output_cache(out), mask.shape[1])  # [(K, V) (R, H, P+D+1, d)]
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


def _layer_tensors(cache, length: int):
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

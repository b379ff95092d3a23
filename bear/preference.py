"""A prompt and its responses in one forward: the input of preference losses (S-DPO).

Each row holds one prompt followed by its R responses side by side, ``[prompt | response 0 | ... |
response R-1]``, under a 4-D attention mask: every response token attends to the prompt and to the
tokens of its own response before it, as if each response followed the prompt alone; positions
continue from the prompt's end for every response. The prompt is run once for its R responses, so
a step costs R × the title length, not R × the prompt length, and one forward per micro-batch
keeps DDP's and FSDP2's one-forward-one-backward contract. The logits of every response step are
those of its own sequence: step 0 is read at the prompt's last position (shared by all R), step
t >= 1 at the response's own token t - 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bear.decoding.beam_cache import check_tree_attention
from bear.items import IGNORE_INDEX, left_pad
from bear.trie import ItemTrie

__all__ = ["PreferenceBatch", "collate_preference", "preference_logits"]


@dataclass
class PreferenceBatch:
    """U prompts with R responses each (``collate_preference``).

    input_ids (U, P + R·w): each prompt, left-padded, then its responses' inputs (every token but
    the last, EOS), each right-padded to w; mask (U, P) the prompts' attention mask; position_ids
    (U, P + R·w); target (U, R, w + 1) each response's tokens with EOS, IGNORE_INDEX after its end;
    node_ids (U, R, w + 1) the trie node each step chooses among, -1 after the end; items (U, R)
    the responses' item ids.
    """

    input_ids: torch.Tensor
    mask: torch.Tensor
    position_ids: torch.Tensor
    target: torch.Tensor
    node_ids: torch.Tensor
    items: torch.Tensor

    @property
    def responses(self) -> int:
        return self.items.shape[1]

    @property
    def width(self) -> int:
        """w: the input positions of one response (its longest, EOS not fed)."""
        return self.target.shape[2] - 1

    def to(self, device) -> PreferenceBatch:
        return PreferenceBatch(**{k: v.to(device) for k, v in self.__dict__.items()})

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """(U, 1, T, T) additive 4-D mask in ``dtype``: 0 where a query may attend a key, the
        dtype's lowest value elsewhere (a padding query attends to itself only)."""
        U, P = self.mask.shape
        R, w = self.responses, self.width
        T = P + R * w
        device = self.mask.device
        prompt = self.mask.bool()  # (U, P)
        causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
        allowed = torch.zeros(U, T, T, dtype=torch.bool, device=device)
        allowed[:, :P, :P] = causal & prompt[:, None, :]  # the prompt, causal, real keys only
        allowed[:, P:, :P] = prompt[:, None, :]  # every response token sees the prompt
        own = torch.ones(w, w, dtype=torch.bool, device=device).tril()
        for r in range(R):  # and its own response's tokens up to itself
            s = P + r * w
            allowed[:, s : s + w, s : s + w] = own
        allowed |= torch.eye(T, dtype=torch.bool, device=device)  # no query without a key
        mask = torch.zeros(U, 1, T, T, dtype=dtype, device=device)
        return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


def collate_preference(
    prompts: list[list[int]], responses: list[list[int]], items: dict, trie: ItemTrie, pad_id: int
) -> PreferenceBatch:
    """A ``PreferenceBatch`` of prompt token lists (U) and their R response item ids each (the
    item token table ``items``: id -> tokens without EOS; ``trie`` on the CPU)."""
    U, R = len(prompts), len(responses[0])
    eos = trie.eos_token_id
    seqs = [[items[i] + [eos] for i in row] for row in responses]  # (U, R) token lists
    w = max(len(s) for row in seqs for s in row) - 1
    prompt_ids, mask = left_pad(prompts, pad_id)  # (U, P)
    fed = torch.full((U, R, w), pad_id, dtype=torch.long)  # (U, R, w)
    target = torch.full((U, R, w + 1), IGNORE_INDEX, dtype=torch.long)  # (U, R, w + 1)
    for u, row in enumerate(seqs):
        for r, s in enumerate(row):
            fed[u, r, : len(s) - 1] = torch.tensor(s[:-1])
            target[u, r, : len(s)] = torch.tensor(s)
    item_ids = torch.tensor(responses, dtype=torch.long)  # (U, R)
    nodes = trie.path_nodes(item_ids.reshape(-1)).cpu()[:, : w + 1]  # (U·R, w + 1)
    prompt_pos = (mask.cumsum(1) - 1).clamp(min=0)  # (U, P)
    after = mask.sum(1, keepdim=True) + torch.arange(w)  # (U, w) each response's positions
    position_ids = torch.cat([prompt_pos, after.repeat(1, R)], dim=1)  # (U, P + R·w)
    return PreferenceBatch(
        input_ids=torch.cat([prompt_ids, fed.reshape(U, R * w)], dim=1),
        mask=mask,
        position_ids=position_ids,
        target=target,
        node_ids=nodes.reshape(U, R, w + 1),
        items=item_ids,
    )


def preference_logits(model, batch: PreferenceBatch, dtype: torch.dtype) -> torch.Tensor:
    """(U, R, w + 1, V) the logits of every response step (module docstring), from one forward
    of ``model`` (any Hugging Face causal LM whose attention honours a 4-D mask: sdpa, eager)
    with its 4-D mask in ``dtype`` (the model's compute dtype)."""
    U, R, w = batch.items.shape[0], batch.responses, batch.width
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask(dtype),
        position_ids=batch.position_ids,
        logits_to_keep=R * w + 1,  # the prompt's last position, then every response input
        use_cache=False,
    )
    logits = out.logits  # (U, 1 + R·w, V)
    first = logits[:, :1].expand(U, R, -1)[:, :, None]  # (U, R, 1, V) step 0 of every response
    rest = logits[:, 1:].reshape(U, R, w, -1)  # (U, R, w, V)
    return torch.cat([first, rest], dim=2)


def check_preference_model(model) -> None:
    """ValueError unless the model's attention honours the 4-D mask ``preference_logits`` uses."""
    check_tree_attention(model)

"""A prompt and its responses in one forward: the input of preference losses (S-DPO).

Each row holds one prompt followed by its R responses packed back to back, ``[prompt | response
0 | ... | response R-1 | padding]``, under a 4-D attention mask: every response token attends to
the prompt and to the tokens of its own response before it, as if each response followed the
prompt alone; positions continue from the prompt's end for every response. The prompt is run once
for its R responses and a response costs its own length (no padding to the longest), so a step
costs R × the title length, not R × the prompt length; one forward per micro-batch keeps DDP's and
FSDP2's one-forward-one-backward contract. The logits of every response step are those of its own
sequence: step 0 is read at the prompt's last position (shared by all R), step t >= 1 at the
response's own token t - 1. Only the N positions that predict a response token are kept, flat.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bear.decoding.beam_cache import TREE_ATTENTION, attention_implementation
from bear.items import left_pad
from bear.trie import ItemTrie

__all__ = [
    "PreferenceBatch",
    "check_preference_model",
    "collate_preference",
    "preference_logits",
    "response_sums",
]


@dataclass
class PreferenceBatch:
    """U prompts with R responses each (``collate_preference``), and the N response steps.

    input_ids (U, P + L): each prompt, left-padded to P, then its responses' inputs (each
    response's tokens but the last, EOS) packed back to back, right-padded to the longest row
    (L); mask (U, P) the prompts' attention mask; segment (U, L) the response each packed position
    belongs to (-1: padding); position_ids (U, P + L); items (U, R) the responses' item ids.
    Per response step, flat: step_row (N,) its prompt, step_pos (N,) its position among the kept
    logits (0: the prompt's last position; k: packed position k - 1), step_response (N,) its
    response (u·R + r), step_target (N,) the token it predicts (EOS last), step_node (N,) the
    trie node it chooses among.
    """

    input_ids: torch.Tensor
    mask: torch.Tensor
    segment: torch.Tensor
    position_ids: torch.Tensor
    items: torch.Tensor
    step_row: torch.Tensor
    step_pos: torch.Tensor
    step_response: torch.Tensor
    step_target: torch.Tensor
    step_node: torch.Tensor

    @property
    def responses(self) -> int:
        return self.items.shape[1]

    def to(self, device) -> PreferenceBatch:
        return PreferenceBatch(**{k: v.to(device) for k, v in self.__dict__.items()})

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """(U, 1, T, T) additive 4-D mask in ``dtype``: 0 where a query may attend a key, the
        dtype's lowest value elsewhere (a padding query attends to itself only)."""
        U, P = self.mask.shape
        T = self.input_ids.shape[1]
        device = self.mask.device
        prompt = self.mask.bool()  # (U, P)
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (T, T)
        allowed = torch.zeros(U, T, T, dtype=torch.bool, device=device)
        allowed[:, :P, :P] = causal[:P, :P] & prompt[:, None, :]  # the prompt, real keys only
        allowed[:, P:, :P] = prompt[:, None, :]  # every response token sees the prompt
        seg = self.segment  # (U, L)
        own = (seg[:, :, None] == seg[:, None, :]) & (seg >= 0)[:, :, None]  # same response
        allowed[:, P:, P:] = own & causal[P:, P:]  # ... and its tokens up to itself
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
    L = max(1, max(sum(len(s) - 1 for s in row) for row in seqs))
    prompt_ids, mask = left_pad(prompts, pad_id)  # (U, P)
    packed = torch.full((U, L), pad_id, dtype=torch.long)  # (U, L)
    segment = torch.full((U, L), -1, dtype=torch.long)  # (U, L)
    within = torch.zeros((U, L), dtype=torch.long)  # (U, L) index inside its response
    item_ids = torch.tensor(responses, dtype=torch.long)  # (U, R)
    nodes = trie.path_nodes(item_ids.reshape(-1)).cpu()  # (U·R, L_max + 1)
    steps: list[tuple[int, int, int, int, int]] = []  # (row, pos, response, target, node)
    for u, row in enumerate(seqs):
        offset = 0
        for r, s in enumerate(row):
            n = len(s) - 1  # inputs fed: every token but EOS
            packed[u, offset : offset + n] = torch.tensor(s[:-1], dtype=torch.long)
            segment[u, offset : offset + n] = r
            within[u, offset : offset + n] = torch.arange(n)
            response = u * R + r
            for t, token in enumerate(s):
                pos = 0 if t == 0 else 1 + offset + t - 1
                steps.append((u, pos, response, token, int(nodes[response, t])))
            offset += n
    prompt_pos = (mask.cumsum(1) - 1).clamp(min=0)  # (U, P)
    after = mask.sum(1, keepdim=True) + within  # (U, L) positions continue from each prompt
    row, pos, response, target, node = torch.tensor(steps, dtype=torch.long).unbind(1)
    return PreferenceBatch(
        input_ids=torch.cat([prompt_ids, packed], dim=1),
        mask=mask,
        segment=segment,
        position_ids=torch.cat([prompt_pos, after], dim=1),
        items=item_ids,
        step_row=row,
        step_pos=pos,
        step_response=response,
        step_target=target,
        step_node=node,
    )


def preference_logits(model, batch: PreferenceBatch, dtype: torch.dtype) -> torch.Tensor:
    """(N, V) the logits of every response step (module docstring), from one forward of
    ``model`` (a Hugging Face causal LM whose attention honours a 4-D mask: sdpa, eager) with
    its 4-D mask in ``dtype`` (the model's compute dtype)."""
    packed = batch.segment.shape[1]
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask(dtype),
        position_ids=batch.position_ids,
        logits_to_keep=packed + 1,  # the prompt's last position, then every packed input
        use_cache=False,
    )
    return out.logits[batch.step_row, batch.step_pos]  # (N, V)


def response_sums(values: torch.Tensor, batch: PreferenceBatch) -> torch.Tensor:
    """(U, R) the sum over each response's steps of per-step ``values`` (N,)."""
    U, R = batch.items.shape
    sums = values.new_zeros(U * R).index_add(0, batch.step_response, values)
    return sums.reshape(U, R)


def check_preference_model(model) -> None:
    """ValueError unless the model's attention is known to honour the 4-D mask
    ``preference_logits`` uses (an attention that ignores it would train on wrong sequences)."""
    attn = attention_implementation(model)
    if attn not in TREE_ATTENTION:
        raise ValueError(
            f"preference losses feed a prompt's responses side by side under a 4-D attention mask, "
            f"which the model's attention implementation {attn!r} is not known to honour; load the "
            f"model with attn_implementation in {list(TREE_ATTENTION)}"
        )

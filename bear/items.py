"""Token sequences in response context: items, the trie, training batches (SPEC §3).

An item's tokens are those of its response (quoted title) when it follows the response header, so
training targets, trie paths and decoding agree token for token. ``check_in_context`` verifies that
tokenising a full prompt + response gives exactly prompt tokens + item tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bear.data import Dataset, Example
from bear.prompts import PromptText, format_prompt, format_response

__all__ = [
    "ContextError",
    "item_sequences",
    "title_sequences",
    "check_in_context",
    "encode_prompts",
    "Batch",
    "collate",
    "left_pad",
    "right_align",
]

IGNORE_INDEX = -100  # target of rows that are not supervised (bear_kernels' default)


class ContextError(ValueError):
    """An item whose tokens change with the prompt before it (the boundary is not stable)."""


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:  # a split with no rows (upstream's protocol has no validation)
        return []
    return tokenizer(texts, add_special_tokens=True)["input_ids"]


def item_sequences(
    tokenizer, titles: dict[int, str], domain: str | PromptText
) -> dict[int, list[int]]:
    """Item id -> the tokens of its response (without EOS) after a prompt's response header.

    ``domain``: a domain name or the ``PromptText`` of the prompts (``bear.prompts``): each
    response is tokenised after a reference prompt of that layout (``title_sequences``).
    Raises ``ContextError`` if the prompt's tokens are not a prefix of the joint tokenisation.
    """
    return title_sequences(tokenizer, titles, format_prompt(["..."], domain))


def title_sequences(tokenizer, titles: dict[int, str], context: str) -> dict[int, list[int]]:
    """Item id -> the tokens of ``format_response(title)`` (without EOS) as they follow
    ``context``: ``tokenizer(context + response)`` (special tokens added) less the context's own
    tokens, so that a trie built from them matches labels tokenised the same way.

    Raises ``ContextError`` naming the first item whose tokens merge with the context's (the
    context's tokens are not a prefix of the joint ones, or the response adds none).
    """
    (ctx_ids,) = _encode(tokenizer, [context])
    ids = sorted(titles)
    joint = _encode(tokenizer, [context + format_response(titles[i]) for i in ids])
    out = {}
    for item, seq in zip(ids, joint, strict=True):
        if seq[: len(ctx_ids)] != ctx_ids or len(seq) == len(ctx_ids):
            raise ContextError(
                f"item {item} ({titles[item]!r}): its tokens merge with the end of the prompt "
                f"({context[-20:]!r}); end the prompt with a newline or a space the tokenizer "
                "keeps apart"
            )
        out[item] = seq[len(ctx_ids) :]
    return out


def check_in_context(tokenizer, dataset: Dataset, examples: list[Example], items: dict) -> None:
    """Raise ``ContextError`` for the first example whose prompt + response tokenises differently
    from prompt tokens + item tokens (i.e. whose trie path would not match its training target)."""
    prompts = [
        format_prompt([dataset.titles[i] for i in e.history], dataset.prompt) for e in examples
    ]
    full = [
        p + format_response(dataset.titles[e.target])
        for p, e in zip(prompts, examples, strict=True)
    ]
    for e, p_ids, f_ids in zip(
        examples, _encode(tokenizer, prompts), _encode(tokenizer, full), strict=True
    ):
        if f_ids != p_ids + items[e.target]:
            raise ContextError(
                f"{e.source}: item {e.target} tokenises differently after this prompt "
                f"({f_ids[len(p_ids) :]} vs {items[e.target]})"
            )


def encode_prompts(
    tokenizer, dataset: Dataset, examples: list[Example], inference: bool = False
) -> list[list[int]]:
    """Prompt token ids (with the tokenizer's special tokens) of each example; ``inference``:
    upstream's inference prompt (``bear.prompts.format_prompt``)."""
    texts = [
        format_prompt([dataset.titles[i] for i in e.history], dataset.prompt, inference)
        for e in examples
    ]
    return _encode(tokenizer, texts)


def right_align(x: torch.Tensor, lengths: torch.Tensor, width: int, pad: int) -> torch.Tensor:
    """Move the first ``lengths[u]`` entries of row u of ``x`` (U, L) to the end of a width row."""
    cols = torch.arange(width, device=x.device) - (width - lengths)[:, None]  # (U, width)
    valid = cols >= 0
    out = x.gather(1, cols.clamp(min=0, max=x.shape[1] - 1))  # (U, width)
    return torch.where(valid, out, torch.full_like(out, pad))


@dataclass
class Batch:
    """A left-padded batch: prompts alone (for decoding) and prompt + response (for the loss).

    The last ``width`` positions of ``input_ids`` predict the right-aligned ``target``.
    """

    prompt_ids: torch.Tensor  # (U, P) left-padded prompts
    prompt_mask: torch.Tensor  # (U, P)
    input_ids: torch.Tensor  # (U, T) left-padded prompt + response tokens (without EOS)
    attention_mask: torch.Tensor  # (U, T)
    position_ids: torch.Tensor  # (U, T) 0 at each row's first real token
    target: torch.Tensor  # (U, width) response tokens + EOS, right-aligned, IGNORE_INDEX left
    node_ids: torch.Tensor  # (U, width) trie node whose children are allowed, -1 where ignored
    items: torch.Tensor  # (U,) target item ids
    response_len: torch.Tensor  # (U,) response tokens + 1 (EOS)

    @property
    def width(self) -> int:
        return self.target.shape[1]

    def to(self, device) -> Batch:
        return Batch(**{k: v.to(device) for k, v in self.__dict__.items()})


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids, attention mask), both (U, max length) int64, each row's tokens at the
    right end and ``pad_id`` (mask 0) before them: the layout decoding and the loss expect."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (U, width)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (U, width)
    for u, r in enumerate(rows):
        if r:
            ids[u, width - len(r) :] = torch.tensor(r)
            mask[u, width - len(r) :] = 1
    return ids, mask


def collate(prompts: list[list[int]], targets: list[int], items: dict, trie, pad_id: int) -> Batch:
    """Build a ``Batch`` from prompt token lists, target item ids and the item token table
    (``trie``: the catalogue trie on the CPU)."""
    eos = trie.eos_token_id
    responses = [items[t] + [eos] for t in targets]
    lengths = torch.tensor([len(r) for r in responses])  # (U,)
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    input_ids, attention_mask = left_pad(
        [p + r[:-1] for p, r in zip(prompts, responses, strict=True)], pad_id
    )
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # (U, T)
    width = int(lengths.max())
    resp = torch.full((len(targets), width), IGNORE_INDEX, dtype=torch.long)  # (U, width)
    for u, r in enumerate(responses):
        resp[u, : len(r)] = torch.tensor(r)
    item_ids = torch.tensor(targets, dtype=torch.long)  # (U,)
    nodes = trie.path_nodes(item_ids).cpu()  # (U, L_max + 1); trie on the CPU
    return Batch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        target=right_align(resp, lengths, width, IGNORE_INDEX),
        node_ids=right_align(nodes, lengths, width, -1),
        items=item_ids,
        response_len=lengths,
    )

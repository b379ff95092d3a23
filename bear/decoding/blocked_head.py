"""Target log-probabilities straight from a model's last hidden states (teacher forcing).

Scoring a known token at N positions needs, per position, its logit and the log-sum-exp of the
position's logits: no (N, V) logits tensor. `target_log_softmax` applies the output layer to
ROWS_PER_BLOCK positions and VOCAB_PER_BLOCK tokens at a time and keeps the log-sum-exp running
over the blocks (the online softmax), so the logits are written and read in blocks that stay in
cache instead of as one (N, V) tensor (what made ``score_items`` faster: benchmarks/README.md,
"Catalogue size"), same values to float32 rounding.

`plain_head` proves once per model that its logits are its output layer applied to its last
hidden states (bit for bit at one position): a model that post-processes its logits (a soft cap,
a logit scale) is told apart, and its caller uses the model's own logits. `hidden_forward` then
runs the model for its last hidden states, computing no logits.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from bear.decoding.prompt_cache import keeps_logits

__all__ = ["hidden_forward", "plain_head", "target_log_softmax"]

ROWS_PER_BLOCK = 512  # positions per block of logits
VOCAB_PER_BLOCK = 2048  # tokens per block: 512 x 2048 float32 = 4 MB, a block that stays in cache;
# on this project's CPU, blocks of 128-1024 rows and 1024-4096 tokens ran within 15 % of each other
LOG2_E = 1.4426950408889634  # log2(e)
# model -> whether its logits are its output layer applied to its last hidden states (`plain_head`)
_PLAIN_HEAD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def plain_head(model, token_ids: torch.Tensor) -> nn.Linear | None:
    """The model's output layer when its logits are that layer's weight and bias applied to its
    last hidden states, else None: a model that post-processes its logits (a soft cap, a logit
    scale, a hook on the layer that changes its output), whose output layer is not a plain
    ``nn.Linear`` or has its weight elsewhere than ``token_ids`` (offloaded, on "meta"), or
    whose forward takes no ``logits_to_keep``.

    Proved once per model object, the answer kept in `_PLAIN_HEAD` (a model changed afterwards,
    a soft cap set or such a hook added, keeps its answer): a forward of token_ids (1, t) without
    a cache computes the logits at its last position, and ``F.linear`` of the hidden state there
    (same shapes, the operation `target_log_softmax` runs) must give them bit for bit.

    Raises:
        ValueError: token_ids not (1, t) with t >= 1.
    """
    if token_ids.dim() != 2 or token_ids.shape[0] != 1 or token_ids.shape[1] < 1:
        raise ValueError(
            f"token_ids: expected (1, t) token ids with t >= 1 (one prompt's tokens), got shape "
            f"{tuple(token_ids.shape)}"
        )
    if not keeps_logits(model) or not hasattr(model, "get_output_embeddings"):
        return None
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear or head.weight.device != token_ids.device:
        return None
    plain = _PLAIN_HEAD.get(model)
    if plain is None:
        keep = torch.tensor([token_ids.shape[1] - 1], device=token_ids.device)
        with torch.no_grad():
            out = model(
                input_ids=token_ids, use_cache=False, output_hidden_states=True, logits_to_keep=keep
            )
            h = out.hidden_states[-1] if out.hidden_states else None
            mine = None if h is None else F.linear(h[:, keep], head.weight, head.bias)
        # a model that casts its logits (to float32, say) after the layer is still plain
        plain = mine is not None and _same(mine.to(out.logits.dtype), out.logits)
        _PLAIN_HEAD[model] = plain
    return head if plain else None


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit equal, NaN equal to NaN (a model with a NaN logit is still plain)."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def hidden_forward(model, **inputs) -> tuple:
    """(the model's output, (r, T, H) its last hidden states) for a forward of ``inputs`` (the
    model's keyword arguments, ``input_ids`` (r, T) among them) that computes no logits: for a
    model whose `plain_head` is not None, the hidden states its logits would come from. The
    output holds every layer's hidden states: a caller that needs only the cache keeps that."""
    keep = torch.empty(0, dtype=torch.int64, device=inputs["input_ids"].device)
    out = model(**inputs, output_hidden_states=True, logits_to_keep=keep)
    return out, out.hidden_states[-1]


def target_log_softmax(
    h: torch.Tensor, head: nn.Linear, targets: torch.Tensor, allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """log_softmax(z)[y] at N positions without their (N, V) logits z = h W^T + b:

        z_y - logsumexp_{k in A} z_k     (A: every token, or ``allowed``'s)

    computed blockwise: per block of tokens, its logits (in the head's dtype, as the model's),
    z_y where y falls in the block, and the running maximum m and sum s = sum_k exp(z_k - m)
    rescaled when m grows. As `torch.logsumexp`, a maximum of +-inf shifts by 0; NaN where the
    log-sum-exp is +inf (a +inf logit) or a logit is NaN, -inf for a target of logit -inf.

    Args:
        h: (N, H) last hidden states.
        head: the output layer (V, H) weight, optional (V,) bias.
        targets: (N,) int64 token ids in [0, V).
        allowed: (N, V') bool with V' <= V, the tokens each position's softmax runs over (those
            past V' never); None: all V.

    Returns:
        (N,) float32.
    """
    N = h.shape[0]
    out = torch.empty(N, device=h.device, dtype=torch.float32)
    for r in range(0, N, ROWS_PER_BLOCK):
        rows = slice(r, r + ROWS_PER_BLOCK)
        out[rows] = _rows_log_softmax(
            h[rows], head, targets[rows], None if allowed is None else allowed[rows]
        )
    return out


def _rows_log_softmax(h, head, y, allowed) -> torch.Tensor:
    """`target_log_softmax` for one block of rows."""
    n, V = h.shape[0], head.weight.shape[0]
    f32 = {"device": h.device, "dtype": torch.float32}
    z_y = torch.full((n,), float("nan"), **f32)  # (n,) the targets' logits
    total = torch.zeros(n, **f32)  # (n,) sum_k exp(z_k - shift)
    top = torch.full((n,), float("-inf"), **f32)  # (n,) running maximum
    shift = torch.zeros(n, **f32)  # (n,) top, or 0 while top is +-inf
    for c in range(0, V, VOCAB_PER_BLOCK):
        cols = slice(c, c + VOCAB_PER_BLOCK)
        bias = None if head.bias is None else head.bias[cols]
        z = F.linear(h, head.weight[cols], bias).float()  # (n, v) this block's logits
        inside = (y >= c) & (y < c + z.shape[1])
        here = z.gather(1, (y - c).clamp(0, z.shape[1] - 1)[:, None]).squeeze(1)
        z_y = torch.where(inside, here, z_y)
        if allowed is not None:  # tokens past allowed's width are never allowed
            a = allowed[:, cols]
            z = z.masked_fill_(~F.pad(a, (0, z.shape[1] - a.shape[1])), float("-inf"))
        top = torch.maximum(top, z.amax(dim=-1))  # NaN stays NaN
        new_shift = top.masked_fill(top.abs() == float("inf"), 0.0)
        # total > 0 only once a finite logit was seen, so shift <= new_shift (or new_shift is 0
        # after a +inf, and the result is NaN anyway): no rescaling of 0 by exp(+large)
        total = torch.where(total > 0, total * torch.exp(shift - new_shift), total)
        # exp(x) as 2^(x log2 e): torch's exp2 ran faster than its exp in a probe on this
        # project's CPU (not a committed benchmark)
        total = total + z.sub_(new_shift[:, None]).mul_(LOG2_E).exp2_().sum(dim=-1)
        shift = new_shift
    lse = total.log() + shift
    return torch.where(lse == float("inf"), float("nan"), z_y - lse)

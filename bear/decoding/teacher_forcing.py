"""Teacher-forced item scores (SPEC §4): the sum of an item's per-step log-probabilities."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bear.decoding import blocked_head
from bear.decoding.blocked_head import hidden_forward, plain_head, target_log_softmax
from bear.decoding.common import check_inputs, model_vocab
from bear.decoding.prompt_cache import PromptCache, cache_kwarg, layer_tensors, prefill
from bear.trie import ItemTrie

__all__ = ["continuation_logits", "item_logits", "score_items"]

ROW_BUDGET = 2**24  # logits elements per teacher-forcing chunk (64 MB in float32), or, when the
# items are scored from hidden states (`blocked_head`), hidden-state elements of every layer: on
# this project's CPU, larger logits chunks made score_items slower on the tiny Llama of
# catalogue_scale.py (fresh large buffers cost their page faults), smaller ones on SmolLM2-135M
CACHE_BUDGET = 2**25  # prompt key/value elements copied per score_items chunk


def continuation_logits(model, input_ids, mask, rows, cont) -> torch.Tensor:
    """Logits for prompt `rows` followed by right-padded continuations, without a cache.

    Args:
        input_ids, mask: (U, P) left-padded prompts.
        rows: (R,) the prompt of each continuation.
        cont: (R, T) int64 continuation tokens, -1 padded on the right.

    Returns:
        (R, T + 1, V) float32, where [r, j] predicts token j of the continuation (j = 0 from the
        prompt's last position). Chunked to at most ROW_BUDGET logits elements per forward.
    """
    R, T = cont.shape
    P = input_ids.shape[1]
    V = model_vocab(model) or 1
    chunk = max(1, ROW_BUDGET // max(1, (P + T) * V))
    outs = []
    for s in range(0, R, chunk):
        r = rows[s : s + chunk]
        c = cont[s : s + chunk]
        ids = torch.cat([input_ids[r], c.clamp(min=0)], dim=1)
        m = torch.cat([mask[r], (c >= 0).to(mask.dtype)], dim=1)
        pos = (m.cumsum(-1) - 1).masked_fill(m == 0, 0)
        logits = model(input_ids=ids, attention_mask=m, position_ids=pos, use_cache=False).logits
        outs.append(logits[:, P - 1 :].float())
    return torch.cat(outs, dim=0)


def _forced_tokens(trie: ItemTrie, item_ids: torch.Tensor):
    """What teacher forcing feeds and predicts for items (R,), up to the longest among them
    (not the catalogue's): targets (R, L+1) their tokens with EOS, -100 after the end; nodes
    (R, L+1) the trie node each step chooses among, -1 after the end; cont (R, L) the inputs
    after the prompt (every target but the last), -1 after the end."""
    targets = trie.item_tokens(item_ids)  # (R, L_max+1), -100 padded (catalogue's longest)
    width = int((targets != -100).sum(1).max())  # these items' longest, EOS included
    targets, nodes = targets[:, :width], trie.path_nodes(item_ids)[:, :width]
    return targets, nodes, _fed_tokens(targets)


def _fed_tokens(targets: torch.Tensor) -> torch.Tensor:
    """(R, L) the tokens teacher forcing feeds for targets (R, L+1): every target but the last,
    -1 after an item's end."""
    return torch.where(targets[:, :-1] >= 0, targets[:, :-1], -1)


@torch.no_grad()
def item_logits(model, prompt: PromptCache, trie: ItemTrie, item_ids: torch.Tensor):
    """Teacher-forced logits of one item per prompt, read from the prompts' cache.

    Step t of item i predicts token t of ``trie.item_tokens(i)`` (EOS last): step 0 is the
    prompt's own next-token logits, step t >= 1 comes from feeding the item's first t tokens after
    the cached prompt (one forward for all steps). Chunked to at most ROW_BUDGET logits elements
    per forward.

    Args:
        prompt: a `PromptCache` of U prompts.
        trie: the catalogue, on the prompts' device.
        item_ids: (U,) one item per prompt.

    Returns:
        (logits (U, L + 1, V) float32, targets (U, L + 1) the item tokens with EOS, -100 after the
        item's end, nodes (U, L + 1) the trie node each step chooses among, -1 after the end);
        L is the longest title among the items.

    Raises:
        ValueError: item_ids not (U,) integers, or an item id not in the trie.
    """
    U = prompt.input_ids.shape[0]
    item_ids = torch.as_tensor(item_ids)
    if item_ids.shape != (U,) or item_ids.is_floating_point() or item_ids.dtype == torch.bool:
        raise ValueError(
            f"item_ids: expected one integer item id per prompt, shape ({U},), got "
            f"{item_ids.dtype} of shape {tuple(item_ids.shape)}"
        )
    trie = trie.to(prompt.logits.device)
    item_ids = item_ids.to(device=prompt.logits.device, dtype=torch.int64)
    targets, nodes, cont = _forced_tokens(trie, item_ids)  # (U, L+1), (U, L+1), (U, L)
    T, V = cont.shape[1], prompt.logits.shape[-1]
    chunk = max(1, ROW_BUDGET // max(1, (T + 1) * V))
    outs = []
    for s in range(0, U, chunk):
        part = prompt.select(slice(s, s + chunk))
        first = part.logits[:, None]  # (r, 1, V) the prompt's next-token logits
        later = _fed_logits(model, part, cont[s : s + chunk])
        outs.append(first if later is None else torch.cat([first, later], dim=1))
    return torch.cat(outs, dim=0), targets, nodes


def _fed_logits(model, part: PromptCache, cont: torch.Tensor) -> torch.Tensor | None:
    """(r, T, V) float32 logits of feeding continuations cont (r, T) (-1 padded on the right)
    after the r cached prompts of ``part``, [i, j] predicting token j + 1; None when T = 0."""
    if cont.shape[1] == 0:
        return None
    return model(**_fed_inputs(model, part, cont)).logits.float()


def _fed_inputs(model, part: PromptCache, cont: torch.Tensor) -> dict:
    """The model's keyword arguments that feed continuations cont (r, T) (-1 padded on the
    right) after the r cached prompts of ``part`` (a new cache holding their entries)."""
    mask = torch.cat([part.kv_mask, (cont >= 0).to(part.kv_mask.dtype)], dim=1)
    pos = part.last_pos[:, None] + 1 + torch.arange(cont.shape[1], device=cont.device)  # (r, T)
    return {
        "input_ids": cont.clamp(min=0),
        "attention_mask": mask,
        "position_ids": pos,
        "use_cache": True,
        cache_kwarg(model): part.dynamic_cache(),
    }


def _step_logprobs(trie, logits, nodes, targets, scoring, consume: bool = False):
    """log p of `targets` (N,) under `scoring` given logits (N, V) and trie nodes (N,).

        after:   z_y - logsumexp_k z_k
        before:  z_y - logsumexp_{k in A} z_k  (A: the node's children); for a node with one
                 child that is 0 when z_y is finite, NaN when it is not, without a softmax

    The trie's vocabulary may be smaller than the model's (a trie built without `vocab_size`
    ends at its largest token): the model's extra tokens are never children. ``consume``: the
    logits are the caller's own and not read again ("after" overwrites them, saving a
    temporary of their size).
    """
    z_y = logits.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1)  # (N,)
    if scoring == "after":
        return _target_log_softmax(z_y, logits, in_place=consume)
    n = nodes.clamp(min=0)
    branching = (nodes >= 0) & (trie.child_ptr[n + 1] - trie.child_ptr[n] > 1)
    logp = torch.where(torch.isfinite(z_y), 0.0, float("nan")).to(logits.dtype)
    rows = branching.nonzero().squeeze(-1)
    children = trie.children_dense(nodes[rows])  # (N', trie V)
    allowed = F.pad(children, (0, logits.shape[-1] - children.shape[-1]))  # (N', V)
    z = logits[rows].masked_fill(~allowed, float("-inf"))
    return logp.index_put((rows,), _target_log_softmax(z_y[rows], z, in_place=True))


def _target_log_softmax(z_y: torch.Tensor, z: torch.Tensor, in_place: bool = False):
    """``log_softmax(z)`` at the entries z_y (N,) of the rows z (N, V), no log-softmax written:
    z_y - logsumexp(z), NaN where a +inf logit makes log_softmax NaN. ``in_place``: z is
    overwritten (see `_log_sum_exp`)."""
    return _minus_log_sum_exp(z_y, _log_sum_exp(z, in_place))


def _log_sum_exp(z: torch.Tensor, in_place: bool) -> torch.Tensor:
    """(N,) logsumexp of the rows z (N, V). ``in_place``: z is overwritten (with exp(z - max))
    instead of copied, the same operations as `torch.logsumexp` (a row's maximum, 0 where it is
    infinite, subtracted; exp; sum; log; the maximum added back), without its temporary of z's
    size."""
    if not in_place:
        return torch.logsumexp(z, dim=-1)
    top = z.amax(dim=-1, keepdim=True)
    top = top.masked_fill(top.abs() == float("inf"), 0.0)
    return z.sub_(top).exp_().sum(dim=-1).log_().add_(top.squeeze(-1))


def _minus_log_sum_exp(z_y: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """z_y - lse, NaN where lse is +inf (log_softmax of a row with a +inf logit)."""
    return torch.where(lse == float("inf"), float("nan"), z_y - lse)


@torch.no_grad()
def score_items(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    trie: ItemTrie,
    item_ids: torch.Tensor,
    scoring: str = "before",
    prompt: PromptCache | None = None,
) -> torch.Tensor:
    """Teacher-forced item scores: sum_t log p(y_t | x, y_<t), EOS included (no length penalty).

    Each prompt runs once (``prompt``: a prefill already made, else one here) and its
    next-token log-sum-exp is computed once for all its items (step 0); every item is fed after
    its prompt's cached keys and values. When the model's logits are its output layer applied to
    its last hidden states (`blocked_head.plain_head`, proved once per model), the forward
    computes no logits and each item position's log p comes from its hidden state, the output
    layer applied a block of tokens at a time (`blocked_head.target_log_softmax`; under
    "before", only at positions on a node with several children); otherwise from the model's
    logits at the items' positions. A model whose cache does not keep every prompt position (a
    sliding window) runs each prompt again with its items instead.

    Args:
        model: a Hugging Face causal LM.
        input_ids, attention_mask: (U, P) left-padded prompts.
        trie: the catalogue; moved to the model's device.
        item_ids: (U, M) item ids (any id of a leaf; identical titles score identically).
        scoring: "before" or "after" (see `bear.decoding`).
        prompt: a `PromptCache` of these prompts, or None.

    Returns:
        (U, M) float32.

    Raises:
        ValueError / TypeError: bad inputs (see `check_inputs`), item_ids not (U, M), an item id
            not in the trie, or a ``prompt`` of other prompts.
    """
    mask = check_inputs(model, input_ids, attention_mask, trie, scoring)
    device = input_ids.device
    trie = trie.to(device)
    item_ids = torch.as_tensor(item_ids, dtype=torch.int64, device=device)
    if item_ids.dim() != 2 or item_ids.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"item_ids must be (U, M) with U={input_ids.shape[0]}, got {tuple(item_ids.shape)}"
        )
    U, M = item_ids.shape
    if M == 0:
        return torch.zeros(U, 0, device=device, dtype=torch.float32)
    flat = item_ids.reshape(-1)  # R = U·M rows
    rows = torch.arange(U, device=device).repeat_interleave(M)
    if prompt is not None:
        prompt.check_prompts(input_ids, mask)
    else:
        prompt = _prompt_cache(model, input_ids, mask)
    targets, nodes, cont = _forced_tokens(trie, flat)  # (R, L+1), (R, L+1), (R, L)
    if prompt is None:  # the cache drops positions: each prompt runs again with its items
        logits = continuation_logits(model, input_ids, mask, rows, cont)  # (R, L+1, V)
        return _summed(trie, logits, nodes, targets, scoring).view(U, M)
    steps = (targets != -100).sum(1)  # (R,) each item's steps, EOS included
    order = steps.argsort(stable=True)  # items of like length share a chunk: little padding
    scores = _first_logprobs(trie, prompt.logits, rows, targets[:, 0], scoring)  # (R,)
    head = plain_head(model, input_ids[:1, -1:])  # None: full logits, chunks within ROW_BUDGET
    # elements per item position: V logits, or the hidden states of the embeddings and each layer
    if head is None:
        per_position = prompt.logits.shape[-1]
    else:
        per_position = (len(prompt.layers) + 1) * head.in_features
    chunk = min(CACHE_BUDGET // max(1, _cache_elements(prompt)),  # prompt entries copied
                ROW_BUDGET // (targets.shape[1] * per_position))  # fmt: skip
    chunk = max(1, chunk)
    for s in range(0, U * M, chunk):
        picked = order[s : s + chunk]
        width = int(steps[picked].max())  # these items' longest, EOS included
        part = prompt.select(rows[picked], logits=False)  # the prompts' entries, once per item
        scores[picked] += _later_logprobs(
            model, part, trie, targets[picked, :width], nodes[picked, :width], scoring, head
        ).sum(-1)
    return scores.view(U, M)


def _first_logprobs(trie: ItemTrie, logits, rows, targets, scoring) -> torch.Tensor:
    """(R,) float32 log p of each item's first token, targets (R,), from its prompt's next-token
    logits (U, V) (rows (R,): each item's prompt), as `_step_logprobs` at the root computes them,
    with each prompt's log-sum-exp computed once instead of once per item."""
    z_y = logits[rows, targets]  # (R,)
    if scoring == "after":
        return _minus_log_sum_exp(z_y, torch.logsumexp(logits, dim=-1)[rows])
    root = torch.zeros(1, dtype=torch.int64, device=logits.device)
    if int(trie.child_ptr[1] - trie.child_ptr[0]) < 2:  # one child: no softmax
        return torch.where(torch.isfinite(z_y), 0.0, float("nan")).to(logits.dtype)
    children = trie.children_dense(root)  # (1, trie V)
    allowed = F.pad(children, (0, logits.shape[-1] - children.shape[-1]))  # (1, V)
    lse = _log_sum_exp(logits.masked_fill(~allowed, float("-inf")), in_place=True)  # (U,)
    return _minus_log_sum_exp(z_y, lse[rows])


def _later_logprobs(model, part: PromptCache, trie: ItemTrie, targets, nodes, scoring, head):
    """(r, L) float32 teacher-forced log-probabilities of steps 1..L of one item per cached
    prompt of ``part`` (its targets and nodes (r, L+1) as ``_forced_tokens`` gives them), 0 after
    an item's end: one forward of the items' tokens, scored from its last hidden states through
    ``head`` (`blocked_head`), or from its logits when ``head`` is None."""
    cont = _fed_tokens(targets)  # (r, L)
    if cont.shape[1] == 0:
        return cont.new_zeros(cont.shape, dtype=torch.float32)
    if head is not None:
        h = hidden_forward(model, **_fed_inputs(model, part, cont))[1]  # (r, L, H)
        return _hidden_logprobs(trie, h, head, nodes[:, 1:], targets[:, 1:], scoring)
    logits = _fed_logits(model, part, cont)  # (r, L, V)
    later = _step_logprobs(  # ``logits`` is this forward's own output, read no more
        trie,
        logits.reshape(-1, logits.shape[-1]),
        nodes[:, 1:].reshape(-1),
        targets[:, 1:].reshape(-1),
        scoring,
        consume=True,
    ).view_as(cont)
    return torch.where(targets[:, 1:] != -100, later, 0.0).float()


def _hidden_logprobs(trie, h, head, nodes, targets, scoring) -> torch.Tensor:
    """(r, T) float32 log p of ``targets`` (r, T) from the last hidden states h (r, T, H) through
    the output layer ``head``, as `_step_logprobs` computes them from logits, 0 where a target
    is -100 (no logits at those positions). Under "before", only positions on a branching node
    compute logits, over the node's children only."""
    real = (targets >= 0).nonzero(as_tuple=True)
    hs, y, at = h[real], targets[real], nodes[real]  # (N, H), (N,), (N,)
    if scoring == "after":
        values = target_log_softmax(hs, head, y)
    else:  # one child: 0 (NaN for a non-finite logit); several: the children's softmax
        z_y = (hs.float() * head.weight[y].float()).sum(-1)  # (N,) finiteness only
        if head.bias is not None:
            z_y = z_y + head.bias[y].float()
        z_y = z_y.to(h.dtype)  # a logit past the model's dtype's range is inf there
        values = torch.zeros(z_y.shape, device=h.device, dtype=torch.float32)
        values = values.masked_fill_(~torch.isfinite(z_y), float("nan"))
        branching = (trie.child_ptr[at + 1] - trie.child_ptr[at] > 1).nonzero().squeeze(-1)
        rows = blocked_head.ROWS_PER_BLOCK  # (rows, trie V) child masks at a time
        for r in range(0, branching.numel(), rows):
            b = branching[r : r + rows]
            values[b] = target_log_softmax(hs[b], head, y[b], trie.children_dense(at[b]))
    logp = torch.zeros(targets.shape, device=h.device, dtype=torch.float32)
    logp[real] = values
    return logp


def _cache_elements(prompt: PromptCache) -> int:
    """Elements of one prompt's keys and values over every layer (what ``select`` copies)."""
    return sum((k[0].numel() + v[0].numel()) for k, v in prompt.layers)


def _prompt_cache(model, input_ids, mask) -> PromptCache | None:
    """The prompts prefilled once, or None for a model whose cache does not keep every prompt
    position (``layer_tensors`` refuses it)."""
    cache, kv_mask, last_pos, logits = prefill(model, input_ids, mask)
    try:
        layers = layer_tensors(cache, kv_mask.shape[1])
    except ValueError:
        return None
    return PromptCache(layers, input_ids, mask, kv_mask, last_pos, logits)


def _summed(trie, logits, nodes, targets, scoring) -> torch.Tensor:
    """(R,) float32: the sum over an item's steps of log p of its tokens, EOS included."""
    flat = logits.reshape(-1, logits.shape[-1])  # the caller's own (``score_items``)
    lp = _step_logprobs(
        trie, flat, nodes.reshape(-1), targets.reshape(-1), scoring, consume=True
    ).view_as(targets)
    return torch.where(targets != -100, lp, 0.0).sum(-1).float()

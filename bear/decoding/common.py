"""What every trie-constrained decoder shares: input checks, child log-probabilities over the trie,
a stable top-k and the ranked result (SPEC §4; scoring modes in `bear.decoding`)."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch

from bear.trie import ItemTrie

__all__ = [
    "DecodeResult",
    "check_finite_float",
    "check_inputs",
    "check_no_nan_scores",
    "check_positive_int",
    "beam_children",
    "child_logprobs",
    "max_candidates",
    "root_children",
    "max_fanout",
    "step_widths",
    "model_vocab",
    "ranked_result",
    "topk_stable",
]

SCORINGS = ("before", "after")


@dataclass
class DecodeResult:
    """Ranked items per user.

    item_ids: (U, K) int64 canonical item ids, best first, -1 where fewer than K items exist.
    scores:   (U, K) float32 scores, -inf where padded.
    complete: (U,) bool, False where a search stopped at its budget before finding K items
        (``exact_topk(max_expansions=)``): the items it holds are still the best, in order; None
        from searches without a budget.
    """

    item_ids: torch.Tensor
    scores: torch.Tensor
    complete: torch.Tensor | None = None

    def sequences(self, trie: ItemTrie) -> torch.Tensor:
        """(U, K, L + 1) each item's tokens then EOS, -100 after it (and for padding), as
        ``generate`` would have produced them after the prompt."""
        U, K = self.item_ids.shape
        real = (self.item_ids >= 0).to(trie.device)
        some_item = trie.leaf_item[trie.leaf_item >= 0][0]  # stands in for the padding
        ids = torch.where(real, self.item_ids.to(trie.device), some_item).reshape(-1)
        tokens = trie.item_tokens(ids).reshape(U, K, -1)
        return torch.where(real[..., None], tokens, -100)

    def texts(self, trie: ItemTrie, tokenizer) -> list[list[str]]:
        """Each user's items as text (``tokenizer.decode`` of their tokens, EOS dropped), best
        first; padding is left out. The text is the response as the trie holds it: a trie of
        ``ItemTrie.from_titles`` gives the title in the quotes ``format_response`` adds."""
        eos = trie.eos_token_id
        out = []
        for row, ids in zip(self.sequences(trie).tolist(), self.item_ids.tolist(), strict=True):
            kept = [seq for seq, item in zip(row, ids, strict=True) if item >= 0]
            out.append([tokenizer.decode([t for t in seq if t >= 0 and t != eos]) for seq in kept])
        return out


def model_vocab(model) -> int | None:
    """Rows of the model's output embedding (else `config.vocab_size`, else None)."""
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and hasattr(emb, "weight"):
        return int(emb.weight.shape[0])
    return getattr(getattr(model, "config", None), "vocab_size", None)


def check_inputs(model, input_ids, attention_mask, trie, scoring) -> torch.Tensor:
    """Validate the arguments every decoder takes; return the (U, P) int64 attention mask.

    Raises:
        TypeError: trie is not an ItemTrie, input_ids is not an integer tensor.
        ValueError: unknown scoring, input_ids not (U, P) or empty, token ids outside the
            model's vocabulary, a mask of another shape or not left-padded, or trie tokens
            outside the model's vocabulary.
    """
    if not isinstance(trie, ItemTrie):
        raise TypeError(f"trie must be a bear.trie.ItemTrie, got {type(trie).__name__}")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    mask = check_prompt_ids(model, input_ids, attention_mask)
    vocab = model_vocab(model)
    if vocab is not None and trie.vocab_size > vocab:
        raise ValueError(
            f"the trie's vocab_size={trie.vocab_size} exceeds the model's vocabulary ({vocab}); "
            "item token ids must be valid model token ids"
        )
    return mask


def check_prompt_ids(model, input_ids, attention_mask) -> torch.Tensor:
    """Validate left-padded prompts (the part of `check_inputs` about them); return the (U, P)
    int64 attention mask (all ones for None).

    Raises:
        TypeError: input_ids is not an integer tensor.
        ValueError: input_ids not (U, P) or empty, token ids outside the model's vocabulary, a
            mask of another shape or not left-padded.
    """
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(
            f"input_ids must hold integer token ids (torch.int64), got dtype {input_ids.dtype}; "
            "pass the tokenizer's ids, e.g. input_ids.long() if they were cast"
        )
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (U, P), got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
            f"{tuple(input_ids.shape)}"
        )
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids is empty: shape {tuple(input_ids.shape)}")
    mask = attention_mask.to(torch.int64)
    if not bool((mask[:, -1] == 1).all()) or not bool((mask[:, 1:] >= mask[:, :-1]).all()):
        raise ValueError(
            "prompts must be left-padded: each attention_mask row must be 0...0 1...1 and end "
            "with 1 (use tokenizer.padding_side = 'left')"
        )
    vocab = model_vocab(model)
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or (vocab is not None and high >= vocab):
        raise ValueError(
            f"input_ids must be token ids in [0, {vocab if vocab is not None else 'V'}) (the "
            f"model's vocabulary), got ids from {low} to {high}; tokenise with the model's "
            "tokenizer and pad with its pad_token_id (padding positions too must be valid ids)"
        )
    return mask


def check_positive_int(name: str, value) -> int:
    """`value` as an int; TypeError naming `name` unless it is an integer (bools are not),
    ValueError unless it is >= 1."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer >= 1, got the bool {value}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(
            f"{name} must be an integer >= 1, got {value!r} ({type(value).__name__})"
        ) from None
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value}")
    return value


def check_budget(max_expansions) -> None:
    """A search budget: None, or an int >= 0 (TypeError / ValueError otherwise)."""
    if max_expansions is None:
        return
    if isinstance(max_expansions, bool) or not isinstance(max_expansions, int):
        raise TypeError(f"max_expansions must be an int or None, got {max_expansions!r}")
    if max_expansions < 0:
        raise ValueError(f"max_expansions must be >= 0, got {max_expansions}")


def check_finite_float(name: str, value) -> float:
    """`value` as a float; TypeError naming `name` unless it is a real number (bools are not),
    ValueError unless it is finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a finite float, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite float, got {value}")
    return float(value)


def check_no_nan_scores(nan_users: torch.Tensor, users: torch.Tensor | None = None) -> None:
    """ValueError if the model scored any candidate NaN (SPEC §10: never empty rankings).

    Args:
        nan_users: (U',) bool on the host, True where a user's candidate scores hold NaN.
        users: (U',) the global index of each row (default 0..U'-1), for the message.
    """
    if bool(nan_users.any()):
        rows = nan_users.nonzero().view(-1)
        bad = (rows if users is None else users.cpu()[rows])[:5].tolist()
        raise ValueError(
            f"the model's scores are NaN for users {bad} (input_ids rows); they cannot be "
            "ranked. Check the model: NaN weights (a diverged training run) or an overflow in "
            "float16 are the usual causes"
        )


def child_logprobs(trie: ItemTrie, logits, node, width: int, scoring: str):
    """Log-probabilities of the children of each beam's node, padded to `width`.

        before:  log p_j = z_j - logsumexp_{k in A} z_k   (A: the node's children)
        after:   log p_j = log_softmax(z)_j,  j in A

    Args:
        logits: (U, Bc, V) next-token logits of each beam.
        node: (U, Bc) trie node of each beam, -1 for dead beams.
        width: F >= the largest fan-out among `node`.

    Returns:
        logp (U, Bc, F) and edge (U, Bc, F) trie edge ids, -inf / -1 where there is no child.
    """
    n = node.clamp(min=0)
    start = trie.child_ptr[n]  # (U, Bc)
    deg = torch.where(node >= 0, trie.child_ptr[n + 1] - start, torch.zeros_like(start))
    j = torch.arange(width, device=node.device)
    valid = j < deg[..., None]  # (U, Bc, F)
    edge = (start[..., None] + j).clamp(max=max(trie.child_token.shape[0] - 1, 0))
    tok = trie.child_token[edge]  # (U, Bc, F)
    neg_inf = torch.tensor(float("-inf"), device=logits.device)
    if scoring == "after":
        logp = torch.log_softmax(logits, dim=-1).gather(-1, tok)
    else:
        z = torch.where(valid, logits.gather(-1, tok), neg_inf)
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        logp = z - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    logp = torch.where(valid, logp, neg_inf)
    return logp, torch.where(valid, edge, torch.full_like(edge, -1))


def beam_children(trie: ItemTrie, logits, node, width: int, scoring: str, normalized=False):
    """Log-probabilities of every child of every beam, each user's children side by side.

    As ``child_logprobs`` without padding each beam to the widest node: user u's candidates are
    its beams' children in (beam, child) order, ``deg(u, b)`` of them for beam b, padded only up
    to ``width``, the largest number of candidates of one user (``max_candidates``). The order
    is that of ``child_logprobs``' flattened (beam, child) layout, so a stable ranking of either
    picks the same candidates.

    Args:
        logits: (U, Bc, V) next-token logits of each beam.
        node: (U, Bc) trie node of each beam, -1 for dead beams.
        width: W >= the largest sum of the beams' fan-outs of one user.
        normalized: under "after" scoring, ``logits`` already hold log_softmax(z) (the chain
            cache keeps them so): read as they are, no softmax.

    Returns:
        logp (U, W), edge (U, W) trie edge ids and beam (U, W) the candidate's beam; -inf / -1 /
        0 where there is no candidate.
    """
    U, Bc = node.shape
    n = node.clamp(min=0)
    start = trie.child_ptr[n]  # (U, Bc)
    deg = torch.where(node >= 0, trie.child_ptr[n + 1] - start, torch.zeros_like(start))
    ends = deg.cumsum(1)  # (U, Bc) end of each beam's candidates
    p = torch.arange(width, device=node.device).repeat(U, 1)  # (U, W)
    beam = torch.searchsorted(ends, p, right=True).clamp(max=Bc - 1)  # (U, W)
    valid = p < ends[:, -1:]  # (U, W)
    j = p - (ends - deg).gather(1, beam)  # child index within its beam
    edge = (start.gather(1, beam) + j).clamp(min=0, max=max(trie.child_token.shape[0] - 1, 0))
    tok = trie.child_token[edge]  # (U, W)
    V = logits.shape[-1]
    flat = logits.reshape(U, Bc * V)
    neg_inf = torch.tensor(float("-inf"), device=logits.device)
    if scoring == "after":
        logprobs = logits if normalized else torch.log_softmax(logits, dim=-1)
        logp = logprobs.reshape(U, Bc * V).gather(1, beam * V + tok)
    else:
        z = torch.where(valid, flat.gather(1, beam * V + tok), neg_inf)  # (U, W)
        m = torch.full((U, Bc), float("-inf"), device=z.device, dtype=z.dtype)
        m = m.scatter_reduce(1, beam, z, reduce="amax")  # (U, Bc) each beam's largest child
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        shifted = torch.exp(z - m.gather(1, beam))  # 0 where no candidate
        total = torch.zeros_like(m).scatter_add(1, beam, shifted)  # (U, Bc)
        lse = m + torch.log(total)
        lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        logp = z - lse.gather(1, beam)
    logp = torch.where(valid, logp, neg_inf)
    return logp, torch.where(valid, edge, -1), torch.where(valid, beam, 0)


def root_children(trie: ItemTrie, logits, scoring: str, normalized: bool = False):
    """``beam_children`` for beams that are all at the root (a search's first step). The root's
    children are the edges 0 .. F-1 (breadth-first numbering), so its candidates are one gather of
    their tokens' log-probabilities: no padding, no per-beam bookkeeping, O(F) after the softmax
    (F the root's fan-out), in the root's child order, which is token order.

    Args:
        logits: (U, 1, V) next-token logits of each user's root beam (their log-softmax with
            ``normalized``, "after" scoring).

    Returns:
        logp (U, F), edge (U, F), beam (U, F) zeros.
    """
    U = logits.shape[0]
    fanout = trie.depth_fanout_list[0]  # host copy: no synchronisation
    edge = torch.arange(fanout, device=logits.device)  # (F,) the root's edges
    tok = trie.root_tokens  # (F,) int64
    z = logits.reshape(U, -1)
    if scoring == "after":
        logp = (z if normalized else torch.log_softmax(z, dim=-1)).index_select(1, tok)  # (U, F)
    else:
        z = z.index_select(1, tok)  # (U, F)
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        logp = z - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    beam = torch.zeros((), dtype=torch.int64, device=logits.device).expand(U, fanout)
    return logp, edge.expand(U, fanout), beam


def _degrees(trie: ItemTrie, node: torch.Tensor) -> torch.Tensor:
    """Number of children of each node, 0 for -1 entries; int64, node's shape."""
    n = node.clamp(min=0)
    return torch.where(node >= 0, trie.child_ptr[n + 1] - trie.child_ptr[n], 0).long()


def max_candidates(trie: ItemTrie, node: torch.Tensor) -> torch.Tensor:
    """Largest number of children of one user's beams (-1 entries count 0): ``beam_children``'s
    width, as a 0-d device tensor."""
    return step_widths(trie, node)[1]


def max_fanout(trie: ItemTrie, node: torch.Tensor) -> torch.Tensor:
    """Largest number of children among `node` (-1 entries count 0), as a 0-d device tensor."""
    deg = _degrees(trie, node)
    return deg.max() if deg.numel() else torch.zeros((), dtype=torch.int64, device=node.device)


def step_widths(trie: ItemTrie, node: torch.Tensor) -> torch.Tensor:
    """(2,) int64 device tensor from one lookup of the (U, Bc) beams' fan-outs: the largest
    fan-out among them (``max_fanout``) and the most children of one user's beams
    (``max_candidates``); zeros for no beams."""
    deg = _degrees(trie, node)
    if not deg.numel():
        return torch.zeros(2, dtype=torch.int64, device=node.device)
    return torch.stack([deg.max(), deg.sum(-1).max()])


SELECT_FIRST_WIDTH = 1024  # rows this wide try `Tensor.topk` first: below it the general selection
# costs about the same on a CPU, above it the int64 keys cost several passes over the row


def topk_stable(x: torch.Tensor, k: int):
    """The first k along the last dim in the order (value desc, index asc), ties at the cut
    included: (values, indices). (`Tensor.topk` may pick any of the values tied at the k-th,
    so a search that changes its candidates' count could change which tied item it keeps.)

    A selection, not a sort. Rows of at least SELECT_FIRST_WIDTH entries first take `Tensor.topk`
    of k + 1 and keep its first k when the k-th is strictly above the (k+1)-th in every row (no
    tie at the cut: the k chosen are exactly the first k, in `Tensor.topk`'s order when the k + 1
    values are all distinct, else ordered by a stable sort of k entries). Otherwise, for float32
    and narrower, each value and its index form one int64 key (the float's order-preserving bits
    above, the complement of the index below), all distinct, whose `topk` is exactly that order;
    float64 values are sorted stably instead.
    """
    k = min(k, x.shape[-1])
    if x.shape[-1] >= SELECT_FIRST_WIDTH and k > 0:
        chosen = _topk_without_cut_ties(x, k)
        if chosen is not None:
            return chosen
    if x.dtype == torch.float64 or x.shape[-1] >= 2**32:
        val, idx = x.sort(dim=-1, descending=True, stable=True)
        return val[..., :k], idx[..., :k]
    x32 = x.float() + 0.0  # -0.0 becomes +0.0: the two compare equal
    x32 = torch.where(torch.isnan(x32), float("nan"), x32)  # one NaN, ranked first as by sort
    bits = x32.view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)  # float order
    index = torch.arange(x.shape[-1], device=x.device)
    keys = (ordered << 32) | (0xFFFFFFFF - index)  # ties: the lower index is the larger key
    idx = keys.topk(k, dim=-1).indices  # sorted, largest first
    return x.gather(-1, idx), idx


def _topk_without_cut_ties(x: torch.Tensor, k: int):
    """``topk_stable(x, k)`` from one `Tensor.topk` of k + 1 when every row's k-th value is
    strictly above its (k+1)-th (then nothing left out ties with the chosen), else None; the k
    chosen are in `Tensor.topk`'s order when the k + 1 values strictly decrease in every row (the
    usual case: no tie to break), else ordered by (value desc, index asc) with a stable sort of k
    entries (-0.0 beside +0.0 counts as a tie). `Tensor.topk` ranks NaN above every number, as
    sorts do (``tests/test_decoding_hostile.py`` checks it on each device), so a NaN is chosen
    or makes the check fail. One host synchronisation, two when some row has a tie among its
    k + 1 largest."""
    n = x.shape[-1]
    val, idx = x.topk(min(k + 1, n), dim=-1)
    if bool((val[..., :-1] > val[..., 1:]).all()):  # no ties at all: topk's order is the one
        return val[..., :k], idx[..., :k]
    if k < n and not bool((val[..., k - 1] > val[..., k]).all()):
        return None
    val, idx = val[..., :k], idx[..., :k]
    by_index = idx.argsort(dim=-1)
    val, idx = val.gather(-1, by_index), idx.gather(-1, by_index)
    by_value = val.sort(dim=-1, descending=True, stable=True).indices
    return val.gather(-1, by_value), idx.gather(-1, by_value)


def ranked_result(trie: ItemTrie, leaf: torch.Tensor, scores: torch.Tensor) -> DecodeResult:
    """Trie leaves (U, K) (-1 padding) and their scores as a DecodeResult of canonical item ids,
    sorted by score desc, then item id asc; -1 / -inf padding last."""
    item = torch.where(leaf >= 0, trie.leaf_item[leaf.clamp(min=0)].long(), -1)  # (U, K) int64
    key_id = torch.where(item >= 0, item, torch.full_like(item, 2**62))
    o1 = torch.argsort(key_id, dim=-1, stable=True)
    item, scores = item.gather(-1, o1), scores.gather(-1, o1)
    o2 = torch.argsort(scores, dim=-1, descending=True, stable=True)
    return DecodeResult(item.gather(-1, o2), scores.gather(-1, o2).float())

"""Trie-constrained beam search and its thresholds θ_t (SPEC §4, §6), on one expansion step.

`beam_search` and `beam_thresholds` advance the same beam through `expand_beams`, so the
thresholds are those of the real search by construction (the beams `beam_search` skips
because they cannot change its result, `_beams_that_matter`, stay in `beam_thresholds`, as in
Hugging Face's beam, on which θ is defined).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bear.decoding.beam_cache import CopiedKVCache
from bear.decoding.chain_cache import ChainKVCache, default_chain_limit, default_feed_budget
from bear.decoding.common import (
    DecodeResult,
    beam_children,
    check_finite_float,
    check_inputs,
    check_no_nan_scores,
    check_positive_int,
    ranked_result,
    root_children,
    step_widths,
    topk_stable,
)
from bear.decoding.decoder import Decoder
from bear.decoding.pool import FinishedPool
from bear.decoding.prompt_cache import PromptCache
from bear.decoding.registry import register_decoder
from bear.trie import ItemTrie

__all__ = ["BeamSearch", "BeamStep", "beam_search", "beam_thresholds", "expand_beams"]

KV_SHARING = ("tree", "copy")


@dataclass
class BeamStep:
    """One expansion of the beam (U users, k2 = min(2B, Bc*F) candidates, nb = min(B, k2)).

    top, child, is_eos: (U, k2) the best candidates, best first (score desc, index asc): score
        s + log p, trie node, whether the candidate is an EOS edge.
    score, node, token, src: (U, nb) the next live beams: the best B non-EOS candidates, their
        trie node (-1 when dead), the token that extends their parent (EOS when dead), the index
        of that parent among the current beams.
    alive: (U, nb) bool, score is finite.
    nan: (U,) bool, some candidate score is NaN (the model's logits are; see check_no_nan_scores).
    """

    top: torch.Tensor
    child: torch.Tensor
    is_eos: torch.Tensor
    score: torch.Tensor
    node: torch.Tensor
    token: torch.Tensor
    src: torch.Tensor
    alive: torch.Tensor
    nan: torch.Tensor


def expand_beams(
    trie: ItemTrie,
    logits,
    node,
    score,
    width: int,
    B: int,
    scoring: str,
    at_root: bool = False,
    forced: tuple[torch.Tensor, torch.Tensor] | None = None,
    normalized: bool = False,
):
    """Expand every live beam by its trie children and keep the best, as Hugging Face does.

    Candidates are (beam, child) pairs of score s + log p (`beam_children`); the top 2B are
    ranked by (score desc, candidate index asc); the next beams are the best B non-EOS among them.

    Args:
        logits: (U * Bc, V) next-token logits of the current beams.
        node, score: (U, Bc) the current beams' trie nodes (-1 dead) and scores.
        width: W >= the most children of one user's beams (``step_widths``).
        B: beam width.
        at_root: every beam is the root with score 0 (the first step): ``root_children``
            serves it, one gather over the root's children without padding, whose log p are
            the candidates' scores (``width`` and ``score`` are then unused).
        forced: None, or (is_forced (U, Bc) bool, log p (U, Bc)): beams on a one-child node whose
            child's log p is already known (``ChainKVCache.forced``); that log p replaces what
            their logits rows (not kept: any values) would give.
        normalized: under "after" scoring, ``logits`` already hold their log-softmax
            (``ChainKVCache.normalized``).

    Returns:
        BeamStep.
    """
    U, Bc = node.shape
    if at_root:
        logp, edge, beam = root_children(trie, logits.view(U, Bc, -1), scoring, normalized)
    else:
        logp, edge, beam = beam_children(
            trie, logits.view(U, Bc, -1), node, width, scoring, normalized
        )
        if forced is not None:
            is_forced, forced_logp = forced
            logp = torch.where(
                is_forced.gather(1, beam) & (edge >= 0), forced_logp.gather(1, beam), logp
            )
    cand = logp if at_root else score.gather(1, beam) + logp  # (U, W)
    k2 = min(2 * B, cand.shape[1])
    top, idx = topk_stable(cand, k2)  # (U, k2) best first
    e = edge.gather(1, idx).clamp(min=0).long()
    tok = trie.child_token[e].long()  # int64, as the model's input_ids
    child = e + 1
    ok = torch.isfinite(top)
    is_eos = ok & (tok == trie.eos_token_id)
    live_key = torch.where(ok & ~is_eos, top, float("-inf"))
    next_score, li = topk_stable(live_key, min(B, k2))  # (U, nb), already in rank order
    alive = torch.isfinite(next_score)
    return BeamStep(
        top=top,
        child=child,
        is_eos=is_eos,
        score=next_score,
        node=torch.where(alive, child.gather(1, li), -1),
        token=torch.where(alive, tok.gather(1, li), trie.eos_token_id),
        src=beam.gather(1, idx.gather(1, li)),
        alive=alive,
        nan=torch.isnan(top).any(1),  # topk_stable ranks a NaN first
    )


def _beams_that_matter(step: BeamStep, pool_worst, done, alpha: float) -> torch.Tensor:
    """(U, nb) bool: the next beams that can still change the search's result.

    Not those of users that are done, nor dead beams, nor (alpha = 0, where scores only fall)
    live beams scoring at or below a full pool's worst (``pool_worst`` (U,), -inf while the pool
    has room): every candidate they can produce ranks below every candidate that can still enter
    the pool, so dropping them changes neither the pool nor the order of the beams that stay
    (Hugging Face's beam keeps them; its results are the same). Beams are in score order, so
    those that matter are a prefix of each user's."""
    useful = step.alive & ~done[:, None]
    return useful & (step.score > pool_worst[:, None]) if alpha == 0 else useful


@torch.no_grad()
def beam_search(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    trie: ItemTrie,
    beam_width: int = 10,
    scoring: str = "before",
    length_penalty: float = 0.0,
    kv_sharing: str = "tree",
    prompt: PromptCache | None = None,
    *,
    num_beams: int | None = None,
    chain_limit: int | None = None,
) -> DecodeResult:
    """Trie-constrained beam search with Hugging Face semantics, batched over users and beams.

    For ``generate`` users: ``num_beams`` is ``beam_width``'s other name; ``scoring="after"``
    with ``length_penalty=1.0`` ranks as ``generate`` does by default (bear's defaults,
    "before" and 0, rank as msl and bear train; README: "Decoding your own catalogue"); the
    result's ``sequences(trie)`` and ``texts(trie, tokenizer)`` give the items' tokens and text.

    Per step t (beams at trie depth t): candidates are (beam, child) pairs with cumulative score
    s + log p; the top 2B are taken; EOS candidates ranked within the top B enter the finished
    pool with score s / (t + 1) ** alpha; the top B non-EOS candidates stay live. A user stops
    when the pool holds B items and its best live score / (t + 1) ** alpha <= the pool's worst
    (Hugging Face's `early_stopping=False` test; exact for alpha = 0), or when no beam is live.

    Each prompt is prefilled once and its KV cache expanded to the beams after the first step;
    the search synchronises with the host once per step (which users are done), the tree cache
    a few times more in a step that feeds. Beams that cannot change the result (dead ones; at
    alpha = 0, live ones at or below a full pool's worst) are not fed. With the tree cache
    (``ChainKVCache``) most title tokens, which sit on one-child trie nodes, cost no forward of
    their own: under "before" a lone child's log p is 0 whatever the logits, so a beam is fed
    only when it reaches a node with several children (its pending tokens at once; a title's
    unshared tail is never fed); under "after" a beam that enters a node by a choice is fed its
    token and up to ``chain_limit - 1`` forced tokens after it in one forward, which returns
    their log p and the logits where the chain branches. The ranking above is replayed depth by
    depth from those values, so the items are those of a search that feeds one token per step
    (up to rounding: a forward of several tokens rounds differently), and a depth where no kept
    beam needs logits runs no forward. Under "after", a beam pruned inside its chain had tokens
    fed that such a search would not feed.

    Args:
        model: a Hugging Face causal LM.
        input_ids, attention_mask: (U, P) left-padded prompts.
        trie: the catalogue; moved to the model's device.
        beam_width: B >= 1.
        num_beams: B under ``generate``'s name (keyword only); it replaces ``beam_width``'s
            default 10, and an error is raised if ``beam_width`` is given another value.
        scoring: "before" or "after" (see `bear.decoding`).
        length_penalty: alpha.
        kv_sharing: how the beams share their user's prompt cache. "tree" (default): one cache
            row per user, beam chains appended with a custom 4-D attention mask (tree attention;
            needs an attention implementation that honours 4-D masks, as HF's sdpa and eager do),
            one forward per branching point. "copy": the cache is expanded to one row per beam
            and reordered every step through `Cache.batch_select_indices`, one forward per title
            token (works with any model whose cache can be reordered).
        prompt: None (the prompts are prefilled here), or a `PromptCache` of these
            prompts to read instead (shared with other readers of one prefill; the search then
            runs on a DynamicCache made from it, so only for models whose cache keeps every
            position).
        chain_limit: with kv_sharing="tree" and "after" scoring, the most tokens of one chain fed
            in one forward (keyword only; >= 1; "before" feeds a beam's pending tokens whole and
            does not use it). None: ``default_chain_limit(device)``, 16 on a GPU, where a
            forward's cost is mostly its latency, and 1 on a CPU, where it is the tokens fed (a
            chain fed ahead feeds the tokens of beams pruned before they get there, and pads the
            users that have less to feed: benchmarks/README "A pretrained model:
            SmolLM2-135M-Instruct on Office"), raised while few chains are fed
            (``default_feed_budget``: on a CPU a forward of N < 16 chains gives each 16 // N
            tokens). The items are the same for every limit.

    Returns:
        DecodeResult with item_ids (U, B) canonical ids (-1 padding) and scores (U, B) float32.

    Raises:
        ValueError / TypeError: bad inputs (see `check_inputs`), beam_width not an integer >= 1,
            a non-finite length_penalty, chain_limit not an integer >= 1, unknown kv_sharing,
            kv_sharing="tree" with an attention that ignores 4-D masks, or a prompt cache of
            other prompts; ValueError when the model scores a candidate NaN.
    """
    mask = check_inputs(model, input_ids, attention_mask, trie, scoring)
    if num_beams is not None:
        if beam_width not in (10, num_beams):
            raise ValueError(
                f"num_beams={num_beams} and beam_width={beam_width}: the same setting twice; "
                "give one of them"
            )
        beam_width = num_beams
    B = check_positive_int("beam_width", beam_width)
    alpha = check_finite_float("length_penalty", length_penalty)
    if kv_sharing not in KV_SHARING:
        raise ValueError(f"kv_sharing must be 'tree' or 'copy', got {kv_sharing!r}")
    device = input_ids.device
    budget = 0  # a limit given is kept in every forward
    if chain_limit is None:
        chain_limit, budget = default_chain_limit(device), default_feed_budget(device)
    chain_limit = check_positive_int("chain_limit", chain_limit)
    trie = trie.to(device)
    U = input_ids.shape[0]
    neg_inf = float("-inf")
    chains = kv_sharing == "tree"
    if chains:
        kv = ChainKVCache(model, input_ids, mask, trie, scoring, prompt, chain_limit, budget)
    else:
        kv = CopiedKVCache(model, input_ids, mask, prompt)
    out_leaf = torch.full((U, B), -1, dtype=torch.int64, device=device)
    out_score = torch.full((U, B), neg_inf, device=device)
    users = torch.arange(U, device=device)  # global index of each active user
    node = torch.zeros(U, 1, dtype=torch.int64, device=device)  # (Ua, Bc) beams at the root
    score = torch.zeros(U, 1, device=device)  # (Ua, Bc)
    pool = FinishedPool(U, B, alpha, device)  # (Ua, B)
    logits = kv.logits
    width = trie.depth_fanout_list[0]  # the root's fan-out
    normalized = chains and kv.normalized  # "after" rows hold log-probabilities already
    for t in range(trie.max_len + 2):
        forced = kv.forced() if chains else None
        step = expand_beams(
            trie, logits, node, score, width, B, scoring, t == 0, forced, normalized
        )
        node, score = step.node, step.score
        pool.add(step.top, step.child, step.is_eos, t)
        done = pool.done(score[:, 0], t)
        useful = _beams_that_matter(step, pool.worst, done, alpha)
        node = torch.where(useful, node, -1)  # the rest, a suffix (beams in score order), go
        # The one host synchronisation of this step: which users are done, whose scores are
        # NaN, the beams kept and the most children of one user's beams (the next width).
        kept = useful.sum(1).max().view(1)
        host = torch.cat([done.long(), step.nan.long(), kept, step_widths(trie, node)[1:]]).cpu()
        n_users = done.shape[0]
        check_no_nan_scores(host[n_users:-2].bool(), users)
        done_host, nb, width = host[:n_users].bool(), int(host[-2]), max(int(host[-1]), 1)
        if bool(done_host.any()):
            d = done_host.nonzero().view(-1).to(device)
            out_leaf[users[d]] = pool.leaf[d]
            out_score[users[d]] = pool.score[d]
        if bool(done_host.all()):
            break
        keep = (~done_host).nonzero().view(-1).to(device)
        score = torch.where(useful, score, neg_inf)[keep, :nb]
        token = torch.where(useful, step.token, trie.eos_token_id)[keep, :nb]
        users, node = users[keep], node[keep, :nb]
        pool.select(keep)
        if chains:
            logits = kv.step(step.src[keep, :nb], token, node, t + 1, keep)
        else:
            logits = kv.step(step.src[keep, :nb], token, keep)
    else:  # pragma: no cover - the trie has no node deeper than max_len + 1
        raise RuntimeError("beam search ran past the deepest trie node")
    return ranked_result(trie, out_leaf, out_score)


@torch.no_grad()
def beam_thresholds(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    trie: ItemTrie,
    beam_width: int = 10,
    scoring: str = "before",
) -> torch.Tensor:
    """θ_t of SPEC §6: the B-th best candidate score among the children of the step-t beam.

    The beam is `beam_search`'s (same `expand_beams`, every live beam kept), run without its
    finished pool and stopping test: at step t every child of every live beam is a candidate of
    score s + log p (no length penalty); θ_t is the B-th best; the best B non-EOS among the top
    2B form the next beam.

    Args:
        model, input_ids, attention_mask, trie, beam_width, scoring: as `beam_search` (the KV
            cache is shared as kv_sharing="tree", with the device's default chain_limit and
            feed budget).

    Returns:
        (U, L_max + 1) float32; -inf where fewer than B candidates exist.

    Raises:
        As `beam_search`.
    """
    mask = check_inputs(model, input_ids, attention_mask, trie, scoring)
    B = check_positive_int("beam_width", beam_width)
    device = input_ids.device
    trie = trie.to(device)
    U = input_ids.shape[0]
    theta = torch.full((U, trie.max_len + 1), float("-inf"), device=device)
    limit, budget = default_chain_limit(device), default_feed_budget(device)
    kv = ChainKVCache(model, input_ids, mask, trie, scoring, None, limit, budget)
    node = torch.zeros(U, 1, dtype=torch.int64, device=device)
    score = torch.zeros(U, 1, device=device)
    logits = kv.logits
    width = trie.depth_fanout_list[0]
    for t in range(trie.max_len + 1):
        step = expand_beams(
            trie, logits, node, score, width, B, scoring, t == 0, kv.forced(), kv.normalized
        )
        if step.top.shape[1] >= B:
            theta[:, t] = step.top[:, B - 1]
        node, score = step.node, step.score
        # one host synchronisation per step: NaN scores, the next width
        host = torch.cat([step.nan.long(), step_widths(trie, node)[1:]]).cpu()
        check_no_nan_scores(host[:-1].bool())
        width = int(host[-1])
        if width == 0 or t == trie.max_len:
            break
        logits = kv.step(step.src, step.token, node, t + 1)
    return theta


@register_decoder
@dataclass(frozen=True)
class BeamSearch(Decoder):
    """``beam_search`` as the evaluation's decoder ``beam`` (the default); its options
    ``kv_sharing`` ("tree" or "copy") and ``chain_limit`` (0: the device's default) are
    ``beam_search``'s."""

    name: ClassVar[str] = "beam"
    kv_sharing: str = "tree"
    chain_limit: int = 0

    def __post_init__(self):
        if self.kv_sharing not in KV_SHARING:
            raise ValueError(
                f"--decoder-option kv_sharing={self.kv_sharing}: expected one of {KV_SHARING}"
            )
        if self.chain_limit < 0:
            raise ValueError(
                f"--decoder-option chain_limit={self.chain_limit}: expected an integer >= 1, or 0 "
                "for the device's default"
            )

    def decode(
        self, model, input_ids, attention_mask, trie, width, scoring, length_penalty, prompt=None
    ):
        return beam_search(
            model,
            input_ids,
            attention_mask,
            trie,
            width,
            scoring=scoring,
            length_penalty=length_penalty,
            kv_sharing=self.kv_sharing,
            prompt=prompt,
            chain_limit=self.chain_limit or None,
        )

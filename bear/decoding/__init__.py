"""Trie-constrained decoding of item ids (SPEC §4): beam search, exact top-K, teacher forcing.

All functions take left-padded prompts (U, P), an `ItemTrie` and any Hugging Face causal LM, and
return item ids and scores, never strings.

Scoring modes, per step with logits z and allowed children A of the current trie node:

    before:  log p_j = z_j - logsumexp_{k in A} z_k              (softmax over the allowed children)
    after:   log p_j = z_j - logsumexp_{k in V} z_k,  j in A      (full softmax, then restricted)

An item's score is the sum of its per-step log-probabilities, EOS included, divided by
length ** length_penalty (length = generated tokens, EOS included), as in Hugging Face.

This package's modules:
    beam             beam_search and beam_thresholds on one shared expansion step; decoder "beam"
    diverse          diverse (group) beam search; decoder "diverse"
    sampling         constrained sampling over the trie; decoder "sample"
    pool             the finished pool and stopping test of a beam search (reusable by siblings)
    best_first       exact_topk (best-first search over the trie); decoder "exact"
    count_above      count_items_above: the exact rank of a known target, depth first
    prefix_search    what best_first and count_above share (prefix feeding, packing, budgets)
    teacher_forcing  score_items, item_logits
    blocked_head     target log p from last hidden states, the output layer a block at a time
    common           input checks, child log-probabilities, stable top-k, DecodeResult
    prompt_cache     one prefill of the prompts (PromptCache), read by every search
    beam_cache       the beams' KV caches (tree attention, or copied rows)
    chain_cache      beam search's tree cache, fed once per branching point (forced chains)
    grouped_attention  sdpa for grouped-query models under the tree caches' 4-D masks
    prefix_cache     the KV cache of prefixes extended in any order
    decoder          the Decoder seam evaluation calls; registry: the decoders by name

Names are imported from their modules on first use (PEP 562), so ``import bear.decoding`` and the
registry load no torch.
"""

from bear._lazy import lazy_exports

_EXPORTS = {
    "DecodeResult": "bear.decoding.common",
    "Decoder": "bear.decoding.decoder",
    "beam_search": "bear.decoding.beam",
    "beam_thresholds": "bear.decoding.beam",
    "constrained_sampling": "bear.decoding.sampling",
    "diverse_beam_search": "bear.decoding.diverse",
    "decoder_names": "bear.decoding.registry",
    "exact_topk": "bear.decoding.best_first",
    "get_decoder": "bear.decoding.registry",
    "register_decoder": "bear.decoding.registry",
    "score_items": "bear.decoding.teacher_forcing",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

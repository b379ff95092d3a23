"""Trie-constrained decoding of item ids (SPEC §4): beam search, exact top-K, teacher forcing.

All functions take left-padded prompts (U, P), an `ItemTrie` and any Hugging Face causal LM, and
return item ids and scores, never strings.

Scoring modes, per step with logits z and allowed children A of the current trie node:

    before:  log p_j = z_j - logsumexp_{k in A} z_k              (softmax over the allowed children)
    after:   log p_j = z_j - logsumexp_{k in V} z_k,  j in A      (full softmax, then restricted)

An item's score is the sum of its per-step log-probabilities, EOS included, divided by
length ** length_penalty (length = generated tokens, EOS included), as in Hugging Face.

This module is the public face; the work is done in
    bear.beam             beam_search and beam_thresholds on one shared expansion step
    bear.best_first       exact_topk (best-first search over the trie)
    bear.teacher_forcing  score_items
    bear.decode_common    input checks, child log-probabilities, stable top-k, DecodeResult
    bear.kv_cache         Hugging Face KV-cache plumbing (prefill, per-beam and tree caches)
"""

from __future__ import annotations

from bear.beam import beam_search, beam_thresholds
from bear.best_first import exact_topk
from bear.decode_common import DecodeResult
from bear.teacher_forcing import score_items

__all__ = ["DecodeResult", "beam_search", "beam_thresholds", "exact_topk", "score_items"]

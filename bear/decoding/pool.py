"""The finished pool of a beam search and its stopping test (Hugging Face's beam hypotheses).

A sibling of `bear.decoding.beam.beam_search` (a diverse or grouped search, say) keeps its finished
items and decides when a user is done through this class instead of repeating the rules.
"""

from __future__ import annotations

import torch

from bear.decoding.common import topk_stable

__all__ = ["FinishedPool", "length_penalty_factor"]


def length_penalty_factor(length: int, alpha: float) -> float:
    """length ** alpha: an item of ``length`` generated tokens (EOS included) scores s / this."""
    return float(length) ** alpha


class FinishedPool:
    """The best B finished items of each user, best first: ``leaf`` (U, B) trie leaves (-1 where
    empty) and ``score`` (U, B) their length-penalised scores (-inf where empty).

    Semantics of Hugging Face's `num_beams=B` search (SPEC §4): an EOS candidate enters only if
    it ranks within the top B candidates of its step; its score is s / (t + 1) ** alpha; the pool
    keeps the best B. A user is done when no beam is live, or when the pool is full and its best
    live beam's s / (t + 1) ** alpha does not beat the pool's worst (`early_stopping=False`;
    exact for alpha = 0, where scores only fall).
    """

    def __init__(self, users: int, width: int, alpha: float, device):
        self.alpha = alpha
        self.leaf = torch.full((users, width), -1, dtype=torch.int64, device=device)  # (U, B)
        self.score = torch.full((users, width), float("-inf"), device=device)  # (U, B)

    @property
    def worst(self) -> torch.Tensor:
        """(U,) the pool's worst score, -inf while it has room."""
        return self.score[:, -1]

    def add(self, top, child, is_eos, t: int) -> None:
        """Merge the EOS candidates of step ``t`` ranked within the top B.

        Args:
            top, child, is_eos: (U, k2) the step's best candidates, best first: their scores s
                (cumulative log-probabilities), trie nodes, and whether each is an EOS edge.
        """
        B = self.leaf.shape[1]
        rank = torch.arange(top.shape[1], device=top.device)
        fin = is_eos & (rank < B)
        fin_score = torch.where(fin, top / length_penalty_factor(t + 1, self.alpha), float("-inf"))
        merged_score = torch.cat([self.score, fin_score], dim=1)
        merged_leaf = torch.cat([self.leaf, torch.where(fin, child, -1)], dim=1)
        self.score, pick = topk_stable(merged_score, B)
        self.leaf = merged_leaf.gather(1, pick)

    def done(self, best_live: torch.Tensor, t: int) -> torch.Tensor:
        """(U,) bool: the users whose search is over after step ``t``, given ``best_live`` (U,)
        the score of each user's best live beam (-inf when none is live)."""
        live = torch.isfinite(best_live)
        best = best_live / length_penalty_factor(t + 1, self.alpha)
        full = torch.isfinite(self.worst)
        return ~live | (full & ~(best > self.worst))

    def select(self, rows: torch.Tensor) -> None:
        """Keep the users ``rows`` (the others are done)."""
        self.leaf, self.score = self.leaf[rows], self.score[rows]

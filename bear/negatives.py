"""Negative items for preference losses (S-DPO): sampled per example, seeded, never the positive
or an item of the user's history (the items its prompt shows)."""

from __future__ import annotations

import torch

from bear.config import NEGATIVE_SAMPLING
from bear.data import Example
from bear.trie import ItemTrie

__all__ = ["NegativeSampler"]

# NEGATIVE_SAMPLING: uniform, every catalogue item alike; popularity, in proportion to the item's
# occurrences in the training rows (as target or in a history): items never seen are never drawn
_MIX = (1_000_003, 998_244_353)  # odd multipliers mixing (seed, step, example) into one seed


class NegativeSampler:
    """M distinct negatives per training example, among the catalogue's distinct titles
    (canonical item ids: items with identical titles are one item, SPEC §3).

    ``sample(example, index, step)`` draws without replacement from the catalogue, the example's
    positive and history excluded, with a generator seeded by (seed, step, example index): the
    same negatives whatever the micro-batch split, the number of processes or a ``--resume``.
    Raises ValueError when an example has fewer than M items to draw from.
    """

    def __init__(self, trie: ItemTrie, train: list[Example], negatives: int, kind: str, seed: int):
        if kind not in NEGATIVE_SAMPLING:
            raise ValueError(
                f"--negative-sampling: got {kind!r}, expected one of {NEGATIVE_SAMPLING}"
            )
        self.trie, self.negatives, self.seed = trie.to("cpu"), negatives, seed
        leaf_items = self.trie.leaf_item
        self.items = leaf_items[leaf_items >= 0].unique().long()  # (C,) canonical ids, ascending
        self.weights = torch.ones(self.items.shape[0], dtype=torch.float64)  # (C,)
        if kind == "popularity":
            seen = [i for e in train for i in (e.target, *e.history)]
            counts = torch.bincount(self._positions(seen), minlength=self.items.shape[0])
            self.weights = counts.to(torch.float64)
        self._check(train, kind)

    def _positions(self, item_ids) -> torch.Tensor:
        """Positions in ``self.items`` of the canonical ids of ``item_ids``."""
        canon = self.trie.canonical(torch.as_tensor(list(item_ids), dtype=torch.int64))
        return torch.searchsorted(self.items, canon)

    def _excluded(self, example: Example) -> torch.Tensor:
        return self._positions((example.target, *example.history))

    def _check(self, train: list[Example], kind: str) -> None:
        drawable = self.weights > 0
        total = int(drawable.sum())
        for e in train:
            left = total - int(drawable[self._excluded(e).unique()].sum())
            if left < self.negatives:
                raise ValueError(
                    f"--negatives {self.negatives}: {e.source} leaves {left} item(s) to draw "
                    f"negatives from ({kind} sampling over {total} item(s), minus its positive and "
                    f"its {len(e.history)} history item(s)); lower --negatives"
                )

    def sample(self, example: Example, index: int, step: int) -> list[int]:
        """The M negatives (canonical item ids) of training example ``index`` at ``step``."""
        weights = self.weights.clone()
        weights[self._excluded(example)] = 0
        seed = ((self.seed * _MIX[0] + step) * _MIX[1] + index) % (2**63)
        g = torch.Generator().manual_seed(seed)
        picks = torch.multinomial(weights, self.negatives, replacement=False, generator=g)
        return self.items[picks].tolist()

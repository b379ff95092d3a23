"""bear: the recommender side of beam-search-aware training (SPEC §3-§7).

Modules: data and prompts (upstream format), items (in-context item tokens), synth (synthetic
datasets), tokenizer and model (tiny Llama or a local checkpoint with LoRA), trie (the item trie in
tensors), decoding (constrained beam search, exact top-K, item scores; its parts in beam,
best_first, teacher_forcing, decode_common and kv_cache), metrics, losses (every loss
on bear_kernels.ce_margin), config (TrainConfig, the source of the train flags), run (a run's setup,
folder and checkpoint files), train, evaluate, demo, plots, cli (``python -m bear``).

The public API is importable from ``bear`` and from each name's module; training runs through
``bear.train.train`` (the submodule is not shadowed by a function of the same name).
"""

from bear.config import TrainConfig
from bear.data import DataError, Dataset, Example, load_dataset
from bear.decoding import DecodeResult, beam_search, exact_topk, score_items
from bear.items import item_sequences, left_pad
from bear.metrics import (
    hit_rate,
    ndcg,
    pruning_rate,
    ranking_metrics,
    target_ranks,
    violation_share,
)
from bear.prompts import domain_from_folder, format_prompt, format_response
from bear.trie import ItemTrie

__all__ = [
    # trie and decoding
    "ItemTrie",
    "DecodeResult",
    "beam_search",
    "exact_topk",
    "score_items",
    # metrics
    "target_ranks",
    "hit_rate",
    "ndcg",
    "pruning_rate",
    "violation_share",
    "ranking_metrics",
    # data, prompts and item tokens
    "Dataset",
    "DataError",
    "Example",
    "load_dataset",
    "domain_from_folder",
    "format_prompt",
    "format_response",
    "item_sequences",
    "left_pad",
    # training
    "TrainConfig",
]

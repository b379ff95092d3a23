"""bear: the recommender side of beam-search-aware training (SPEC §3-§7, §11).

Where things are:
    data, prompts, items, synth, tokenizer   the upstream data format, the paper's prompts, item
                                             tokens in context, synthetic datasets, a BPE
    trie                                     the item trie in tensors
    decoding/                                beam search, exact top-K, teacher forcing, their KV
                                             caches, and the Decoder seam with its registry
    losses/                                  one module per training loss on the Loss seam
    metrics                                  NDCG, HR, PR@K, violation share; the metric names
    config, protocol                         TrainConfig (the train flags), the two protocols
    model, checkpoints                       tiny Llama or a local checkpoint with LoRA
    run, run_folder, distributed             a run's setup and folder, several processes
    train_step, train                        one optimiser step (micro-batches, accumulation),
                                             the training loop
    evaluate, report                         EvalSettings and a split's metrics; metrics.json
    run_log, plots, demo, cli                the run's log, figures, the demo, ``python -m bear``

The public API is importable from ``bear`` and from each name's module. Names are imported from
their modules on first use (PEP 562): ``import bear`` loads neither torch nor transformers.
Training runs through ``bear.train.train`` (the submodule is not shadowed by a function).
"""

from bear._lazy import lazy_exports
from bear._version import __version__ as __version__

_EXPORTS = {
    # trie and decoding
    "ItemTrie": "bear.trie",
    "DecodeResult": "bear.decoding.common",
    "beam_search": "bear.decoding.beam",
    "exact_topk": "bear.decoding.best_first",
    "score_items": "bear.decoding.teacher_forcing",
    # metrics
    "target_ranks": "bear.metrics",
    "hit_rate": "bear.metrics",
    "ndcg": "bear.metrics",
    "pruning_rate": "bear.metrics",
    "violation_share": "bear.metrics",
    "ranking_metrics": "bear.metrics",
    # data, prompts and item tokens
    "Dataset": "bear.data",
    "DataError": "bear.data",
    "Example": "bear.data",
    "load_dataset": "bear.data",
    "domain_from_folder": "bear.prompts",
    "format_prompt": "bear.prompts",
    "format_response": "bear.prompts",
    "item_sequences": "bear.items",
    "left_pad": "bear.items",
    # training and evaluation
    "TrainConfig": "bear.config",
    "EvalSettings": "bear.evaluate",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

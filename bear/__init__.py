"""bear: the recommender side of beam-search-aware training (SPEC §3-§7).

Modules: data and prompts (upstream format), items (in-context item tokens), synth (synthetic
datasets), tokenizer and model (tiny Llama or a local checkpoint with LoRA), trie (the item trie in
tensors), decoding (constrained beam search, exact top-K, item scores), metrics, losses (every loss
on bear_kernels.ce_margin), config (TrainConfig, the source of the train flags), run (a run's setup,
folder and checkpoint files), train, evaluate, demo, plots, cli (``python -m bear``).
"""

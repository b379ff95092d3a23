"""`import bear` exports the recommender's public API, each name the object of its module."""

import importlib

import bear

REQUIRED = {
    "bear.trie": ["ItemTrie"],
    "bear.decoding": ["DecodeResult", "beam_search", "exact_topk", "score_items"],
    "bear.metrics": ["target_ranks", "hit_rate", "ndcg", "pruning_rate", "violation_share",
                     "ranking_metrics"],
    "bear.prompts": ["format_prompt", "domain_from_folder"],
    "bear.data": ["load_dataset"],
    "bear.items": ["item_sequences", "left_pad"],
}  # fmt: skip


def test_required_names_are_exported_from_their_modules():
    for module_name, names in REQUIRED.items():
        module = importlib.import_module(module_name)
        for name in names:
            assert name in bear.__all__, name
            assert getattr(bear, name) is getattr(module, name), name


def test_training_config_is_exported_and_the_train_submodule_is_not_shadowed():
    train_module = importlib.import_module("bear.train")
    assert "TrainConfig" in bear.__all__
    assert bear.TrainConfig is importlib.import_module("bear.config").TrainConfig
    assert bear.train is train_module  # `import bear.train as m` gives the module, not a function


def test_all_resolves_and_star_import_gives_exactly_all():
    assert len(set(bear.__all__)) == len(bear.__all__)
    namespace: dict = {}
    exec("from bear import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(bear.__all__)

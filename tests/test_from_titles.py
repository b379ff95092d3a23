"""A trie from any titles and any tokenizer (``ItemTrie.from_titles``), a chat-template prompt,
and labels that leave the trie or end without EOS refused with the row named."""

from __future__ import annotations

import json

import pytest
import torch

from bear.cli import main
from bear.items import ContextError, item_sequences
from bear.prompts import GENERIC_DOMAIN, PromptText, chat_wrap, format_prompt, format_response
from bear.tokenizer import train_tokenizer
from bear.trie import ItemTrie
from tests._helpers_train import tiny_checkpoint, tiny_synth

TITLES = {4: "Red Pen", 9: "Red Pencil Case", 11: "Blue Stapler", 12: "Blue Staples"}
CHAT = (
    "{% for m in messages %}<|user|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    texts = [format_prompt(list(TITLES.values()), GENERIC_DOMAIN)] * 3
    return train_tokenizer(texts + [format_response(t) for t in TITLES.values()], 320)


def _labels(tokenizer, prompt: str, titles: list[str]) -> torch.Tensor:
    """Rows of ``prompt + response`` tokens with the prompt ignored (-100), EOS appended."""
    rows = []
    (prompt_ids,) = tokenizer([prompt])["input_ids"]
    for title in titles:
        (ids,) = tokenizer([prompt + format_response(title)])["input_ids"]
        ids = ids + [tokenizer.eos_token_id]
        rows.append([-100] * len(prompt_ids) + ids[len(prompt_ids) :])
    width = max(len(r) for r in rows)
    return torch.tensor([r + [-100] * (width - len(r)) for r in rows])


def test_from_titles_matches_the_training_tokens_and_the_labels(tokenizer):
    trie = ItemTrie.from_titles(tokenizer, TITLES)
    assert trie.num_items == 4 and trie.vocab_size == len(tokenizer)
    expected = item_sequences(tokenizer, TITLES, GENERIC_DOMAIN)
    for item, tokens in expected.items():
        assert trie.item_tokens(torch.tensor([item]))[0, : len(tokens)].tolist() == tokens
    prompt = format_prompt(["Blue Stapler"], GENERIC_DOMAIN)
    mask = trie.labels_allowed_mask(_labels(tokenizer, prompt, list(TITLES.values())))
    assert mask.any()
    listed = ItemTrie.from_titles(tokenizer, list(TITLES.values()))
    assert sorted(listed.leaf_item[listed.leaf_item >= 0].tolist()) == [0, 1, 2, 3]


def test_a_trie_of_titles_tokenised_alone_is_caught_at_the_first_row(tokenizer):
    """The trap: tokenising the bare title, not the response as it follows the prompt."""
    bare = {k: tokenizer([t])["input_ids"][0] for k, t in TITLES.items()}
    trie = ItemTrie(list(bare.values()), list(bare), tokenizer.eos_token_id, len(tokenizer))
    labels = _labels(tokenizer, format_prompt(["Red Pen"], GENERIC_DOMAIN), ["Blue Staples"])
    with pytest.raises(ValueError, match=r"row 0, position \d+ .*ItemTrie.from_titles"):
        trie.labels_allowed_mask(labels)


def test_labels_without_eos_are_refused_naming_the_row(tokenizer):
    trie = ItemTrie.from_titles(tokenizer, TITLES)
    prompt = format_prompt(["Red Pen"], GENERIC_DOMAIN)
    good = _labels(tokenizer, prompt, ["Blue Stapler", "Red Pen"])
    trie.labels_allowed_mask(good)
    short = good.clone()
    last = int((good[1] != -100).nonzero()[-1])
    assert short[1, last] == tokenizer.eos_token_id
    short[1, last] = -100  # row 1 loses its EOS, row 0 keeps it
    with pytest.raises(ValueError, match=r"row 1 ends at position \d+ .* without EOS"):
        trie.labels_allowed_mask(short)


def test_from_titles_refuses_bad_input(tokenizer):
    with pytest.raises(ValueError, match="empty"):
        ItemTrie.from_titles(tokenizer, {})
    with pytest.raises(ValueError, match="item 3: got 5, not a title"):
        ItemTrie.from_titles(tokenizer, {3: 5})
    with pytest.raises(ContextError, match="merge with the end of the prompt"):
        ItemTrie.from_titles(tokenizer, TITLES, context="Answer: ")  # the space joins the title


def test_a_chat_prompt_wraps_the_papers_instruction_and_history(tokenizer):
    tokenizer.chat_template = CHAT
    try:
        before, after = chat_wrap(tokenizer)
        assert (before, after) == ("<|user|>\n", "<|end|>\n<|assistant|>\n")
        text = PromptText("Recommend one.", "Seen: ", chat=(before, after))
        prompt = format_prompt(["Red Pen", "Blue Stapler"], text)
        expected = '<|user|>\nRecommend one.\n\nSeen: "Red Pen", "Blue Stapler"<|end|>\n'
        assert prompt == expected + "<|assistant|>\n"
    finally:
        tokenizer.chat_template = None


def test_the_chat_prompt_ends_at_the_assistants_turn_and_labels_agree(tokenizer):
    tokenizer.chat_template = CHAT
    try:
        text = PromptText("Recommend one.", "Seen: ", chat=chat_wrap(tokenizer))
        prompt = format_prompt(["Red Pen"], text)
        assert prompt.endswith("<|end|>\n<|assistant|>\n")
        trie = ItemTrie.from_titles(tokenizer, TITLES, context=format_prompt(["..."], text))
        trie.labels_allowed_mask(_labels(tokenizer, prompt, ["Red Pencil Case"]))
    finally:
        tokenizer.chat_template = None


def test_chat_wrap_refuses_a_tokenizer_without_a_usable_template(tokenizer):
    with pytest.raises(ValueError, match="no chat template"):
        chat_wrap(tokenizer)
    tokenizer.chat_template = "{{ messages[0]['content'] }}{{ messages[0]['content'] }}"
    try:
        with pytest.raises(ValueError, match="changes or repeats the user message"):
            chat_wrap(tokenizer)
    finally:
        tokenizer.chat_template = None


def test_train_with_a_chat_prompt_on_a_checkpoint(tmp_path, capsys):
    data = tiny_synth(tmp_path / "data")
    base = tiny_checkpoint(data, tmp_path / "base")
    (base / "chat_template.jinja").write_text(CHAT)
    run = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(run), "--model", str(base), "--loss",
            "bear", "--beam-width", "3", "--prompt", "chat", "--epochs", "1", "--limit-train",
            "8", "--batch-size", "4", "--limit-eval", "2", "--max-history", "3", "--no-progress",
            "--device", "cpu"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    assert json.loads((run / "config.json").read_text())["prompt"] == "chat"
    assert (run / "metrics.json").is_file()
    # the paper's protocol keeps the paper's prompt; a tokenizer without a template is named
    assert main([*args[:4], str(tmp_path / "r2"), *args[5:], "--protocol", "upstream"]) == 2
    assert "--prompt chat: the upstream protocol" in capsys.readouterr().err
    tiny = ["train", "--data", str(data), "--out", str(tmp_path / "r3"), "--prompt", "chat",
            "--no-progress", "--device", "cpu", "--vocab-size", "320"]  # fmt: skip
    assert main(tiny) == 2
    assert "has no chat template" in capsys.readouterr().err


def test_from_titles_refuses_a_string_and_ids_that_are_not_integers(tokenizer):
    with pytest.raises(ValueError, match="titles is one string"):
        ItemTrie.from_titles(tokenizer, "Red Pen")
    with pytest.raises(ValueError, match="item id 'a' is not an integer"):
        ItemTrie.from_titles(tokenizer, {"a": "Red Pen"})

"""Data loading, validation split, prompts, in-context item tokens, errors naming file and row."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _helpers_train import SHARED_DATA, tiny_synth

from bear.data import DataError, load_dataset, split_valid
from bear.items import ContextError, check_in_context, collate, encode_prompts, item_sequences
from bear.prompts import format_prompt, format_response
from bear.tokenizer import train_tokenizer
from bear.trie import ItemTrie


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return tiny_synth(tmp_path_factory.mktemp("data") / "synth")


def test_prompt_is_upstreams_template():
    prompt = format_prompt(["A b", 'C "d"'], "office")
    assert prompt == (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nGiven a list of office products the user has bought before, please "
        "recommend a new office product that the user likes to the user.\n\n"
        '### Input:\nThe user has bought: "A b", "C "d""\n\n### Response:\n'
    )
    assert "clothing products" in format_prompt(["x"], "clothing")
    assert format_response("T") == '"T"'


@pytest.mark.parametrize("name", ["Office", "Clothing"])
def test_upstream_folders_load(name):
    folder = SHARED_DATA / name
    if not folder.is_dir():
        pytest.skip(f"{folder} not present")
    data = load_dataset(folder)
    assert data.domain == name.lower()
    n = len(data.train) + len(data.valid)
    assert len(data.valid) == pytest.approx(0.1 * n, abs=1)
    # validation is the latest 10% by timestamp
    assert max(e.timestamp for e in data.train) <= min(e.timestamp for e in data.valid)
    assert all(1 <= len(e.history) <= 10 for e in data.test)


def test_split_valid_by_timestamp(synth):
    data = load_dataset(synth)
    train, valid = split_valid(data.train + data.valid)
    assert [e.source for e in valid] == [e.source for e in data.valid]
    assert data.domain == "generic"


def test_valid_csv_is_used_when_present(synth, tmp_path):
    folder = tmp_path / "d"
    shutil.copytree(synth, folder)
    lines = (folder / "test.csv").read_text().splitlines()
    (folder / "valid.csv").write_text("\n".join(lines[:3]) + "\n")
    data = load_dataset(folder)
    assert len(data.valid) == 2
    assert len(data.train) == len((folder / "train.csv").read_text().splitlines()) - 1


def _broken(synth, tmp_path, edit):
    folder = tmp_path / "broken"
    shutil.copytree(synth, folder)
    edit(folder)
    return folder


def test_missing_folder_and_files(synth, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    for name in ("id2name4Rec.json", "train.csv", "test.csv"):
        folder = _broken(synth, tmp_path / name, lambda f, n=name: (f / n).unlink())
        with pytest.raises(DataError, match=rf"{name}: missing file"):
            load_dataset(folder)


def test_malformed_row_names_file_and_line(synth, tmp_path):
    def edit(folder):
        lines = (folder / "train.csv").read_text().splitlines()
        lines[3] = "7,[1 2],123"  # line 4 of the file
        (folder / "train.csv").write_text("\n".join(lines) + "\n")

    with pytest.raises(DataError, match=r"train\.csv:4: item_ids '\[1 2\]'"):
        load_dataset(_broken(synth, tmp_path, edit))


def test_wrong_field_count_names_line(synth, tmp_path):
    def edit(folder):
        with (folder / "test.csv").open("a") as fh:
            fh.write('9,"[1, 2]"\n')

    n = len((synth / "test.csv").read_text().splitlines()) + 1
    with pytest.raises(DataError, match=rf"test\.csv:{n}: 2 fields"):
        load_dataset(_broken(synth, tmp_path, edit))


def test_unknown_history_id_names_line(synth, tmp_path):
    def edit(folder):
        lines = (folder / "train.csv").read_text().splitlines()
        lines[1] = '0,"[99999, 1]",5'
        (folder / "train.csv").write_text("\n".join(lines) + "\n")

    with pytest.raises(DataError, match=r"train\.csv:2: item id 99999 has no title"):
        load_dataset(_broken(synth, tmp_path, edit))


def test_empty_title_names_item(synth, tmp_path):
    def edit(folder):
        titles = json.loads((folder / "id2name4Rec.json").read_text())
        titles["5"] = "  "
        (folder / "id2name4Rec.json").write_text(json.dumps(titles))

    with pytest.raises(DataError, match=r"id2name4Rec\.json: item 5: empty"):
        load_dataset(_broken(synth, tmp_path, edit))


def test_training_targets_equal_trie_paths(synth):
    """Prompt + response tokenises to prompt tokens + item tokens, and the batch's targets and
    allowed sets follow the trie token for token."""
    data = load_dataset(synth)
    texts = [format_response(t) for t in data.titles.values()]
    tok = train_tokenizer(texts + [format_prompt(["a"], data.domain)], 400)
    items = item_sequences(tok, data.titles, data.domain)
    check_in_context(tok, data, data.train + data.valid + data.test, items)  # every row
    ids = data.item_ids
    trie = ItemTrie([items[i] for i in ids], ids, tok.eos_token_id, vocab_size=len(tok))
    rows = data.train[:5]
    batch = collate(encode_prompts(tok, data, rows), [e.target for e in rows], items, trie, 0)
    for u, e in enumerate(rows):
        n = len(items[e.target]) + 1
        assert batch.target[u, -n:].tolist() == items[e.target] + [tok.eos_token_id]
        assert (batch.target[u, :-n] == -100).all()
        seq = trie.item_tokens(torch.tensor([e.target]))[0]
        assert seq[seq != -100].tolist() == items[e.target] + [tok.eos_token_id]
        # the full input is the prompt followed by the response without EOS
        full = tok(format_prompt([data.titles[i] for i in e.history], data.domain)
                   + format_response(data.titles[e.target]))["input_ids"]  # fmt: skip
        assert batch.input_ids[u, batch.attention_mask[u].bool()].tolist() == full
        # each target token is allowed by its node, and nothing is allowed past the end
        mask = trie.allowed_mask(batch.node_ids[u])
        for j, y in enumerate(batch.target[u].tolist()):
            bit = (mask[j, max(y, 0) // 32] >> (max(y, 0) % 32)) & 1
            assert bool(bit) == (y != -100)


class _MergingTokenizer:
    """Character-level ids, but '\\n"' becomes one token after a prompt that mentions MERGE."""

    def __call__(self, texts, add_special_tokens=True):
        out = []
        for t in texts:
            ids, i = [], 0
            while i < len(t):
                if "MERGE" in t and t[i : i + 2] == '\n"':
                    ids.append(5000)
                    i += 2
                else:
                    ids.append(ord(t[i]))
                    i += 1
            out.append(ids)
        return {"input_ids": out}


def test_context_dependent_tokenisation_is_detected(synth, tmp_path):
    data = load_dataset(synth)
    tok = _MergingTokenizer()
    items = item_sequences(tok, data.titles, data.domain)  # the reference context is fine
    check_in_context(tok, data, data.train[:5], items)
    first = data.train[0]
    data.titles[first.history[0]] = "MERGE me"
    with pytest.raises(ContextError, match=rf"{first.source}: item {first.target}"):
        check_in_context(tok, data, data.train[:5], items)
    data.titles = {k: "MERGE" for k in data.titles}
    with pytest.raises(ContextError, match="merge with the response header"):
        item_sequences(tok, data.titles, data.domain)

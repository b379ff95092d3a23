"""Data loading, validation split, prompts, in-context item tokens, errors naming file and row."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _helpers_train import SHARED_DATA, tiny_synth, write_six_columns

from bear.data import DataError, load_dataset, split_valid
from bear.items import ContextError, check_in_context, collate, encode_prompts, item_sequences
from bear.prompts import format_prompt, format_response
from bear.tokenizer import train_tokenizer
from bear.trie import ItemTrie


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return tiny_synth(tmp_path_factory.mktemp("data") / "synth")


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


def _edit_titles(change):
    def edit(folder):
        titles = json.loads((folder / "id2name4Rec.json").read_text())
        change(titles)
        (folder / "id2name4Rec.json").write_text(json.dumps(titles))

    return edit


def _edit_line(name: str, index: int, text: str):
    def edit(folder):
        lines = (folder / name).read_text().splitlines()
        lines[index] = text
        (folder / name).write_text("\n".join(lines) + "\n")

    return edit


def test_empty_and_long_titles_are_items_like_any_other(synth, tmp_path):
    """UPSTREAM.md §2: an empty title (used as a training target) and titles of several hundred
    characters load verbatim; the empty one's response is '""' + EOS, a trie leaf of its own."""
    data = load_dataset(synth)
    target = data.train[0].target
    long_item = data.train[1].target
    long_title = "Long " + "x" * 600

    def change(titles):
        titles[str(target)] = ""
        titles[str(long_item)] = long_title

    data = load_dataset(_broken(synth, tmp_path, _edit_titles(change)))
    assert data.titles[target] == "" and data.titles[long_item] == long_title
    texts = [format_response(t) for t in data.titles.values()]
    tok = train_tokenizer(texts + [format_prompt(["a"], data.prompt)], 400)
    items = item_sequences(tok, data.titles, data.prompt)
    assert tok.decode(items[target]) == '""'
    check_in_context(tok, data, data.train[:5], items)
    ids = data.item_ids
    trie = ItemTrie([items[i] for i in ids], ids, tok.eos_token_id, vocab_size=len(tok))
    tokens = trie.item_tokens(torch.tensor([target]))[0]
    assert tokens[tokens != -100].tolist() == items[target] + [tok.eos_token_id]
    assert int(trie.canonical(torch.tensor([target]))) == target


def test_extra_csv_columns_are_ignored(synth, tmp_path):
    """Some published test files have six columns (UPSTREAM.md §2)."""

    def edit(folder):
        write_six_columns(folder / "test.csv", folder / "test.csv")

    plain = load_dataset(synth)
    wide = load_dataset(_broken(synth, tmp_path, edit))
    assert [(e.history, e.target, e.timestamp) for e in wide.test] == [
        (e.history, e.target, e.timestamp) for e in plain.test
    ]


def test_header_without_a_needed_column_names_line_1(synth, tmp_path):
    edit = _edit_line("train.csv", 0, "user_id,items,timestamp")
    with pytest.raises(DataError, match=r"train\.csv:1: header .* user_id,item_ids,timestamp"):
        load_dataset(_broken(synth, tmp_path, edit))


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ('7,"[1,,2]",5', "has an empty entry"),  # was read as [1, 2]
        ('7,"[-1, 2]",5', r"'-1' is outside \[0, 2\^63 - 1\]"),
        (f'7,"[{2**63}, 2]",5', "is outside"),  # was an OverflowError in torch
        ('7,"[1, 2]",inf', "timestamp 'inf' is not finite"),  # was an OverflowError
        ('7,"[1, 2]",nan', "timestamp 'nan' is not finite"),
        ('7,"[1_0, 2]",5', "is not an integer item id"),
    ],
)
def test_malformed_ids_and_timestamps_name_file_and_line(synth, tmp_path, row, message):
    edit = _edit_line("train.csv", 2, row)  # line 3 of the file
    with pytest.raises(DataError, match=rf"train\.csv:3: .*{message}"):
        load_dataset(_broken(synth, tmp_path, edit))


def test_non_utf8_bytes_name_file_and_line(synth, tmp_path):
    def edit(folder):
        lines = (folder / "test.csv").read_bytes().split(b"\n")
        lines[4] = b'7,"[1, 2]",5\xff'
        (folder / "test.csv").write_bytes(b"\n".join(lines))

    with pytest.raises(DataError, match=r"test\.csv:5: not UTF-8"):
        load_dataset(_broken(synth, tmp_path, edit))

    def edit_json(folder):
        path = folder / "id2name4Rec.json"
        path.write_bytes(b'{"1": "a",\n "2": "\xfe"}')

    with pytest.raises(DataError, match=r"id2name4Rec\.json:2: not UTF-8"):
        load_dataset(_broken(synth, tmp_path / "json", edit_json))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"1": "a", "01": "b"}', "item ids '1' and '01' are the same id 1"),  # was silently merged
        ('{"1": "a", "1": "b"}', "item ids '1' and '1' are the same id 1"),
        ('{"-3": "a"}', r"item id '-3' is outside"),
        ('{"x": "a"}', "item id 'x' is not an integer"),
        ('{"1": 5}', "item 1: title 5 is not a string"),
        ('{"1": "a",\n', r":2: not valid JSON"),
        ('[["1", "a"]]', "expected a non-empty JSON object"),
    ],
)
def test_bad_catalogue_names_the_problem(synth, tmp_path, text, message):
    def edit(folder):
        (folder / "id2name4Rec.json").write_text(text)

    with pytest.raises(DataError, match=rf"id2name4Rec\.json.*{message}"):
        load_dataset(_broken(synth, tmp_path, edit))


def test_users_own_prompt_strings(synth):
    data = load_dataset(synth, instruction="Pick.", history_prefix="Had: ")
    prompt = format_prompt(["a"], data.prompt)
    assert '### Instruction:\nPick.\n\n### Input:\nHad: "a"\n \n' in prompt
    assert load_dataset(synth, validation=False).valid == []


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
    with pytest.raises(ContextError, match="merge with the end of the prompt"):
        item_sequences(tok, data.titles, data.domain)

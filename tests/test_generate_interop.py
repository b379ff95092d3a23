"""Decoding that speaks generate (issue: meet users where they are): the trie as a
prefix_allowed_tokens_fn, num_beams, and the items' token sequences and texts."""

from __future__ import annotations

import pytest
import torch
from _helpers_decoding import EOS, PAD, VOCAB, prompts, random_catalogue, tiny_model

from bear.decoding import beam_search
from bear.trie import ItemTrie


@pytest.fixture(scope="module")
def case():
    model = tiny_model()
    seqs, ids = random_catalogue(40)
    trie = ItemTrie(seqs, ids, EOS, vocab_size=VOCAB)
    input_ids, mask = prompts((5, 3, 7))
    return model, seqs, ids, trie, input_ids, mask


def _generate(model, input_ids, mask, fn, beams, trie):
    out = model.generate(input_ids=input_ids, attention_mask=mask, num_beams=beams,
                         num_return_sequences=beams, prefix_allowed_tokens_fn=fn,
                         do_sample=False, max_new_tokens=trie.max_len + 1, early_stopping=False,
                         pad_token_id=PAD, eos_token_id=EOS)  # fmt: skip
    return out


def test_the_tries_prefix_function_constrains_generate_as_a_hand_written_one(case):
    """generate with trie.prefix_allowed_tokens_fn returns what it returns with the dictionary
    of prefixes a user writes by hand (the 8 lines this replaces)."""
    model, seqs, _, trie, input_ids, mask = case
    allowed = {}
    for s in seqs:
        for t in range(len(s) + 1):
            allowed.setdefault(tuple(s[:t]), set()).add(s[t] if t < len(s) else EOS)
    P = input_ids.shape[1]

    def by_hand(batch_id, sent):
        return sorted(allowed.get(tuple(sent[P:].tolist()), {EOS}))

    ours = _generate(model, input_ids, mask, trie.prefix_allowed_tokens_fn(P), 4, trie)
    theirs = _generate(model, input_ids, mask, by_hand, 4, trie)
    assert torch.equal(ours, theirs)
    fn = trie.prefix_allowed_tokens_fn(P)
    first = sorted({s[0] for s in seqs})
    assert sorted(fn(0, input_ids[0])) == first
    assert fn(0, torch.cat([input_ids[0], torch.tensor([seqs[0][0], 1])])) == [EOS]  # off trie


def test_num_beams_is_beam_widths_other_name(case):
    model, _, _, trie, input_ids, mask = case
    want = beam_search(model, input_ids, mask, trie, beam_width=4)
    got = beam_search(model, input_ids, mask, trie, num_beams=4)
    assert torch.equal(got.item_ids, want.item_ids)
    with pytest.raises(ValueError, match="num_beams=4 and beam_width=3"):
        beam_search(model, input_ids, mask, trie, beam_width=3, num_beams=4)


def test_a_result_gives_its_items_token_sequences_and_texts(case):
    model, seqs, ids, trie, input_ids, mask = case
    found = beam_search(model, input_ids, mask, trie, beam_width=50)  # more than there are
    tokens = found.sequences(trie)
    canon = trie.canonical(torch.tensor(ids)).tolist()
    by_item = {c: s for c, s in zip(canon, seqs, strict=True)}
    for u in range(found.item_ids.shape[0]):
        for k, item in enumerate(found.item_ids[u].tolist()):
            row = [t for t in tokens[u, k].tolist() if t != -100]
            assert row == ([] if item < 0 else by_item[item] + [EOS])

    class Words:  # a stand-in tokenizer: token t is the word "w<t>"
        def decode(self, tokens):
            return " ".join(f"w{t}" for t in tokens)

    texts = found.texts(trie, Words())
    assert len(texts[0]) == int((found.item_ids[0] >= 0).sum())
    assert texts[0][0] == " ".join(f"w{t}" for t in by_item[found.item_ids[0, 0].item()])

"""The decoder seam (SPEC §11): evaluation calls a registered decoder; a new one plugs in by
registration alone; the beam pool is a piece a sibling search can reuse."""

from __future__ import annotations

import dataclasses
import json
from typing import ClassVar

import pytest
import torch
from _helpers_decoding import EOS, VOCAB, prompts, random_catalogue, tiny_model
from _helpers_train import tiny_config, tiny_synth

import bear.decoding.registry as registry
from bear.cli import main
from bear.decoding import Decoder, beam_search, decoder_names, exact_topk, get_decoder
from bear.decoding.pool import FinishedPool
from bear.evaluate import EvalSettings, evaluate_split
from bear.run import build_setup
from bear.train import train
from bear.trie import ItemTrie


@pytest.fixture
def registered(monkeypatch):
    """The registry as it is; whatever a test registers is gone after it."""
    monkeypatch.setattr(registry, "_REGISTERED", dict(registry._REGISTERED))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return tiny_synth(tmp_path_factory.mktemp("decoders") / "synth")


def test_the_builtin_decoders_are_beam_search_and_the_exact_top_k():
    model = tiny_model()
    seqs, ids = random_catalogue(40)
    trie = ItemTrie(seqs, ids, EOS, vocab_size=VOCAB)
    input_ids, mask = prompts((5, 3, 7))
    args = (model, input_ids, mask, trie, 4, "after", 0.0)
    assert decoder_names()[:2] == ("beam", "exact")
    beam = get_decoder("beam").from_options(["kv_sharing=copy"]).decode(*args)
    want = beam_search(model, input_ids, mask, trie, 4, "after", kv_sharing="copy")
    assert torch.equal(beam.item_ids, want.item_ids)
    chains = get_decoder("beam").from_options(["chain_limit=3"]).decode(*args)
    assert torch.equal(chains.item_ids, want.item_ids)
    exact = get_decoder("exact")().decode(*args)
    assert torch.equal(
        exact.item_ids, exact_topk(model, input_ids, mask, trie, 4, "after").item_ids
    )


def test_decoder_options_are_parsed_by_type_and_bad_ones_named():
    beam = get_decoder("beam")
    assert beam.from_options([]).kv_sharing == "tree"
    assert beam.from_options(["chain_limit=4"]).chain_limit == 4
    with pytest.raises(ValueError, match=r"KEY one of \('kv_sharing', 'chain_limit'\)"):
        beam.from_options(["width=3"])
    with pytest.raises(ValueError, match=r"chain_limit=-1: expected an integer >= 1, or 0"):
        beam.from_options(["chain_limit=-1"])
    with pytest.raises(ValueError, match=r"chain_limit=two: decoder 'beam' expects int"):
        beam.from_options(["chain_limit=two"])
    with pytest.raises(
        ValueError, match=r"kv_sharing=sideways: expected one of \('tree', 'copy'\)"
    ):
        beam.from_options(["kv_sharing=sideways"])
    with pytest.raises(ValueError, match=r"'exact' takes KEY=VALUE with KEY one of \(none"):
        get_decoder("exact").from_options(["k=3"])
    with pytest.raises(ValueError, match="decoder: got 'greedy', expected one of"):
        get_decoder("greedy")


def test_the_exact_decoder_refuses_a_length_penalty_before_training(synth, tmp_path):
    with pytest.raises(ValueError, match="--length-penalty: got 1.0 with --decoder exact"):
        tiny_config(synth, tmp_path / "r", decoder="exact", length_penalty=1.0)
    with pytest.raises(ValueError, match="--decoder-option: got 'width=3'"):
        tiny_config(synth, tmp_path / "r", decoder_options=("width=3",))


@dataclasses.dataclass(frozen=True)
class ReversedBeam(Decoder):
    """A test double: beam search's list, worst first (same items, other ranks)."""

    name: ClassVar[str] = "reversed-beam"
    prompt_given: ClassVar[list[bool]] = []  # per call: whether a prompt cache came with it

    def decode(self, model, input_ids, attention_mask, trie, width, scoring, alpha, prompt=None):
        self.prompt_given.append(prompt is not None)
        found = beam_search(model, input_ids, attention_mask, trie, width, scoring, alpha)
        found.item_ids, found.scores = found.item_ids.flip(1), found.scores.flip(1)
        return found


def test_a_registered_decoder_evaluates_and_trains_without_other_edits(registered, synth, tmp_path):
    """Registering is all it takes: evaluate_split calls it (with the full test's prompt cache),
    its ranks give the metrics (the beam's items: HR@B equal, NDCG not), and a training
    run selects and tests with it."""
    registry.register_decoder(ReversedBeam)
    cfg = tiny_config(synth, tmp_path / "r", loss="sft", limit_eval=8)
    setup = build_setup(cfg, tmp_path / "r", fresh=True)
    beam = EvalSettings.from_config(cfg)
    flipped = dataclasses.replace(beam, decoder="reversed-beam")
    want = evaluate_split(setup.model, setup, "test", beam)
    got = evaluate_split(setup.model, setup, "test", flipped)
    assert ReversedBeam.prompt_given and all(ReversedBeam.prompt_given)  # a full test's cache
    assert got["hr@10"] == want["hr@10"] and got["users"] == want["users"]
    assert want["hr@10"] > 0 and got["ndcg@10"] != want["ndcg@10"]  # hits at other ranks
    assert got["pr@10"] == want["pr@10"]  # the same items are returned
    metrics = train(dataclasses.replace(cfg, out=str(tmp_path / "run"), decoder="reversed-beam"))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["decoder"] == "reversed-beam" and metrics["test"]["users"] == 8


def test_evaluate_command_takes_a_decoder_and_the_exact_one_prunes_nothing(synth, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(synth, run, loss="msl"))
    before = json.loads((run / "metrics.json").read_text())
    assert main(["evaluate", "--run", str(run), "--decoder", "exact", "--device", "cpu"]) == 0
    after = json.loads((run / "metrics.json").read_text())
    assert after["test"]["pr@10"] in (0.0, None) and after["test"]["users"] == 3
    assert before["test"]["users"] == 3
    bad = ["evaluate", "--run", str(run), "--decoder-option", "nope=1", "--device", "cpu"]
    assert main(bad) == 2


def test_the_finished_pool_keeps_the_best_eos_candidates_within_the_top_b():
    """B = 2, α = 0, one user: an EOS candidate enters only if ranked within the top B of its
    step; the pool keeps the best B; the user is done once the pool is full and no live beam
    beats its worst."""
    pool = FinishedPool(1, 2, 0.0, "cpu")
    top = torch.tensor([[-0.1, -0.5, -0.7, -0.9]])  # the step's candidates, best first
    child = torch.tensor([[10, 11, 12, 13]])
    is_eos = torch.tensor([[False, True, True, False]])  # -0.7 is EOS but ranked 3rd: out
    pool.add(top, child, is_eos, t=0)
    assert pool.leaf.tolist() == [[11, -1]] and pool.worst.item() == float("-inf")
    assert not pool.done(torch.tensor([-0.1]), 0).item()  # room left
    pool.add(
        torch.tensor([[-0.3, -0.4]]), torch.tensor([[20, 21]]), torch.tensor([[True, True]]), 1
    )
    assert pool.leaf.tolist() == [[20, 21]]  # -0.3 and -0.4 beat -0.5
    assert pool.done(torch.tensor([-0.45]), 1).item()  # full, and -0.45 cannot beat -0.4
    assert not pool.done(torch.tensor([-0.35]), 1).item()
    assert pool.done(torch.tensor([float("-inf")]), 1).item()  # nothing live


@pytest.mark.parametrize(("decoder", "options"), [("diverse", ("groups=2",)),
                                                  ("sample", ("samples=8",))])  # fmt: skip
def test_the_decoders_beyond_beam_search_evaluate_through_the_seam(synth, tmp_path, decoder,
                                                                    options):  # fmt: skip
    cfg = tiny_config(synth, tmp_path / "r", beam_width=4, decoder=decoder,
                      decoder_options=options)  # fmt: skip
    setup = build_setup(cfg, tmp_path / "r", fresh=True)
    got = evaluate_split(setup.model, setup, "test", EvalSettings.from_config(cfg))
    assert got["users"] == 3 and got["pr@10_count"] <= 3

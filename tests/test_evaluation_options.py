"""Evaluation options (issue: the real-model study): both scorings, the user's history excluded,
near copies of a history title reported apart."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _helpers_train import tiny_config, tiny_synth

from bear.data import Example
from bear.decoding import DecodeResult
from bear.evaluate import EvalSettings, evaluate_split, near_copy_rows
from bear.metrics import RANKING_KEYS, pruning_anatomy
from bear.ranking import drop_items
from bear.run import build_setup
from bear.train import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A briefly trained sft run's setup, its model holding the trained weights."""
    root = tmp_path_factory.mktemp("evaluation")
    data = tiny_synth(root / "synth")
    cfg = tiny_config(
        data, root / "run", loss="sft", epochs=2, limit_train=64, validate=False, lr=3e-3
    )
    train(cfg)
    setup = build_setup(cfg, root / "run", fresh=False)
    state = torch.load(root / "run" / "last.pt", weights_only=False)["model"]
    setup.model.load_state_dict(state, strict=False)
    return setup


def _strip(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "by_scoring"}


def test_both_scorings_report_each_as_a_single_scoring_would(trained):
    one = EvalSettings(beam_width=4, scoring="after", limit=8)
    both = dataclasses.replace(one, both_scorings=True)
    got = evaluate_split(trained.model, trained, "test", both)
    assert set(got["by_scoring"]) == {"after", "before"}
    assert _strip(got) == got["by_scoring"]["after"]  # the top level: the primary scoring
    for scoring in ("after", "before"):
        alone = evaluate_split(
            trained.model, trained, "test", dataclasses.replace(one, scoring=scoring)
        )
        assert got["by_scoring"][scoring] == alone
    decoded = evaluate_split(trained.model, trained, "test", both, full=False)  # no exact ranks
    assert set(decoded["by_scoring"]["before"]) == set(RANKING_KEYS)
    assert _strip(decoded) == decoded["by_scoring"]["after"]


def test_drop_items_removes_the_excluded_and_moves_the_rest_up():
    ids = torch.tensor([[5, 7, 9, -1], [3, 4, 5, 6]])
    found = DecodeResult(ids, torch.tensor([[-1.0, -2, -3, float("-inf")], [-1.0, -2, -3, -4]]))
    excluded = torch.tensor([[7, -1], [3, 6]])
    kept = drop_items(found, excluded)
    assert kept.item_ids.tolist() == [[5, 9, -1, -1], [4, 5, -1, -1]]
    assert kept.scores.tolist() == [[-1.0, -3.0, float("-inf"), float("-inf")],
                                    [-2.0, -3.0, float("-inf"), float("-inf")]]  # fmt: skip


def test_excluding_the_history_keeps_its_items_out_of_every_ranking(trained, monkeypatch):
    """With the history excluded, the search shortcut and exact_topk on every row agree (the
    exact ranking skips history items too); a target put in its own history is a miss, outside
    every exact top-K; without the option the same rows count as usual."""
    settings = EvalSettings(beam_width=4, scoring="after", limit=8, exclude_history=True)
    args = (trained.model, trained, "test", settings)
    assert evaluate_split(*args) == evaluate_split(*args, exact_all=True)
    tests = list(trained.data.test)
    own = [dataclasses.replace(e, history=(*e.history[1:], e.target)) for e in tests[:8]]
    monkeypatch.setattr(trained.data, "test", own + tests[8:])
    got = evaluate_split(*args)
    assert got["hr@10"] == 0.0 and got["pr@10_count"] == 0
    kept = evaluate_split(
        trained.model, trained, "test", dataclasses.replace(settings, exclude_history=False)
    )
    assert kept["users"] == got["users"] == 8


def test_near_copies_share_the_first_three_words_with_a_history_title():
    titles = {
        1: "Red Stapler Deluxe 20",
        2: "red stapler deluxe 30",
        3: "Red Stapler Mini",
        4: "Blue Pen",
    }
    rows = [Example("u", (1,), 2, 0, "x:2"), Example("u", (1, 4), 3, 0, "x:3"),
            Example("u", (4,), 1, 0, "x:4")]  # fmt: skip
    assert near_copy_rows(rows, titles).tolist() == [True, False, False]


def test_a_full_evaluation_reports_near_copies_and_the_rest_apart(trained):
    settings = EvalSettings(beam_width=4, limit=12, near_copies=True)
    got = evaluate_split(trained.model, trained, "test", settings)
    assert "near_copy" not in evaluate_split(trained.model, trained, "test", EvalSettings(limit=4))
    near, rest = got["near_copy"], got["not_near_copy"]
    assert near["users"] + rest["users"] == got["users"] == 12
    hits = near["hr@10"] * near["users"] if near["users"] else 0
    assert hits + rest["hr@10"] * rest["users"] == pytest.approx(got["hr@10"] * 12)


def test_pruning_anatomy_by_hand():
    """Cases in the exact top-10 only: kept (returned), pruned with a violation (depth of its
    first token outside the top-B), pruned otherwise; by popularity bucket."""
    beam = torch.tensor([0, -1, -1, 3, -1, -1])
    exact = torch.tensor([0, 2, 5, 1, -1, -2])  # the last two: outside, undecided
    depth = torch.tensor([-1, 3, -1, 0, 1, 2])
    popularity = torch.tensor([0, 5, 5, 20, 1, 1])
    got = pruning_anatomy(beam, exact, depth, popularity)
    assert (got["cases"], got["kept"], got["pruned_violation"], got["pruned_other"]) == (4, 2, 1, 1)
    assert got["violation_depth"] == {"3": 1}
    assert got["by_popularity"]["4-7"] == {"kept": 0, "pruned_violation": 1, "pruned_other": 1}
    assert got["by_popularity"]["0"]["kept"] == 1 and got["by_popularity"]["16+"]["kept"] == 1


def test_the_anatomy_agrees_with_pr_and_the_violation_share(trained):
    settings = EvalSettings(beam_width=2, scoring="after", anatomy=True)  # every test user
    got = evaluate_split(trained.model, trained, "test", settings)
    anatomy = got["anatomy"]
    assert anatomy["cases"] == got["pr@10_count"] > 0
    pruned = anatomy["pruned_violation"] + anatomy["pruned_other"]
    assert pruned == got["violation_share_count"] == round(got["pr@10"] * got["pr@10_count"])
    if pruned:
        assert anatomy["pruned_violation"] / pruned == pytest.approx(got["violation_share"])
    assert sum(anatomy["violation_depth"].values()) == anatomy["pruned_violation"]
    assert sum(sum(b.values()) for b in anatomy["by_popularity"].values()) == anatomy["cases"]


def test_a_run_with_the_anatomy_reports_it_and_draws_it(tmp_path):
    data = tiny_synth(tmp_path / "synth")
    metrics = train(tiny_config(data, tmp_path / "run", pruning_anatomy=True))
    assert set(metrics["test"]["anatomy"]) >= {"cases", "kept", "by_popularity"}
    assert (tmp_path / "run" / "anatomy.png").is_file()

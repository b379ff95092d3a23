"""Metrics on tiny hand-computed cases."""

import itertools
import math

import pytest
import torch

from bear.metrics import (
    BOUND_KEYS,
    COUNT_KEYS,
    METRIC_KEYS,
    UNDECIDED,
    hit_rate,
    ndcg,
    pruning_rate,
    pruning_rate_bounds,
    ranking_metrics,
    target_ranks,
    violation_share,
)


def test_target_ranks():
    items = torch.tensor([[4, 7, 9], [1, 2, -1], [5, 6, 8]])
    targets = torch.tensor([9, 3, 5])
    assert target_ranks(items, targets).tolist() == [2, -1, 0]
    # padding never matches, even a -1 target
    assert target_ranks(torch.tensor([[-1, -1]]), torch.tensor([-1])).tolist() == [-1]


def test_hit_rate_and_ndcg_by_hand():
    ranks = torch.tensor([0, 2, -1, 6])
    assert hit_rate(ranks, 1) == 0.25
    assert hit_rate(ranks, 5) == 0.5
    assert hit_rate(ranks, 10) == 0.75
    assert ndcg(ranks, 1) == pytest.approx(1 / 4)
    assert ndcg(ranks, 5) == pytest.approx((1 + 1 / math.log2(4)) / 4)  # 1 + 0.5
    assert ndcg(ranks, 10) == pytest.approx((1 + 0.5 + 1 / math.log2(8)) / 4)


def test_pruning_rate_by_hand():
    exact = torch.tensor([0, 3, 7, -1, 1])
    beam = torch.tensor([-1, 2, -1, -1, 0])
    # K=5: eligible users 0, 1, 4; pruned: user 0 -> 1/3
    assert pruning_rate(exact, beam, 5) == pytest.approx(1 / 3)
    # K=10: eligible 0, 1, 2, 4; pruned 0 and 2 -> 2/4
    assert pruning_rate(exact, beam, 10) == 0.5
    assert pruning_rate(torch.tensor([-1]), torch.tensor([-1]), 5) is None  # empty -> None


def test_violation_share_by_hand():
    pruned = torch.tensor([True, True, False, True])
    violated = torch.tensor([True, False, True, True])
    assert violation_share(pruned, violated) == pytest.approx(2 / 3)
    assert violation_share(torch.tensor([False]), torch.tensor([True])) is None


def test_ranking_metrics_dict():
    beam = torch.tensor([0, -1, 4, -1])
    exact = torch.tensor([0, 2, 4, 12])
    violated = torch.tensor([False, True, False, True])
    m = ranking_metrics(beam, exact, violated)
    assert tuple(m) == METRIC_KEYS + COUNT_KEYS + BOUND_KEYS
    assert (m["pr@10_low"], m["pr@10_high"]) == (m["pr@10"], m["pr@10"])  # none undecided
    assert m["hr@1"] == 0.25 and m["hr@5"] == 0.5 and m["hr@10"] == 0.5
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(6)) / 4)
    assert m["pr@5"] == pytest.approx(1 / 3) and m["pr@10"] == pytest.approx(1 / 3)
    assert m["violation_share"] == 1.0  # only user 1 is pruned (user 3: exact rank 12 >= 10)
    assert (m["users"], m["pr@5_count"], m["pr@10_count"], m["violation_share_count"]) == (
        4,
        3,
        3,
        1,
    )


def test_undecided_exact_ranks_count_in_no_pruning_rate():
    """An exact rank the budgeted search left UNDECIDED is neither a case of PR@K nor a miss:
    the rates equal those without the row, and the row is counted apart."""
    beam, exact = torch.tensor([0, -1, 4, -1, -1]), torch.tensor([0, 2, 4, 12, UNDECIDED])
    violated = torch.tensor([False, True, False, True, True])
    m = ranking_metrics(beam, exact, violated)
    without = ranking_metrics(beam[:4], exact[:4], violated[:4])
    assert {k: m[k] for k in ("pr@5", "pr@10", "violation_share")} == {
        k: without[k] for k in ("pr@5", "pr@10", "violation_share")
    }
    assert (m["pr@10_count"], m["exact_undecided"], without["exact_undecided"]) == (3, 1, 0)


def test_pruning_rate_bounds_range_over_the_undecided_cases():
    """Decided: user 0 pruned, user 1 kept (p 1 of n 2); undecided: 2 beam hits, 1 miss. Every
    assignment of in/out of the exact top-10 to the undecided cases lands within the bounds, and
    the bounds are reached."""
    beam = torch.tensor([-1, 3, 0, 5, -1, -1])
    exact = torch.tensor([4, 1, UNDECIDED, UNDECIDED, UNDECIDED, 12])
    low, high = pruning_rate_bounds(exact, beam, 10)
    assert (low, high) == (1 / 4, 2 / 3)
    rates = []
    for inside in itertools.product([True, False], repeat=3):
        filled = exact.clone()
        filled[2:5] = torch.tensor([7 if x else 15 for x in inside])
        rates.append(pruning_rate(filled, beam, 10))
    assert min(rates) == low and max(rates) == high
    m = ranking_metrics(beam, exact, torch.zeros(6, dtype=torch.bool))
    assert (m["pr@10_low"], m["pr@10_high"]) == (low, high)
    # undecided cases alone: a beam hit gives PR 0 if it is in the top K (undefined otherwise),
    # a miss PR 1
    assert pruning_rate_bounds(torch.tensor([UNDECIDED]), torch.tensor([0]), 10) == (0.0, 0.0)
    assert pruning_rate_bounds(torch.tensor([UNDECIDED]), torch.tensor([-1]), 10) == (1.0, 1.0)
    assert pruning_rate_bounds(torch.tensor([12]), torch.tensor([-1]), 10) == (None, None)


def test_empty_denominators_are_none_with_their_count():
    # SPEC §10: no target in the exact top-K, so PR@K and the violation share have no cases
    m = ranking_metrics(torch.tensor([-1]), torch.tensor([-1]), torch.tensor([False]))
    assert m["hr@10"] == 0.0 and m["ndcg@10"] == 0.0 and m["users"] == 1
    for key in ("pr@5", "pr@10", "violation_share"):
        assert m[key] is None and m[f"{key}_count"] == 0
    none = ranking_metrics(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long),
                           torch.tensor([], dtype=torch.bool))  # fmt: skip
    assert none["users"] == 0 and all(none[key] is None for key in METRIC_KEYS)
    assert hit_rate(torch.tensor([], dtype=torch.long), 5) is None
    assert ndcg(torch.tensor([], dtype=torch.long), 5) is None


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="k must"):
        hit_rate(torch.tensor([0]), 0)
    with pytest.raises(TypeError, match="integers"):
        ndcg(torch.tensor([0.5]), 5)
    with pytest.raises(ValueError, match="differ"):
        pruning_rate(torch.tensor([0, 1]), torch.tensor([0]), 5)


def test_reports_show_null_metrics_as_na(tmp_path):
    from bear.demo import format_table
    from bear.plots import plot_comparison

    test = ranking_metrics(torch.tensor([0, 3]), torch.tensor([-1, -1]), torch.tensor([0, 0]))
    assert test["pr@10"] is None and test["pr@10_count"] == 0
    table = format_table({"sft": {"test": test, "seconds_per_epoch": None}})
    assert "n/a" in table.splitlines()[-1] and "0.0000" not in table.splitlines()[-1]
    assert plot_comparison({"sft": test}, tmp_path / "plot.png").is_file()

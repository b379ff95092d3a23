"""Ranking metrics of SPEC §5: pure functions of integer ranks.

A rank is the 0-based position of the target in a returned list, -1 when the target is absent.
A mean over an empty set is None (JSON null), never 0.0 or NaN (SPEC §10); `ranking_metrics` puts
each ratio's denominator beside it (COUNT_KEYS).
"""

from __future__ import annotations

import torch

__all__ = [
    "target_ranks",
    "hit_rate",
    "ndcg",
    "pruning_rate",
    "pruning_rate_bounds",
    "violation_share",
    "ranking_metrics",
    "beam_metrics",
    "pruning_anatomy",
    "ANATOMY_KEYS",
    "POPULARITY_BUCKETS",
    "RANKING_KEYS",
    "METRIC_KEYS",
    "TABLE_KEYS",
    "SELECT_METRIC",
    "COUNT_KEYS",
    "BOUND_KEYS",
    "UNDECIDED",
]

CUTOFFS = (1, 5, 10)  # K of NDCG@K and HR@K
PRUNING_CUTOFFS = (5, 10)  # K of PR@K
# The metrics of the beam-search ranks alone: what per-epoch validation computes, and the ones
# the paper's tables report (as per-metric maxima over epochs under the upstream protocol).
RANKING_KEYS = tuple(f"ndcg@{k}" for k in CUTOFFS) + tuple(f"hr@{k}" for k in CUTOFFS)
# Every metric of a full test (SPEC §7's metrics.json), in order.
METRIC_KEYS = RANKING_KEYS + tuple(f"pr@{k}" for k in PRUNING_CUTOFFS) + ("violation_share",)
# The columns of the tables and bar charts comparing runs (PR: lower is better).
TABLE_KEYS = ("ndcg@5", "ndcg@10", "hr@5", "hr@10", "pr@5", "pr@10")
SELECT_METRIC = "ndcg@10"  # SPEC §3: model selection by validation NDCG@10
# The denominator of each ratio, reported beside it: test cases (HR, NDCG), cases whose target is
# in the exact top-K (PR@K), pruned cases (violation share); then the cases left out of PR@K
# because their exact rank is UNDECIDED.
COUNT_KEYS = ("users", "pr@5_count", "pr@10_count", "violation_share_count", "exact_undecided")
# an exact rank the search could not decide within its budget (bear.evaluate's exact_budget):
# such a case is in neither the numerator nor the denominator of PR@K, and is counted apart
UNDECIDED = -2
# the range PR@10 can take over the UNDECIDED cases' unknown exact ranks (`pruning_rate_bounds`,
# exact at K = 10, the depth of the exact count)
BOUND_KEYS = ("pr@10_low", "pr@10_high")
PRUNED_AT = 10  # the cut-off of `violation_share` in ranking_metrics: pruned = counted in PR@10


def _ranks(x) -> torch.Tensor:
    r = torch.as_tensor(x).reshape(-1)
    if r.is_floating_point() or r.dtype == torch.bool:
        raise TypeError(f"ranks must be integers (0-based, -1 = absent), got dtype {r.dtype}")
    return r.to(torch.int64)


def _check_k(k) -> int:
    if int(k) != k or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k}")
    return int(k)


def _mean(num: torch.Tensor, den: int) -> float | None:
    """sum(num) / den, None when den = 0 (an empty denominator is not a value of 0)."""
    return float(num.sum()) / den if den > 0 else None


def target_ranks(item_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based position of each user's target in its list, -1 when absent.

    Args:
        item_ids: (U, B) returned item ids (-1 = padding, never matches).
        targets: (U,) target item ids (canonical ids, as the lists hold).

    Returns:
        (U,) int64.
    """
    item_ids = torch.as_tensor(item_ids)
    targets = torch.as_tensor(targets, device=item_ids.device).reshape(-1)
    if item_ids.dim() != 2 or item_ids.shape[0] != targets.shape[0]:
        raise ValueError(
            f"item_ids must be (U, B) and targets (U,); got {tuple(item_ids.shape)} and "
            f"{tuple(targets.shape)}"
        )
    hit = (item_ids == targets[:, None]) & (targets[:, None] >= 0)  # (U, B)
    first = hit.long().argmax(dim=1)
    return torch.where(hit.any(dim=1), first, torch.full_like(first, -1)).to(torch.int64)


def hit_rate(ranks, k: int) -> float | None:
    """HR@K = (1/U) sum_u [0 <= r_u < K]; None when U = 0."""
    r, k = _ranks(ranks), _check_k(k)
    return _mean(((r >= 0) & (r < k)).double(), r.numel())


def ndcg(ranks, k: int) -> float | None:
    """NDCG@K = (1/U) sum_u [0 <= r_u < K] / log2(r_u + 2) (one relevant item, so IDCG = 1);
    None when U = 0."""
    r, k = _ranks(ranks), _check_k(k)
    hit = (r >= 0) & (r < k)
    gain = torch.where(hit, 1.0 / torch.log2(r.clamp(min=0).double() + 2.0), 0.0)
    return _mean(gain, r.numel())


def pruning_rate(exact_ranks, beam_ranks, k: int) -> float | None:
    """Incorrect-pruning rate PR@K (paper §4.2).

    PR@K = |{u : 0 <= e_u < K and b_u = -1}| / |{u : 0 <= e_u < K}|, with e_u the target's rank
    in the exact top-K by full score and b_u its rank in the beam-search list; None when no
    target is in the exact top-K.
    """
    e, b, k = _ranks(exact_ranks), _ranks(beam_ranks), _check_k(k)
    if e.shape != b.shape:
        raise ValueError(f"exact_ranks {tuple(e.shape)} and beam_ranks {tuple(b.shape)} differ")
    eligible = (e >= 0) & (e < k)
    return _mean((eligible & (b < 0)).double(), int(eligible.sum()))


def pruning_rate_bounds(exact_ranks, beam_ranks, k: int) -> tuple[float | None, float | None]:
    """The least and greatest PR@K over the exact ranks the UNDECIDED cases could have.

    With p pruned among n decided cases in the exact top-K, and among the undecided cases h whose
    target the beam returned and m whose target it missed:

        low = p / (n + h)        (the beam's hits in the exact top-K, its misses outside)
        high = (p + m) / (n + m) (its misses in the exact top-K, its hits outside)

    Exact when any undecided case may be in the top K: K = 10, the depth of the exact count
    (a case stays undecided only while fewer than 10 items are known to beat it); for K < 10 a
    valid but possibly wider range, since such a case may already be known to be outside the
    top K. Where a formula's denominator is 0, the bound is taken over the assignments that
    define PR@K (low 1.0 when only misses can enter, high 0.0 when only hits can), and both are
    None when none does. Both equal PR@K when no case is undecided.
    """
    e, b, k = _ranks(exact_ranks), _ranks(beam_ranks), _check_k(k)
    if e.shape != b.shape:
        raise ValueError(f"exact_ranks {tuple(e.shape)} and beam_ranks {tuple(b.shape)} differ")
    eligible, undecided = (e >= 0) & (e < k), e == UNDECIDED
    p, n = int((eligible & (b < 0)).sum()), int(eligible.sum())
    h, m = int((undecided & (b >= 0)).sum()), int((undecided & (b < 0)).sum())
    low = p / (n + h) if n + h else (1.0 if m else None)
    high = (p + m) / (n + m) if n + m else (0.0 if h else None)
    return low, high


def violation_share(pruned, violated) -> float | None:
    """Among pruned cases, the share where some target token has margin Δ > 0 (paper Fig. 4).

    share = |{u : pruned_u and violated_u}| / |{u : pruned_u}|; None when no case is pruned.
    """
    p = torch.as_tensor(pruned).reshape(-1).bool()
    v = torch.as_tensor(violated, device=p.device).reshape(-1).bool()
    if p.shape != v.shape:
        raise ValueError(f"pruned {tuple(p.shape)} and violated {tuple(v.shape)} differ")
    return _mean((p & v).double(), int(p.sum()))


def beam_metrics(beam_ranks) -> dict[str, float | None]:
    """NDCG@K and HR@K (K in CUTOFFS) of the beam-search ranks: the keys of RANKING_KEYS."""
    b = _ranks(beam_ranks)
    out = {f"ndcg@{k}": ndcg(b, k) for k in CUTOFFS}
    return out | {f"hr@{k}": hit_rate(b, k) for k in CUTOFFS}


def ranking_metrics(beam_ranks, exact_ranks, violated) -> dict[str, float | int | None]:
    """The metrics of SPEC §5: the keys of METRIC_KEYS, then their denominators (COUNT_KEYS), then
    the range of PR@10 over the undecided cases (BOUND_KEYS, `pruning_rate_bounds`).

    HR and NDCG at 1, 5, 10 from the beam-search ranks; PR@5 and PR@10 from both; the violation
    share among cases pruned at K = 10 (0 <= exact rank < 10 and absent from the beam). A ratio
    whose denominator is 0 is None, e.g. {"pr@10": None, ..., "pr@10_count": 0}. Exact ranks of
    UNDECIDED (-2) count in no PR@K and are reported as "exact_undecided".
    """
    b, e = _ranks(beam_ranks), _ranks(exact_ranks)
    out = beam_metrics(b)
    for k in PRUNING_CUTOFFS:
        out[f"pr@{k}"] = pruning_rate(e, b, k)
    pruned = (e >= 0) & (e < PRUNED_AT) & (b < 0)
    out["violation_share"] = violation_share(pruned, violated)
    counts = {
        "users": b.numel(),
        "pr@5_count": int(((e >= 0) & (e < 5)).sum()),
        "pr@10_count": int(((e >= 0) & (e < 10)).sum()),
        "violation_share_count": int(pruned.sum()),
        "exact_undecided": int((e == UNDECIDED).sum()),
    }
    bounds = dict(zip(BOUND_KEYS, pruning_rate_bounds(e, b, 10), strict=True))
    return {key: out[key] for key in METRIC_KEYS} | counts | bounds


# buckets of a target's training popularity (its occurrences in the training rows): (label, low,
# high) inclusive, doubling
POPULARITY_BUCKETS = (
    ("0", 0, 0),
    ("1", 1, 1),
    ("2-3", 2, 3),
    ("4-7", 4, 7),
    ("8-15", 8, 15),
    ("16+", 16, 2**62),
)
ANATOMY_KEYS = ("kept", "pruned_violation", "pruned_other")


def pruning_anatomy(beam_ranks, exact_ranks, depth, popularity, k: int = PRUNED_AT) -> dict:
    """Where pruning happens (paper Fig. 4, extended): among the cases whose target is in the
    exact top-K, each is ``kept`` (the beam returned it), ``pruned_violation`` (not returned,
    and some target token ranks outside the top-B of its step: Δ > 0, the necessary condition
    (3.2) fails) or ``pruned_other`` (not returned though every token is inside its step's
    top-B: the prefix lost to other beams).

    Args:
        beam_ranks, exact_ranks: (U,) as ``ranking_metrics``'s.
        depth: (U,) the title position of the first target token with Δ > 0, -1 where none.
        popularity: (U,) the target's occurrences in the training rows.

    Returns:
        {"cases", the three counts, "violation_depth": {position: pruned_violation cases whose
        first violation is there}, "by_popularity": {bucket label (POPULARITY_BUCKETS): the three
        counts}}.
    """
    b, e, d = _ranks(beam_ranks), _ranks(exact_ranks), _ranks(depth)
    pop, k = _ranks(popularity), _check_k(k)
    eligible = (e >= 0) & (e < k)
    kinds = {
        "kept": eligible & (b >= 0),
        "pruned_violation": eligible & (b < 0) & (d >= 0),
        "pruned_other": eligible & (b < 0) & (d < 0),
    }
    out = {"cases": int(eligible.sum())} | {key: int(kinds[key].sum()) for key in ANATOMY_KEYS}
    depths = d[kinds["pruned_violation"]].tolist()
    out["violation_depth"] = {str(p): depths.count(p) for p in sorted(set(depths))}
    out["by_popularity"] = {
        label: {key: int((kinds[key] & (pop >= low) & (pop <= high)).sum()) for key in ANATOMY_KEYS}
        for label, low, high in POPULARITY_BUCKETS
    }
    return out

"""Evaluation: constrained beam search, exact top-K, teacher-forced margins -> metrics (SPEC §5).

``python -m bear evaluate --run RUN`` rebuilds the run's model from its saved config and checkpoint
and recomputes ``RUN/metrics.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from bear.count_above import count_items_above
from bear.decoding import beam_search, exact_topk
from bear.items import IGNORE_INDEX, collate
from bear.kv_cache import PromptCache
from bear.metrics import UNDECIDED, hit_rate, ndcg, ranking_metrics, target_ranks
from bear.model import autocast_for, scoring_for
from bear.protocol import epoch_checkpoint, upstream_metrics
from bear.run import (
    Setup,
    build_setup,
    load_run_config,
    load_weights,
    resolve_device,
    write_json_atomic,
)
from bear.run_folder import read_checkpoint
from bear.teacher_forcing import item_logits
from bear_kernels import ce_margin, counted_rows

__all__ = ["EXACT_K", "evaluate_split", "evaluate_run"]

EXACT_K = 10  # exact top-K depth: PR@5 and PR@10 need the exact top-10 (SPEC §5)
SCORE_TOLERANCE = 1e-3  # beam scores vs teacher-forced sums: float noise well below this


def _full_scores(beam, trie, length_penalty: float) -> torch.Tensor:
    """(U, B) the beam's item scores at α = 0 (sums of log-probabilities): score · length^α,
    length = the item's tokens including EOS; -inf where padded."""
    scores = beam.scores.float()  # (U, B)
    if length_penalty == 0:
        return scores
    tokens = trie.item_tokens(beam.item_ids.clamp(min=0).reshape(-1))  # (U·B, L + 1)
    lengths = (tokens != IGNORE_INDEX).sum(1).reshape(scores.shape).to(scores.dtype)  # (U, B)
    return torch.where(torch.isfinite(scores), scores * lengths**length_penalty, scores)


@torch.no_grad()
def evaluate_split(model, setup: Setup, split: str, beam_width: int, scoring: str, limit=None,
                   batch_size: int = 32, device=None, full: bool = True,
                   exact_all: bool = False, length_penalty: float = 0.0, rank: int = 0,
                   world: int = 1, exact_budget: int | None = None,
                   progress: bool = False) -> dict:  # fmt: skip
    """Metrics of SPEC §5 on the first ``limit`` rows of a split ("valid" or "test").

    ``length_penalty``: α of the beam search (item score / length^α; upstream's generate: 1.0).
    The exact top-K (PR@K) ranks by full score (α = 0) whatever α is.

    Beam ranks come from ``beam_search``; exact ranks (for PR@K) as below; the
    violation share from teacher-forced margins Δ (``ce_margin`` over the trie's allowed sets).
    Rows are decoded in batches of similar prompt length (least left padding), each row's
    results kept in its own place. A full test prefills each batch's prompts once
    (``PromptCache``): the beam search, the teacher-forced target (``item_logits``) and the
    count all read that prefill (``exact_all``'s ``exact_topk`` prefills again).
    The exact rank is needed only where it can matter: if the beam already returned
    ``EXACT_K`` other items whose scores beat the target's teacher-forced score s_y (by more than
    SCORE_TOLERANCE), the target is not in the exact top-``EXACT_K`` (rank -1); elsewhere
    ``count_items_above`` counts the other items beating s_y, up to ``EXACT_K`` with the beam's:
    fewer is the exact rank. ``exact_all=True`` instead runs ``exact_topk`` for every row and
    ranks the target among its items (tests check the two agree).
    ``exact_budget``: None (exact), or the prefix tokens the count may feed per row; a row whose
    count stops there unsettled is UNDECIDED: in no PR@K, counted as "exact_undecided".
    ``full=False`` (per-epoch validation): beam search only, giving NDCG@K and HR@K.
    ``progress``: a bar of the decoded rows on stderr (rank 0 only).
    ``world > 1`` (collective: every rank calls it): rank r decodes the r-th of ``world``
    contiguous shares of the rows; the per-row ranks are gathered in row order, so every rank
    returns the metrics of one process.
    """
    device = torch.device(device or "cpu")
    prompts, targets = setup.prompts[split], setup.targets[split]
    n = len(prompts) if limit is None else min(limit, len(prompts))
    share = slice(n * rank // world, n * (rank + 1) // world)
    prompts, targets = prompts[share], targets[share]
    trie = setup.trie.to(device)
    was_training = model.training
    model.eval()
    # batches of prompts of similar length (left padding costs the prefill and every attention);
    # per-row results go back to the rows' own places
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    beam_ranks = torch.full((len(prompts),), -1, dtype=torch.long)
    exact_ranks, violated = beam_ranks.clone(), torch.zeros(len(prompts), dtype=torch.bool)
    bar = tqdm(total=len(prompts), desc=f"{split} ({'full' if full else 'beam'})", unit="row",
               disable=not progress or rank != 0, leave=False)  # fmt: skip
    for start in range(0, len(prompts), batch_size):
        at = order[start : start + batch_size]
        batch = collate([prompts[i] for i in at], [targets[i] for i in at], setup.items,
                        setup.trie, setup.pad_id).to(device)  # fmt: skip
        canon = trie.canonical(batch.items)  # (U,)
        with autocast_for(device):  # a full test reads one prefill of the prompts throughout
            prompt = (
                PromptCache.prefill(model, batch.prompt_ids, batch.prompt_mask) if full else None
            )
            beam = beam_search(model, batch.prompt_ids, batch.prompt_mask, trie, beam_width,
                               scoring=scoring, length_penalty=length_penalty,
                               prompt=prompt)  # fmt: skip
        beam_ranks[at] = target_ranks(beam.item_ids, canon).cpu()
        if not full:
            bar.update(canon.shape[0])
            continue
        with autocast_for(device):
            logits, target, nodes = item_logits(model, prompt, trie, batch.items)  # (U, W, V)
        U, W, V = logits.shape
        mask = trie.allowed_mask(nodes.reshape(-1))  # (U·W, words)
        target = target.reshape(-1)  # (U·W,)
        flat = logits.reshape(U * W, V)
        ce, margin = ce_margin(flat, target, beam_width=beam_width, allowed_mask=mask)
        counted = counted_rows(target, mask, vocab_size=V)
        violated[at] = ((margin > 0) & counted).reshape(U, W).any(1).cpu()
        if scoring == "after":  # full-vocabulary log-probabilities, restricted to the trie
            ce, _ = ce_margin(flat, target, beam_width=beam_width)
        s_y = -ce.reshape(U, W).sum(1)  # (U,) the target's score, α = 0
        beats = _full_scores(beam, trie, length_penalty) > s_y[:, None] + SCORE_TOLERANCE
        above = (beats & (beam.item_ids != canon[:, None])).sum(1)  # (U,)
        need = torch.ones_like(above, dtype=torch.bool) if exact_all else above < EXACT_K
        ranks = torch.full((U,), -1, dtype=torch.long)
        rows = need.nonzero().flatten()
        if rows.numel() and exact_all:  # the K best items in order, the target's rank among them
            with autocast_for(device):
                exact = exact_topk(model, batch.prompt_ids[rows], batch.prompt_mask[rows], trie,
                                   k=EXACT_K, scoring=scoring)  # fmt: skip
            ranks[rows.cpu()] = target_ranks(exact.item_ids, canon[rows]).cpu()
        elif rows.numel():  # the items above the target: the beam's, then counted up to K
            seen = torch.where(beats, beam.item_ids, -1)[rows]  # (R, B) not counted again
            with autocast_for(device):
                count, complete = count_items_above(
                    model, batch.prompt_ids[rows], batch.prompt_mask[rows], trie,
                    s_y[rows] + SCORE_TOLERANCE, k=EXACT_K - above[rows], scoring=scoring,
                    exclude=torch.cat([canon[rows, None], seen], 1), max_expansions=exact_budget,
                    prompt=prompt.select(rows),
                )  # fmt: skip
            rank = above[rows] + count
            found = torch.where(rank < EXACT_K, rank, -1)
            ranks[rows.cpu()] = torch.where(complete, found, UNDECIDED).cpu()
        exact_ranks[at] = ranks
        bar.update(U)
    bar.close()
    model.train(was_training)
    per_row = (beam_ranks, exact_ranks, violated)
    if world > 1:
        shares = [None] * world
        dist.all_gather_object(shares, per_row)
        per_row = tuple(torch.cat(parts) for parts in zip(*shares, strict=True))
    ranks, exact, violated_rows = per_row
    if not full:
        out = {f"ndcg@{k}": ndcg(ranks, k) for k in (1, 5, 10)}
        return out | {f"hr@{k}": hit_rate(ranks, k) for k in (1, 5, 10)}
    return ranking_metrics(ranks, exact, violated_rows)


def evaluate_run(run: str | Path, limit_eval: int | None = None, device: str = "auto",
                 protocol: str | None = None,
                 length_penalty: float | None = None) -> dict:  # fmt: skip
    """Recompute RUN/metrics.json from the run's saved config and checkpoints.

    ``protocol``: None or the run's own (files, split and selection are fixed when training:
    ValueError for the other, which needs a new run). ``length_penalty``: α of the beam search
    (default the run's). Protocol ours tests the selected checkpoint (and re-validates it);
    upstream re-tests every RUN/epoch_<e>.pt and takes the per-metric maxima again.
    """
    run = Path(run)
    cfg = load_run_config(run)
    if protocol is not None and protocol != cfg.protocol:
        raise ValueError(
            f"--protocol: got {protocol!r}, but {run} was trained under {cfg.protocol!r}; its "
            f"files, split and selection are fixed by training: train again with --protocol "
            f"{protocol}"
        )
    if limit_eval is not None:
        cfg.limit_eval = limit_eval
    if length_penalty is not None:
        if not math.isfinite(length_penalty):
            raise ValueError(f"--length-penalty: got {length_penalty}, expected a finite α")
        cfg.length_penalty = length_penalty
    old = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    dev = resolve_device(device)
    if cfg.protocol == "upstream":  # the epochs metrics.json lists (a resumed stop leaves others)
        checkpoints = [run / epoch_checkpoint(e["epoch"]) for e in old.get("epochs", [])] or sorted(
            run.glob("epoch_*.pt"), key=lambda p: float(p.stem[len("epoch_") :])
        )
    else:
        checkpoints = [run / old.get("checkpoint", "best.pt")]
    missing = [str(c) for c in checkpoints if not c.is_file()] or (
        [] if checkpoints else [str(run)]
    )
    if missing:
        raise FileNotFoundError(f"{missing[0]}: no checkpoint; train the run to the end first")
    setup = build_setup(cfg, run, fresh=False, device=dev)
    model = setup.model.to(dev)
    scoring = scoring_for(cfg.loss)

    def test(checkpoint: Path, split: str = "test") -> tuple[dict, dict]:
        state = read_checkpoint(checkpoint, fix="train the run to the end first")
        load_weights(model, state["model"], source=str(checkpoint))
        return state, evaluate_split(model, setup, split, cfg.beam_width, scoring, cfg.limit_eval,
                                     cfg.eval_batch_size, dev,
                                     length_penalty=cfg.length_penalty,
                                     exact_budget=cfg.exact_budget,
                                     progress=cfg.progress)  # fmt: skip

    if cfg.protocol == "upstream":
        epochs = []
        for checkpoint in checkpoints:
            state, metrics = test(checkpoint)
            epochs.append({"epoch": state["epoch"], "test": metrics})
        metrics = upstream_metrics(epochs, cfg.length_penalty)
    else:
        state, test_metrics = test(checkpoints[0])
        _, valid_metrics = test(checkpoints[0], "valid")
        metrics = {"protocol": "ours", "length_penalty": cfg.length_penalty,
                   "valid": valid_metrics, "test": test_metrics,
                   "best_epoch": old.get("best_epoch", state.get("epoch")),
                   "checkpoint": checkpoints[0].name}  # fmt: skip
    metrics["seconds_per_epoch"] = old.get("seconds_per_epoch")
    write_json_atomic(run / "metrics.json", metrics)
    return metrics

"""Evaluation: a decoder's lists, exact ranks and teacher-forced margins -> metrics (SPEC §5).

``EvalSettings`` is built once from a run's configuration; ``evaluate_split`` computes one
split's metrics with it; ``python -m bear evaluate --run RUN`` (``evaluate_run``) rebuilds the
run's model from its saved config and checkpoints and recomputes ``RUN/metrics.json``.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from bear.config import TrainConfig
from bear.data import Example
from bear.decoding.decoder import Decoder
from bear.decoding.prompt_cache import PromptCache
from bear.decoding.registry import get_decoder
from bear.items import collate
from bear.losses.registry import get_loss
from bear.metrics import beam_metrics, pruning_anatomy, ranking_metrics, target_ranks
from bear.model import autocast_for
from bear.protocol import epoch_checkpoint
from bear.ranking import drop_items, exact_ranks, target_terms
from bear.report import Selection, run_metrics, write_metrics
from bear.run import Setup, build_setup, load_run_config, load_weights, resolve_device
from bear.run_folder import read_checkpoint, remove_temp_files
from bear.stopping import check

__all__ = [
    "EvalSettings",
    "RowResults",
    "evaluate_rows",
    "evaluate_run",
    "evaluate_split",
    "near_copy_rows",
]

NEAR_COPY_WORDS = 3  # a target is a near copy of a history title when their first 3 words agree


@dataclass(frozen=True)
class EvalSettings:
    """How a split is evaluated (SPEC §11): built once from a run's configuration.

    Fields: ``decoder`` a registered decoder (``bear.decoding.registry``) and its
    ``decoder_options`` (KEY=VALUE), ``beam_width`` B the items it returns per user,
    ``scoring`` "before" / "after" (the loss's by default), ``both_scorings`` report a full
    evaluation under both, ``exclude_history`` remove each user's history items from the lists
    and the exact ranking, ``near_copies`` report the users whose target is a near copy of a
    history title apart, ``anatomy`` report where pruning happens (``pruning_anatomy``),
    ``length_penalty`` α, ``exact_budget`` the prefix tokens the exact rank's count may feed per
    row (None: exact), ``batch_size`` prompts per decoding batch, ``limit`` the first rows of a
    split (None: all), ``progress`` a bar.
    """

    beam_width: int = 10
    scoring: str = "before"
    both_scorings: bool = False
    exclude_history: bool = False
    near_copies: bool = False
    anatomy: bool = False
    length_penalty: float = 0.0
    decoder: str = "beam"
    decoder_options: tuple[str, ...] = ()
    exact_budget: int | None = None
    batch_size: int = 32
    limit: int | None = None
    progress: bool = False

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> EvalSettings:
        """The settings of a run: its evaluation width (the training one by default), its
        loss's scoring (or --scoring's), its protocol's length penalty, its evaluation flags."""
        own = get_loss(cfg.loss).scoring
        return cls(
            beam_width=cfg.eval_beam_width or cfg.beam_width,
            scoring=own if cfg.scoring in (None, "both") else cfg.scoring,
            both_scorings=cfg.scoring == "both",
            exclude_history=cfg.exclude_history,
            near_copies=cfg.near_copy_report,
            anatomy=cfg.pruning_anatomy,
            length_penalty=cfg.length_penalty,
            decoder=cfg.decoder,
            decoder_options=tuple(cfg.decoder_options),
            exact_budget=cfg.exact_budget,
            batch_size=cfg.eval_batch_size,
            limit=cfg.limit_eval,
            progress=cfg.progress,
        )

    @property
    def scorings(self) -> tuple[str, ...]:
        """The scorings a full evaluation reports: ``scoring`` first, then the other if both."""
        other = "after" if self.scoring == "before" else "before"
        return (self.scoring, other) if self.both_scorings else (self.scoring,)

    def build_decoder(self) -> Decoder:
        """The decoder with its options (ValueError for an unknown decoder or option)."""
        return get_decoder(self.decoder).from_options(self.decoder_options)


def near_copy_rows(examples: list[Example], titles: dict[int, str]) -> torch.Tensor:
    """(R,) bool: the rows whose target's title starts with the same NEAR_COPY_WORDS words
    (case-insensitive) as a title in the row's history: recommendations a model can make by
    copying the prompt (reported apart from the rest in a full evaluation)."""

    def head(item: int) -> tuple[str, ...]:
        return tuple(titles[item].lower().split()[:NEAR_COPY_WORDS])

    return torch.tensor(
        [any(head(h) == head(e.target) for h in e.history) for e in examples], dtype=torch.bool
    )


def _history(examples: list[Example], trie, device) -> torch.Tensor:
    """(U, H) the canonical ids of each row's history items, -1 padded."""
    width = max(len(e.history) for e in examples)
    flat = torch.tensor([i for e in examples for i in e.history], dtype=torch.long, device=device)
    canon = iter(trie.canonical(flat).tolist())
    rows = [[next(canon) for _ in e.history] + [-1] * (width - len(e.history)) for e in examples]
    return torch.tensor(rows, dtype=torch.long, device=device).reshape(len(examples), width)


@dataclass
class RowResults:
    """Per-row results of a split's evaluation (``evaluate_rows``), in the split's row order.

    ranks: scoring -> (R,) the target's rank in the decoder's list (-1: absent); exact: scoring ->
    (R,) its rank in the exact top-EXACT_K by full score (-1 outside it, UNDECIDED; all -1 when
    not ``full``); depth (R,) the title position of the first target token with Δ > 0, -1 where
    none is (``full`` only); near_copy (R,) bool, the target is a near copy of a history title
    (``near_copy_rows``); popularity (R,) the target's occurrences in the training rows.
    """

    ranks: dict[str, torch.Tensor]
    exact: dict[str, torch.Tensor]
    depth: torch.Tensor
    near_copy: torch.Tensor
    popularity: torch.Tensor
    full: bool

    @property
    def violated(self) -> torch.Tensor:
        """(R,) bool: some target token has Δ > 0 (the necessary condition (3.2) fails)."""
        return self.depth >= 0

    def metrics(self, scoring: str, near_copies: bool = False, anatomy: bool = False) -> dict:
        """The metrics under ``scoring``: full, SPEC §5's (with ``near_copies``, those of the
        near-copy rows and of the rest beside: ``near_copy``, ``not_near_copy``; with
        ``anatomy``, ``bear.metrics.pruning_anatomy``); else NDCG@K and HR@K."""
        ranks = self.ranks[scoring]
        if not self.full:
            return beam_metrics(ranks)
        exact, violated, near = self.exact[scoring], self.violated, self.near_copy
        out = ranking_metrics(ranks, exact, violated)
        if anatomy:
            out["anatomy"] = pruning_anatomy(ranks, exact, self.depth, self.popularity)
        if near_copies:
            out["near_copy"] = ranking_metrics(ranks[near], exact[near], violated[near])
            out["not_near_copy"] = ranking_metrics(ranks[~near], exact[~near], violated[~near])
        return out


@torch.no_grad()
def evaluate_split(
    model,
    setup: Setup,
    split: str,
    settings: EvalSettings,
    device=None,
    full: bool = True,
    exact_all: bool = False,
    rank: int = 0,
    world: int = 1,
) -> dict:
    """Metrics of SPEC §5 on the first ``settings.limit`` rows of a split ("valid" or "test"):
    ``evaluate_rows``'s per-row results summarised under ``settings.scoring``, and under every
    scoring in ``by_scoring`` when ``settings.both_scorings``; with ``settings.near_copies`` a
    full evaluation reports the near-copy rows and the rest apart (``near_copy``,
    ``not_near_copy``). Arguments as ``evaluate_rows``."""
    rows = evaluate_rows(model, setup, split, settings, device, full, exact_all, rank, world)
    reports = (settings.near_copies, settings.anatomy)
    out = rows.metrics(settings.scoring, *reports)
    if settings.both_scorings:
        out["by_scoring"] = {s: rows.metrics(s, *reports) for s in settings.scorings}
    return out


@torch.no_grad()
def evaluate_rows(
    model,
    setup: Setup,
    split: str,
    settings: EvalSettings,
    device=None,
    full: bool = True,
    exact_all: bool = False,
    rank: int = 0,
    world: int = 1,
) -> RowResults:
    """Per-row results (``RowResults``) on the first ``settings.limit`` rows of a split ("valid"
    or "test"), under each of ``settings.scorings``.

    The lists come from the settings' decoder (``EvalSettings.build_decoder``: beam search by
    default, α = ``length_penalty``); exact ranks (for PR@K) as below, by full score (α = 0)
    whatever α is; the violation share from teacher-forced margins Δ (``ce_margin`` over the
    trie's allowed sets). Rows are decoded in batches of similar prompt length (least left
    padding), each row's results kept in its own place. A full test prefills each batch's prompts
    once (``PromptCache``): the decoder, the teacher-forced target (``item_logits``) and the
    count all read that prefill (``exact_all``'s ``exact_topk`` prefills again).
    The exact rank is needed only where it can matter: if the decoder already returned
    ``EXACT_K`` other items whose scores beat the target's teacher-forced score s_y (by more than
    SCORE_TOLERANCE), the target is not in the exact top-``EXACT_K`` (rank -1); elsewhere
    ``count_items_above`` counts the other items beating s_y, up to ``EXACT_K`` with the
    decoder's: fewer is the exact rank. ``exact_all=True`` instead runs ``exact_topk`` for every
    row and ranks the target among its items (tests check the two agree).
    ``settings.exact_budget``: None (exact), or the prefix tokens the count may feed per row; a
    row whose count stops there unsettled is UNDECIDED: in no PR@K, counted as
    "exact_undecided". ``settings.exclude_history``: each row's history items are removed from
    the decoder's list (the others move up) and from the exact ranking; a target in its own
    history is then a miss, outside every exact top-K. ``full=False`` (per-epoch validation): the
    decoder only, its ranks. ``settings.progress``: a bar of the decoded rows on stderr (rank 0
    only). ``world > 1`` (collective: every rank calls it): rank r decodes the r-th of ``world``
    contiguous shares of the rows; the per-row results are gathered in row order, so every rank
    returns those of one process.
    """
    device = torch.device(device or "cpu")
    decoder = settings.build_decoder()
    scorings = settings.scorings
    prompts, targets = setup.prompts[split], setup.targets[split]
    n = len(prompts) if settings.limit is None else min(settings.limit, len(prompts))
    share = slice(n * rank // world, n * (rank + 1) // world)
    prompts, targets = prompts[share], targets[share]
    examples = getattr(setup.data, split)[share]
    trie = setup.trie.to(device)
    was_training = model.training
    model.eval()
    # batches of prompts of similar length (left padding costs the prefill and every attention);
    # per-row results go back to the rows' own places
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    blank = torch.full((len(prompts),), -1, dtype=torch.long)
    ranks = {s: blank.clone() for s in scorings}
    exact = {s: blank.clone() for s in scorings}
    depth = torch.full((len(prompts),), -1, dtype=torch.long)
    what = "full" if full else settings.decoder
    show = settings.progress and rank == 0
    bar = tqdm(
        total=len(prompts), desc=f"{split} ({what})", unit="row", disable=not show, leave=False
    )
    for start in range(0, len(prompts), settings.batch_size):
        check(f"while evaluating {split} (row {start} of {len(prompts)})")
        at = order[start : start + settings.batch_size]
        rows = ([prompts[i] for i in at], [targets[i] for i in at])
        batch = collate(*rows, setup.items, setup.trie, setup.pad_id).to(device)
        canon = trie.canonical(batch.items)  # (U,)
        excluded = torch.full((len(at), 0), -1, dtype=torch.long, device=device)
        if settings.exclude_history:
            excluded = _history([examples[i] for i in at], trie, device)
        prompt, s_y = None, {}
        with autocast_for(device):  # a full test reads one prefill of the prompts throughout
            if full:
                prompt = PromptCache.prefill(model, batch.prompt_ids, batch.prompt_mask)
        if full:
            first, s_y = target_terms(model, prompt, trie, batch, settings.beam_width, scorings)
            depth[at] = first.cpu()
        for scoring in scorings:
            under = dataclasses.replace(settings, scoring=scoring)
            with autocast_for(device):
                found = decoder.decode(
                    model,
                    batch.prompt_ids,
                    batch.prompt_mask,
                    trie,
                    under.beam_width,
                    scoring,
                    under.length_penalty,
                    prompt=prompt,
                )
            found = drop_items(found, excluded)
            ranks[scoring][at] = target_ranks(found.item_ids, canon).cpu()
            if full:
                target = (canon, s_y[scoring])
                exact[scoring][at] = exact_ranks(
                    model, prompt, trie, batch, found, target, under, excluded, exact_all
                )
        bar.update(len(at))
    bar.close()
    model.train(was_training)
    per_row = (*ranks.values(), *exact.values(), depth)
    if world > 1:
        shares = [None] * world
        dist.all_gather_object(shares, per_row)
        per_row = tuple(torch.cat(parts) for parts in zip(*shares, strict=True))
    k = len(scorings)
    ranks = dict(zip(scorings, per_row[:k], strict=True))
    exact = dict(zip(scorings, per_row[k : 2 * k], strict=True))
    rows = getattr(setup.data, split)[:n]
    near = near_copy_rows(rows, setup.data.titles)
    seen = Counter(i for e in setup.data.train for i in (e.target, *e.history))
    popularity = torch.tensor([seen[e.target] for e in rows], dtype=torch.long)
    return RowResults(ranks, exact, per_row[-1], near, popularity, full)


def _checkpoints(run: Path, cfg: TrainConfig, old: dict) -> list[Path]:
    """The checkpoints metrics.json reports: upstream, every epoch it lists (a resumed stop
    leaves others) or else every RUN/epoch_<e>.pt; ours, the selected one.
    Raises FileNotFoundError naming the first that is missing."""
    if cfg.protocol == "upstream":
        listed = [run / epoch_checkpoint(e["epoch"]) for e in old.get("epochs", [])]
        key = lambda p: float(p.stem[len("epoch_") :])  # noqa: E731
        checkpoints = listed or sorted(run.glob("epoch_*.pt"), key=key)
    else:
        checkpoints = [run / old.get("checkpoint", "best.pt")]
    missing = [str(c) for c in checkpoints if not c.is_file()] or ([] if checkpoints else [run])
    if missing:
        raise FileNotFoundError(f"{missing[0]}: no checkpoint; train the run to the end first")
    return checkpoints


def evaluate_run(run: str | Path, changes: dict | None = None, device: str = "auto") -> dict:
    """Recompute RUN/metrics.json from the run's saved config and checkpoints.

    ``changes``: settings that may differ from the run's for this evaluation (``TrainConfig``
    fields: ``limit_eval``, ``length_penalty``, ``exact_budget``, ``eval_batch_size``,
    ``decoder``, ``decoder_options``, ``progress``), validated as the config validates them.
    ``protocol`` may be given only as the run's own (files, split and selection are fixed by
    training: ValueError for the other, which needs a new run). Protocol ours tests the selected
    checkpoint (and re-validates it); upstream re-tests every RUN/epoch_<e>.pt and takes the
    per-metric maxima again.
    """
    run = Path(run)
    saved = load_run_config(run)
    changes = dict(changes or {})
    protocol = changes.pop("protocol", None)
    if protocol is not None and protocol != saved.protocol:
        raise ValueError(
            f"--protocol: got {protocol!r}, but {run} was trained under {saved.protocol!r}; its "
            f"files, split and selection are fixed by training: train again with --protocol "
            f"{protocol}"
        )
    cfg = dataclasses.replace(saved, **changes)  # checked as a new config: before any work
    remove_temp_files(run)  # of a write killed before: an evaluation, say
    settings = EvalSettings.from_config(cfg)
    metrics_file = run / "metrics.json"
    old = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    checkpoints = _checkpoints(run, cfg, old)
    dev = resolve_device(device)
    setup = build_setup(cfg, run, fresh=False, device=dev)
    model = setup.model.to(dev)

    def test(checkpoint: Path, split: str = "test") -> tuple[dict, dict]:
        state = read_checkpoint(checkpoint, fix="train the run to the end first")
        load_weights(model, state["model"], source=str(checkpoint))
        return state, evaluate_split(model, setup, split, settings, dev)

    seconds = old.get("seconds_per_epoch")
    if cfg.protocol == "upstream":
        epochs = [{"epoch": state["epoch"], "test": m} for state, m in map(test, checkpoints)]
        metrics = run_metrics("upstream", cfg.length_penalty, seconds, epochs=epochs)
    else:
        state, test_metrics = test(checkpoints[0])
        _, valid_metrics = test(checkpoints[0], "valid")
        epoch = old.get("best_epoch", state.get("epoch"))
        selection = Selection(epoch, checkpoints[0].name, valid_metrics, test_metrics)
        metrics = run_metrics("ours", cfg.length_penalty, seconds, selection)
    write_metrics(run, metrics)
    return metrics

"""Evaluation: a decoder's lists, exact ranks and teacher-forced margins -> metrics (SPEC §5).

``EvalSettings`` is built once from a run's configuration; ``evaluate_split`` computes one
split's metrics with it; ``python -m bear evaluate --run RUN`` (``evaluate_run``) rebuilds the
run's model from its saved config and checkpoints and recomputes ``RUN/metrics.json``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from bear.config import TrainConfig
from bear.decoding.best_first import exact_topk
from bear.decoding.count_above import count_items_above
from bear.decoding.decoder import Decoder
from bear.decoding.prompt_cache import PromptCache
from bear.decoding.registry import get_decoder
from bear.decoding.teacher_forcing import item_logits
from bear.items import IGNORE_INDEX, collate
from bear.losses.registry import get_loss
from bear.metrics import UNDECIDED, beam_metrics, ranking_metrics, target_ranks
from bear.model import autocast_for
from bear.protocol import epoch_checkpoint
from bear.report import Selection, run_metrics, write_metrics
from bear.run import Setup, build_setup, load_run_config, load_weights, resolve_device
from bear.run_folder import read_checkpoint
from bear_kernels import ce_margin

__all__ = ["EXACT_K", "EvalSettings", "evaluate_split", "evaluate_run"]

EXACT_K = 10  # exact top-K depth: PR@5 and PR@10 need the exact top-10 (SPEC §5)
SCORE_TOLERANCE = 1e-3  # beam scores vs teacher-forced sums: float noise well below this


@dataclass(frozen=True)
class EvalSettings:
    """How a split is evaluated (SPEC §11): built once from a run's configuration.

    Fields: ``decoder`` a registered decoder (``bear.decoding.registry``) and its
    ``decoder_options`` (KEY=VALUE), ``beam_width`` B the items it returns per user,
    ``scoring`` "before" / "after" (the loss's), ``length_penalty`` α, ``exact_budget`` the
    prefix tokens the exact rank's count may feed per row (None: exact), ``batch_size`` prompts
    per decoding batch, ``limit`` the first rows of a split (None: all), ``progress`` a bar.
    """

    beam_width: int = 10
    scoring: str = "before"
    length_penalty: float = 0.0
    decoder: str = "beam"
    decoder_options: tuple[str, ...] = ()
    exact_budget: int | None = None
    batch_size: int = 32
    limit: int | None = None
    progress: bool = False

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> EvalSettings:
        """The settings of a run: its width, its loss's scoring, its protocol's length penalty."""
        return cls(
            beam_width=cfg.beam_width,
            scoring=get_loss(cfg.loss).scoring,
            length_penalty=cfg.length_penalty,
            decoder=cfg.decoder,
            decoder_options=tuple(cfg.decoder_options),
            exact_budget=cfg.exact_budget,
            batch_size=cfg.eval_batch_size,
            limit=cfg.limit_eval,
            progress=cfg.progress,
        )

    def build_decoder(self) -> Decoder:
        """The decoder with its options (ValueError for an unknown decoder or option)."""
        return get_decoder(self.decoder).from_options(self.decoder_options)


def _full_scores(found, trie, length_penalty: float) -> torch.Tensor:
    """(U, B) the decoded items' scores at α = 0 (sums of log-probabilities): score · length^α,
    length = the item's tokens including EOS; -inf where padded."""
    scores = found.scores.float()  # (U, B)
    if length_penalty == 0:
        return scores
    tokens = trie.item_tokens(found.item_ids.clamp(min=0).reshape(-1))  # (U·B, L + 1)
    lengths = (tokens != IGNORE_INDEX).sum(1).reshape(scores.shape).to(scores.dtype)  # (U, B)
    return torch.where(torch.isfinite(scores), scores * lengths**length_penalty, scores)


def _target_terms(model, prompt, trie, batch, settings: EvalSettings):
    """Teacher-forced target terms of a batch: (violated (U,) bool, some counted token has Δ > 0
    at width B; s_y (U,) the target's score at α = 0 under the settings' scoring)."""
    with autocast_for(trie.device):
        logits, target, nodes = item_logits(model, prompt, trie, batch.items)  # (U, W, V)
    U, W, V = logits.shape
    mask = trie.allowed_mask(nodes.reshape(-1))  # (U·W, words)
    target = target.reshape(-1)  # (U·W,)
    flat = logits.reshape(U * W, V)
    B = settings.beam_width
    ce, margin, counted = ce_margin(flat, target, B, allowed_mask=mask, return_counted=True)
    violated = ((margin > 0) & counted).reshape(U, W).any(1)
    if settings.scoring == "after":  # full-vocabulary log-probabilities, restricted to the trie
        ce, _ = ce_margin(flat, target, beam_width=B)
    return violated, -ce.reshape(U, W).sum(1)


def _exact_ranks(model, prompt, trie, batch, found, target, settings: EvalSettings, exact_all):
    """(U,) the target's rank in the exact top-``EXACT_K`` by full score, -1 outside it,
    UNDECIDED where the budget left it open (``evaluate_split``'s docstring); ``target``:
    (canonical item ids (U,), teacher-forced scores s_y (U,))."""
    canon, s_y = target
    beats = _full_scores(found, trie, settings.length_penalty) > s_y[:, None] + SCORE_TOLERANCE
    above = (beats & (found.item_ids != canon[:, None])).sum(1)  # (U,)
    need = torch.ones_like(above, dtype=torch.bool) if exact_all else above < EXACT_K
    U = canon.shape[0]
    ranks = torch.full((U,), -1, dtype=torch.long)
    rows = need.nonzero().flatten()
    if not rows.numel():
        return ranks
    prompts = (batch.prompt_ids[rows], batch.prompt_mask[rows])
    if exact_all:  # the K best items in order, the target's rank among them
        with autocast_for(trie.device):
            exact = exact_topk(model, *prompts, trie, k=EXACT_K, scoring=settings.scoring)
        ranks[rows.cpu()] = target_ranks(exact.item_ids, canon[rows]).cpu()
        return ranks
    seen = torch.where(beats, found.item_ids, -1)[rows]  # (R, B) not counted again
    with autocast_for(trie.device):
        count, complete = count_items_above(
            model,
            *prompts,
            trie,
            s_y[rows] + SCORE_TOLERANCE,
            k=EXACT_K - above[rows],
            scoring=settings.scoring,
            exclude=torch.cat([canon[rows, None], seen], 1),
            max_expansions=settings.exact_budget,
            prompt=prompt.select(rows),
        )
    rank = above[rows] + count
    found_rank = torch.where(rank < EXACT_K, rank, -1)
    ranks[rows.cpu()] = torch.where(complete, found_rank, UNDECIDED).cpu()
    return ranks


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
    """Metrics of SPEC §5 on the first ``settings.limit`` rows of a split ("valid" or "test").

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
    "exact_undecided". ``full=False`` (per-epoch validation): the decoder only, giving NDCG@K
    and HR@K. ``settings.progress``: a bar of the decoded rows on stderr (rank 0 only).
    ``world > 1`` (collective: every rank calls it): rank r decodes the r-th of ``world``
    contiguous shares of the rows; the per-row ranks are gathered in row order, so every rank
    returns the metrics of one process.
    """
    device = torch.device(device or "cpu")
    decoder = settings.build_decoder()
    prompts, targets = setup.prompts[split], setup.targets[split]
    n = len(prompts) if settings.limit is None else min(settings.limit, len(prompts))
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
    what = "full" if full else settings.decoder
    show = settings.progress and rank == 0
    bar = tqdm(
        total=len(prompts), desc=f"{split} ({what})", unit="row", disable=not show, leave=False
    )
    for start in range(0, len(prompts), settings.batch_size):
        at = order[start : start + settings.batch_size]
        rows = ([prompts[i] for i in at], [targets[i] for i in at])
        batch = collate(*rows, setup.items, setup.trie, setup.pad_id).to(device)
        with autocast_for(device):  # a full test reads one prefill of the prompts throughout
            prompt = None
            if full:
                prompt = PromptCache.prefill(model, batch.prompt_ids, batch.prompt_mask)
            found = decoder.decode(
                model,
                batch.prompt_ids,
                batch.prompt_mask,
                trie,
                settings.beam_width,
                settings.scoring,
                settings.length_penalty,
                prompt=prompt,
            )
        canon = trie.canonical(batch.items)  # (U,)
        beam_ranks[at] = target_ranks(found.item_ids, canon).cpu()
        if full:
            bad, s_y = _target_terms(model, prompt, trie, batch, settings)
            violated[at] = bad.cpu()
            exact_ranks[at] = _exact_ranks(
                model, prompt, trie, batch, found, (canon, s_y), settings, exact_all
            )
        bar.update(len(at))
    bar.close()
    model.train(was_training)
    per_row = (beam_ranks, exact_ranks, violated)
    if world > 1:
        shares = [None] * world
        dist.all_gather_object(shares, per_row)
        per_row = tuple(torch.cat(parts) for parts in zip(*shares, strict=True))
    ranks, exact, violated_rows = per_row
    if not full:
        return beam_metrics(ranks)
    return ranking_metrics(ranks, exact, violated_rows)


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

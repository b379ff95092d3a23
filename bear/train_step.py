"""One optimiser step: its micro-batches and their gradient accumulation (public, SPEC §9, §11).

A step's global batch of examples is split across data-parallel ranks, then into micro-batches
(``micro_batches``); ``accumulate_gradients`` runs each micro-batch's ``Loss.prepare``, forward
and backward and divides its loss sum by the denominators of the *whole step*, so the gradient
equals one large batch whatever the accumulation and the number of processes. Under several
processes the model runs through DDP or FSDP2 (``bear.distributed``), which reduce the gradients
once per step, on the last micro-batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from bear.distributed import gradient_sync
from bear.items import Batch, collate
from bear.losses.base import UPSTREAM_EPS, Loss
from bear.run import Setup
from bear.trie import ItemTrie

__all__ = ["MicroBatch", "StepContext", "accumulate_gradients", "micro_batches"]


@dataclass
class StepContext:
    """Where a step runs: ``engine`` the model or its DDP / FSDP2 form
    (``bear.distributed.wrap_model``), ``trie`` the catalogue on ``device``, this process's
    ``rank`` among ``world``."""

    engine: torch.nn.Module
    trie: ItemTrie
    device: torch.device
    rank: int = 0
    world: int = 1


@dataclass
class MicroBatch:
    """One forward's examples: ``batch`` (``bear.items.Batch`` on the device), ``examples`` their
    indices in the training split, ``allowed_mask`` (U, W, ceil(V/32)) int32 the trie children
    of each positive prefix (None for a full-vocabulary loss), ``counted`` (U, W) bool the rows
    the loss counts (``Loss.counted_rows``, computed once here), ``weight`` 1, or 0 for a
    stand-in that tops up a short share (its forward and backward run and add nothing), ``step``
    the optimiser step it belongs to (0-based; what seeds a loss's per-step draws)."""

    batch: Batch
    examples: list[int]
    allowed_mask: torch.Tensor | None
    counted: torch.Tensor
    weight: float
    step: int = 0


def micro_batches(
    setup: Setup, idx: list[int], loss: Loss, ctx: StepContext, size: int, step: int = 0
) -> list[MicroBatch]:
    """The micro-batches of at most ``size`` examples of rank ``ctx.rank``'s share
    ``idx[rank::world]`` of the examples ``idx`` (indices into the training split) of optimiser
    step ``step``.

    Every rank gets as many micro-batches as the largest share needs (FSDP2's forwards are
    collective): a shorter share is topped up with stand-ins of weight 0, the step's first
    example. Under ``step`` normalisation the step's gradient does not depend on how its rows are
    split, so the share is sorted by length first and each micro-batch pads to rows of similar
    length (16 random Office rows carry 18 % padding in micro-batches of 4, sorted 5 %);
    ``micro-batch`` normalisation keeps the order.
    """
    prompts, targets = setup.prompts["train"], setup.targets["train"]
    share = list(idx[ctx.rank :: ctx.world])
    if loss.settings.normalisation == "step":
        share.sort(key=lambda i: len(prompts[i]) + len(setup.items[targets[i]]))
    parts = [(share[s : s + size], 1.0) for s in range(0, len(share), size)]
    needed = math.ceil(math.ceil(len(idx) / ctx.world) / size)
    out = []
    for part, weight in parts + [(idx[:1], 0.0)] * (needed - len(parts)):
        rows = ([prompts[i] for i in part], [targets[i] for i in part])
        batch = collate(*rows, setup.items, setup.trie, setup.pad_id).to(ctx.device)
        U, W = batch.target.shape
        mask = None
        if not loss.full_vocabulary:
            mask = ctx.trie.allowed_mask(batch.node_ids.reshape(-1)).reshape(U, W, -1)
        counted = loss.counted_rows(batch.target, mask, ctx.trie.vocab_size)  # (U, W)
        out.append(MicroBatch(batch, list(part), mask, counted, weight, step))
    return out


def _step_count(micro: list[MicroBatch], loss: Loss, world: int) -> torch.Tensor:
    """The step's normaliser over all ranks: its counted rows (``step``), or its micro-batches
    (``micro-batch``, as DDP averages upstream's per-GPU losses)."""
    per_micro = loss.settings.normalisation == "micro-batch"
    count = torch.zeros((), dtype=torch.float64)
    for m in micro:
        count += m.weight if per_micro else m.weight * loss.units(m)
    if world > 1:
        dist.all_reduce(count)
    return count


def accumulate_gradients(
    ctx: StepContext, micro: list[MicroBatch], loss: Loss, stats: dict | None = None
) -> float:
    """Forward/backward of one optimiser step's micro-batches; returns the step's loss.

    ``step`` normalisation: each micro-batch contributes weight · (sum of its row terms) /
    (counted rows of the whole step, all ranks), so the accumulated gradient is that of one batch
    holding the whole step. ``micro-batch`` (upstream's): each contributes weight · its own mean
    (sum / its own denominator) divided by the number of micro-batches of the step (all ranks).
    The engine reduces gradients across ranks on the last micro-batch only, as a mean, so the
    backward runs on ``world`` times the loss to make that mean the sum over ranks. ``stats``:
    a dict filled with the loss's ``RowTerms.stats`` of the step, each a mean per unit
    (``Loss.units``: counted row or example) over all its micro-batches and ranks.
    """
    per_micro = loss.settings.normalisation == "micro-batch"
    count = _step_count(micro, loss, ctx.world)
    step_loss = torch.zeros((), dtype=torch.float64)
    sums: dict[str, torch.Tensor] = {}
    for i, m in enumerate(micro):
        with torch.no_grad():
            prepared = loss.prepare(ctx, m)
        with gradient_sync(ctx.engine, enabled=i == len(micro) - 1):
            total, denominator = loss.micro_batch_loss(ctx, m, prepared)
            if per_micro:
                total = total / denominator.clamp(min=UPSTREAM_EPS)
            scaled = m.weight * total / count.clamp(min=1).to(total.dtype)
            (scaled * ctx.world).backward()
        step_loss += scaled.detach().double().cpu()
        for key, value in loss.stats.items():
            sums[key] = sums.get(key, 0.0) + m.weight * value.double().cpu()
    if ctx.world > 1:
        dist.all_reduce(step_loss)
    if stats is not None and sums:
        units = torch.tensor(float(sum(m.weight * loss.units(m) for m in micro)))
        values = torch.stack([sums[k] for k in sorted(sums)] + [units.double()])
        if ctx.world > 1:
            dist.all_reduce(values)
        means = (values[:-1] / values[-1].clamp(min=1)).tolist()
        stats.update(zip(sorted(sums), means, strict=True))
    return float(step_loss)

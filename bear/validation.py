"""Cheap model selection: a teacher-forced validation loss every ``--eval-every`` steps.

No decoding: one forward of the validation rows' responses gives the two cross-entropies every
loss can be compared on — ``ce``, the full-vocabulary cross-entropy per supervised token (sft's
loss, what "after" scoring decodes), and ``msl``, the cross-entropy over the trie children per
counted token (msl's, what "before" scoring decodes). ``loss`` is the one of the softmax the run's
loss trains (``Loss.full_vocabulary``): the curve ``--early-stopping`` watches. Optionally the
same check decodes the first rows of the validation split for HR@10 and NDCG@10 (a learning
curve of the metric itself).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from bear.distributed import decoding_model
from bear.evaluate import EvalSettings, evaluate_split
from bear.items import collate
from bear.model import autocast_for, response_logits
from bear.run import Setup
from bear.train_step import StepContext
from bear_kernels import ce_margin

__all__ = ["validation_check"]

CURVE_METRICS = ("hr@10", "ndcg@10")  # what a check's decoded slice reports


@torch.no_grad()
def _cross_entropies(model, setup: Setup, ctx: StepContext, rows: list[int], size: int):
    """(Σ full-vocabulary ce, supervised tokens, Σ trie ce, counted tokens) over ``rows`` of the
    validation split, float64 on the CPU."""
    sums = torch.zeros(4, dtype=torch.float64)
    prompts, targets = setup.prompts["valid"], setup.targets["valid"]
    for start in range(0, len(rows), size):
        part = rows[start : start + size]
        rows_in = ([prompts[i] for i in part], [targets[i] for i in part])
        batch = collate(*rows_in, setup.items, setup.trie, setup.pad_id).to(ctx.device)
        with autocast_for(ctx.device):
            logits = response_logits(model, batch)  # (U, W, V)
        U, W, V = logits.shape
        flat, target = logits.reshape(U * W, V), batch.target.reshape(-1)
        mask = ctx.trie.allowed_mask(batch.node_ids.reshape(-1))
        ce, _, supervised = ce_margin(flat, target, 1, return_counted=True)
        msl, _, counted = ce_margin(flat, target, 1, allowed_mask=mask, return_counted=True)
        parts = (ce.sum(), supervised.sum(), msl.sum(), counted.sum())
        sums += torch.stack([p.double().cpu() for p in parts])
    return sums


def validation_check(
    ctx: StepContext,
    setup: Setup,
    rows: int | None,
    size: int,
    full_vocabulary: bool,
    decode: EvalSettings | None = None,
) -> dict[str, float]:
    """The validation losses over the first ``rows`` validation rows (None: all), in micro-batches
    of ``size``, each rank its share: {"ce", "msl", "loss"} (module docstring); with ``decode``
    (an ``EvalSettings`` whose ``limit`` is the slice), HR@10 and NDCG@10 of its decoder too.
    Collective under several processes; the model keeps its training mode."""
    n = len(setup.targets["valid"]) if rows is None else min(rows, len(setup.targets["valid"]))
    share = list(range(n))[ctx.rank :: ctx.world]
    with decoding_model(ctx.engine) as model:
        was_training = model.training
        model.eval()
        sums = _cross_entropies(model, setup, ctx, share, size)
        model.train(was_training)
        if ctx.world > 1:
            dist.all_reduce(sums)
        ce, msl = float(sums[0] / sums[1].clamp(min=1)), float(sums[2] / sums[3].clamp(min=1))
        out = {"ce": ce, "msl": msl, "loss": ce if full_vocabulary else msl}
        if decode is not None:
            settings = dataclasses.replace(decode, progress=False)
            metrics = evaluate_split(
                model, setup, "valid", settings, ctx.device, False, rank=ctx.rank, world=ctx.world
            )
            out |= {k: metrics[k] for k in CURVE_METRICS}
    return out

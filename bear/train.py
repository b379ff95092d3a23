"""The training loop (``python -m bear train``): one readable file, nanoGPT style.

Per optimiser step: a global batch of ``batch_size`` examples (a seeded permutation per epoch) is
split across data-parallel ranks and then into micro-batches; each micro-batch's loss is the sum of
its row terms divided by the counted rows of the *whole step* (all-reduced across ranks), so the
gradient equals one large batch whatever the accumulation and the number of processes. Gradients are
all-reduced once per step (the ``no_sync`` + one all-reduce of DDP). Each epoch ends with a
validation by constrained beam search; the best epoch by validation NDCG@10 is kept and tested.
RUN/last.pt is written at each epoch end and every ``save_every`` steps, so a killed run resumes to
the weights of an uninterrupted one; a non-finite loss stops training before its update.
The run's config is ``bear.config.TrainConfig``; its setup and files, ``bear.run``; the folder
rules, ``bear.run_folder``.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from bear.config import TrainConfig
from bear.data import VALID_FRACTION
from bear.decoding import beam_thresholds
from bear.evaluate import evaluate_split
from bear.faults import fault_point
from bear.items import collate, right_align
from bear.losses import UPSTREAM_EPS, batch_loss, num_counted_rows, uses_trie_mask
from bear.model import autocast_for, response_logits, scoring_for, trainable_state
from bear.plots import plot_run
from bear.protocol import PROTOCOLS, epoch_checkpoint, resolved_settings, upstream_metrics
from bear.run import (
    Setup,
    build_setup,
    load_weights,
    resolve_device,
    rng_state,
    save_atomic,
    set_rng_state,
    write_json_atomic,
)
from bear.run_folder import LAST_KEYS, check_run_folder, prepare_run, read_checkpoint

__all__ = ["train", "accumulate_gradients"]

SELECT_METRIC = "ndcg@10"  # SPEC §3: model selection by validation NDCG@10


def _schedule(total: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


class _Log:
    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def __call__(self, **rec) -> None:
        if self.enabled:
            with self.path.open("a") as fh:
                fh.write(json.dumps({**rec, "time": round(time.time(), 3)}, default=str) + "\n")


def _micro_batches(setup: Setup, idx, cfg: TrainConfig, trie_dev, device):
    """Collated micro-batches of one rank's share of a step, with allowed masks."""
    out = []
    prompts, targets = setup.prompts["train"], setup.targets["train"]
    for s in range(0, len(idx), cfg.micro_batch_size):
        part = idx[s : s + cfg.micro_batch_size]
        batch = collate([prompts[i] for i in part], [targets[i] for i in part], setup.items,
                        setup.trie, setup.pad_id).to(device)  # fmt: skip
        U, W = batch.target.shape
        mask = trie_dev.allowed_mask(batch.node_ids.reshape(-1)).reshape(U, W, -1)
        out.append((batch, mask))
    return out


def accumulate_gradients(model, micro, settings, trie_dev, device, distributed=False) -> float:
    """Forward/backward of one optimiser step's micro-batches; returns the step's loss.

    ``step`` normalisation: each micro-batch contributes (sum of its row losses) / (counted rows
    of the whole step, all ranks), so the accumulated gradient is that of one batch holding the
    whole step. ``micro-batch`` (upstream's): each contributes its own mean loss divided by the
    number of micro-batches of the step (all ranks), as DDP averages upstream's per-GPU losses.
    Gradients are summed across ranks once at the end (DDP's no_sync + a single all-reduce).
    """
    vocab = trie_dev.vocab_size
    per_micro = settings.normalisation == "micro-batch"
    count = torch.zeros((), dtype=torch.float64)
    for batch, mask in micro:
        if per_micro:
            count += 1
        else:
            count += num_counted_rows(
                batch.target, mask if uses_trie_mask(settings.name) else None, vocab
            )
    if distributed:
        dist.all_reduce(count)
    step_loss = torch.zeros((), dtype=torch.float64)
    for batch, mask in micro:
        thresholds = None
        if settings.name == "beam-sim":
            model.eval()
            with autocast_for(device):
                theta = beam_thresholds(model, batch.prompt_ids, batch.prompt_mask, trie_dev,
                                        settings.beam_width, scoring="before")  # fmt: skip
            model.train()
            thresholds = right_align(theta.float(), batch.response_len.to(theta.device),
                                     batch.width, float("-inf"))  # fmt: skip
        with autocast_for(device):
            logits = response_logits(model, batch)  # (U, W, V)
        total_loss, denominator = batch_loss(logits, batch.target, settings, mask, thresholds)
        if per_micro:
            total_loss = total_loss / denominator.clamp(min=UPSTREAM_EPS)
        loss = total_loss / count.clamp(min=1).to(total_loss.dtype)
        loss.backward()
        step_loss += loss.detach().double().cpu()
    if distributed:
        for p in model.parameters():
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
        dist.all_reduce(step_loss)
    return float(step_loss)


def _check_valid_rows(cfg: TrainConfig, setup: Setup) -> None:
    if cfg.validate and PROTOCOLS[cfg.protocol].validation and not setup.targets["valid"]:
        raise ValueError(
            f"{Path(cfg.data) / cfg.train_file}: {len(setup.targets['train'])} training row(s) "
            f"leave no validation rows (the last {VALID_FRACTION:.0%} by timestamp, or "
            "valid.csv); add rows or a valid.csv, or pass --no-eval"
        )


def _read_resume_point(cfg: TrainConfig, run: Path, model) -> dict | None:
    """RUN/last.pt for ``--resume``, its weights loaded into ``model``; None without --resume or
    when the run was killed before its first checkpoint (it then restarts from step 0)."""
    last = run / "last.pt"
    if not cfg.resume or not last.is_file():
        return None
    fix = "delete it and --resume restarts the run from its first step"
    ckpt = read_checkpoint(last, LAST_KEYS, fix)
    load_weights(model, ckpt["model"], source=str(last))
    return ckpt


def _non_finite_loss(step: int, loss: float, run: Path, saved_step: int | None):
    kept = "no checkpoint was written yet"
    if saved_step is not None:
        kept = f"{run / 'last.pt'} keeps the last good state (step {saved_step})"
    return FloatingPointError(
        f"step {step}: the training loss is {loss}; training stopped before applying it and "
        f"{kept}; lower --lr or check the data"
    )


def train(cfg: TrainConfig) -> dict:
    """Train, validate each epoch, test the best epoch; return RUN/metrics.json's content.

    Every input is checked before the run folder is touched (ValueError / OSError naming the
    setting or file). Raises FloatingPointError at a non-finite loss (the last checkpoint stays).
    """
    world = int(os.environ.get("WORLD_SIZE", 1))
    distributed = world > 1
    device = resolve_device(cfg.device)
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if distributed else 0
    run = Path(cfg.out)
    # Everything that can fail on the input runs before the run folder is touched.
    check_run_folder(cfg, run)
    setup = build_setup(cfg, run, fresh=not cfg.resume)
    _check_valid_rows(cfg, setup)
    resume_from = _read_resume_point(cfg, run, setup.model)
    if distributed:
        dist.barrier()  # every rank checked the folder before rank 0 changes it
    prepare_run(cfg, run, rank)
    if distributed:
        dist.barrier()
    log = _Log(run / "log.jsonl", rank == 0)
    if rank == 0:
        if cfg.model == "tiny" and not cfg.resume:
            setup.tokenizer.save_pretrained(run / "tokenizer")
        config = asdict(cfg) | {"protocol_settings": resolved_settings(cfg)}
        write_json_atomic(run / "config.json", config)  # last: the run's start is complete
    log(event="config", world_size=world, resolved_device=str(device), **asdict(cfg))
    if rank == 0:
        print(json.dumps({"config": asdict(cfg), "world_size": world}, default=str), flush=True)

    model = setup.model.to(device)
    model.train()
    trie_dev = setup.trie.to(device)
    settings = cfg.loss_settings()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_train = len(setup.targets["train"])
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _schedule(total, max(1, math.ceil(cfg.warmup_ratio * total)))
    )
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "history": [], "best": None,
             "epoch_seconds": []}  # fmt: skip
    if resume_from is not None:
        optimizer.load_state_dict(resume_from["optimizer"])
        scheduler.load_state_dict(resume_from["scheduler"])
        set_rng_state(resume_from["rng"])
        state = resume_from["state"]
    else:
        torch.manual_seed(cfg.seed)
    if cfg.resume:
        log(event="resume", step=state["global_step"], from_checkpoint=resume_from is not None)
        if rank == 0:
            (run / "partial.pt").unlink(missing_ok=True)
    saved_step = state["global_step"] if resume_from is not None else None

    def save_last():
        nonlocal saved_step
        if rank == 0:
            save_atomic(run / "last.pt", {"model": trainable_state(model),
                                          "optimizer": optimizer.state_dict(),
                                          "scheduler": scheduler.state_dict(),
                                          "rng": rng_state(), "state": state})  # fmt: skip
        saved_step = state["global_step"]

    scoring = scoring_for(cfg.loss)
    stopped = False
    while state["epoch"] < cfg.epochs and not stopped:
        epoch = state["epoch"]
        order = torch.randperm(
            n_train, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        )
        desc = f"{cfg.loss} epoch {epoch + 1}"
        bar = tqdm(range(state["step_in_epoch"], steps_per_epoch), desc=desc,
                   disable=not cfg.progress or rank != 0, leave=False)  # fmt: skip
        t0 = time.perf_counter()
        for s in bar:
            idx = order[s * cfg.batch_size : (s + 1) * cfg.batch_size].tolist()
            micro = _micro_batches(setup, idx[rank::world], cfg, trie_dev, device)
            step_loss = accumulate_gradients(model, micro, settings, trie_dev, device, distributed)
            fault_point(f"backward:{state['global_step'] + 1}")
            if not math.isfinite(step_loss):
                raise _non_finite_loss(state["global_step"] + 1, step_loss, run, saved_step)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["global_step"] += 1
            state["step_in_epoch"] = s + 1
            log(event="step", step=state["global_step"], epoch=epoch + (s + 1) / steps_per_epoch,
                loss=float(step_loss), lr=scheduler.get_last_lr()[0])  # fmt: skip
            bar.set_postfix(loss=f"{float(step_loss):.4f}")
            fault_point(f"step:{state['global_step']}")
            if state["global_step"] % cfg.save_every == 0 and s + 1 < steps_per_epoch:
                save_last()  # mid-epoch; the epoch's end saves after validation
            if cfg.max_steps is not None and state["global_step"] >= cfg.max_steps:
                stopped = state["step_in_epoch"] < steps_per_epoch
                break
        bar.close()
        if stopped:
            save_last()  # a mid-epoch position: --resume continues from here
            break
        state["epoch_seconds"].append(time.perf_counter() - t0)
        state["epoch"], state["step_in_epoch"] = epoch + 1, 0
        if cfg.protocol == "upstream":
            _test_epoch(model, setup, cfg, scoring, device, rank, distributed, state, epoch + 1)
            save_last()
            if cfg.max_steps is not None and state["global_step"] >= cfg.max_steps:
                break
            continue
        valid = (
            _validate(model, setup, cfg, scoring, device, rank, distributed) if cfg.validate else {}
        )
        state["history"].append({"epoch": epoch + 1, **valid})
        log(event="valid", epoch=epoch + 1, **valid)
        if (
            not cfg.validate
            or state["best"] is None
            or valid[SELECT_METRIC] > state["best"]["valid"][SELECT_METRIC]
        ):
            state["best"] = {"epoch": epoch + 1, "valid": valid}
            if rank == 0:
                save_atomic(run / "best.pt", {"model": trainable_state(model), "epoch": epoch + 1})
        save_last()
        if cfg.max_steps is not None and state["global_step"] >= cfg.max_steps:
            break
    result = _finish(model, setup, cfg, state, scoring, device, rank, distributed, steps_per_epoch,
                     stopped)  # fmt: skip
    if distributed:
        dist.barrier()
    return result


def _validate(model, setup, cfg, scoring, device, rank, distributed, split="valid", full=False):
    """Metrics of a split computed on rank 0 and shared with the other ranks (``full``: with
    exact top-K, PR@K and violation share; per-epoch validation runs the beam search only)."""
    box = [None]
    if rank == 0:
        box[0] = evaluate_split(model, setup, split, cfg.beam_width, scoring, cfg.limit_eval,
                                cfg.eval_batch_size, device, full=full,
                                length_penalty=cfg.length_penalty)  # fmt: skip
    if distributed:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _test_epoch(model, setup, cfg, scoring, device, rank, distributed, state, epoch) -> None:
    """Upstream's protocol after an epoch (or a partial one): the test metrics (unless --no-eval)
    into the history, and the weights as RUN/epoch_<epoch>.pt (upstream saves every epoch)."""
    test = _validate(model, setup, cfg, scoring, device, rank, distributed, split="test",
                     full=True) if cfg.validate else {}  # fmt: skip
    state["history"].append({"epoch": epoch, "test": test})
    _Log(Path(cfg.out) / "log.jsonl", rank == 0)(event="test", epoch=epoch, **test)
    if rank == 0:
        save_atomic(Path(cfg.out) / epoch_checkpoint(epoch),
                    {"model": trainable_state(model), "epoch": epoch})  # fmt: skip


def _finish(model, setup, cfg, state, scoring, device, rank, distributed, steps_per_epoch,
            stopped) -> dict:  # fmt: skip
    """Choose the checkpoint (best validation epoch; a stop mid-epoch competes as a partial epoch),
    test it and write RUN/metrics.json and RUN/curves.png. Under the upstream protocol: test a
    stop mid-epoch as a partial epoch and report every epoch's test metrics and their maxima."""
    run = Path(cfg.out)
    best, checkpoint = state["best"], "best.pt"
    seconds = state["epoch_seconds"]
    per_epoch = sum(seconds) / len(seconds) if seconds else None
    if cfg.protocol == "upstream":
        if stopped:
            epoch = state["epoch"] + state["step_in_epoch"] / steps_per_epoch
            _test_epoch(model, setup, cfg, scoring, device, rank, distributed, state, epoch)
        metrics = upstream_metrics(state["history"], cfg.length_penalty) | {
            "seconds_per_epoch": per_epoch
        }
        if rank == 0:
            write_json_atomic(run / "metrics.json", metrics)
        return metrics
    if not cfg.validate:
        metrics = {"protocol": "ours", "valid": {}, "test": {}, "best_epoch": state["epoch"],
                   "seconds_per_epoch": per_epoch, "checkpoint": "last.pt"}  # fmt: skip
        if rank == 0:
            write_json_atomic(run / "metrics.json", metrics)
        return metrics
    if stopped:
        valid = _validate(model, setup, cfg, scoring, device, rank, distributed)
        epoch = state["epoch"] + state["step_in_epoch"] / steps_per_epoch
        Log = _Log(run / "log.jsonl", rank == 0)
        Log(event="valid", epoch=epoch, partial=True, **valid)
        if best is None or valid[SELECT_METRIC] > best["valid"][SELECT_METRIC]:
            best, checkpoint = {"epoch": epoch, "valid": valid}, "partial.pt"
            if rank == 0:
                save_atomic(run / checkpoint, {"model": trainable_state(model), "epoch": epoch})
    if distributed:
        dist.barrier()
    weights = read_checkpoint(run / checkpoint)["model"]
    final = trainable_state(model)
    load_weights(model, weights, source=str(run / checkpoint))
    args = (model, setup, cfg, scoring, device, rank, distributed)
    valid = _validate(*args, split="valid", full=True)
    test = _validate(*args, split="test", full=True)
    metrics = {
        "protocol": "ours",
        "length_penalty": cfg.length_penalty,
        "valid": valid,
        "test": test,
        "best_epoch": best["epoch"],
        "seconds_per_epoch": per_epoch,
        "checkpoint": checkpoint,
    }
    if rank == 0:
        _Log(run / "log.jsonl", True)(event="test", epoch=best["epoch"], **test)
        write_json_atomic(run / "metrics.json", metrics)
        plot_run(run)
    load_weights(model, final)  # callers (tests) see the last weights, as trained
    return metrics

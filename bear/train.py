"""The training loop (``python -m bear train``): one readable file, nanoGPT style.

Per optimiser step: a global batch of ``batch_size`` examples (a seeded permutation per epoch) is
split across data-parallel ranks and then into micro-batches; each micro-batch's loss is the sum of
its row terms divided by the counted rows of the *whole step* (all-reduced across ranks), so the
gradient equals one large batch whatever the accumulation and the number of processes. Under
several processes the model runs through DDP or FSDP2 (``bear.distributed``), which reduce the
gradients once per step, on the last micro-batch. Each epoch ends with a validation by constrained
beam search, sharded across ranks; the best epoch by validation NDCG@10 is kept, tested and saved in
Hugging Face format in RUN/model/. Steps and metrics go to RUN/log.jsonl and TensorBoard events.
RUN/last.pt is written at each epoch end and every ``save_every`` steps, so a killed run resumes to
the weights of an uninterrupted one; a non-finite loss stops training before its update.
The run's config is ``bear.config.TrainConfig``; its setup and files, ``bear.run``; the folder
rules, ``bear.run_folder``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from bear.config import TrainConfig
from bear.data import VALID_FRACTION
from bear.decoding import beam_thresholds
from bear.distributed import (
    check_launcher_environment,
    decoding_model,
    gradient_sync,
    init_distributed,
    load_optimizer_state,
    optimizer_state,
    wrap_model,
)
from bear.evaluate import evaluate_split
from bear.faults import fault_point
from bear.items import collate, right_align
from bear.losses import UPSTREAM_EPS, batch_loss, num_counted_rows, uses_trie_mask
from bear.model import (
    DTYPES,
    autocast_for,
    response_logits,
    save_run_model,
    scoring_for,
    trainable_state,
)
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
from bear.tensorboard import ScalarEventWriter

__all__ = ["train", "accumulate_gradients"]

SELECT_METRIC = "ndcg@10"  # SPEC §3: model selection by validation NDCG@10


def _schedule(total: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


class _Log:
    """RUN/log.jsonl records; those with a ``step`` also go to TensorBoard as ``event/key``."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        self.board = ScalarEventWriter(path.parent) if enabled else None

    def __call__(self, **rec) -> None:
        if self.enabled:
            with self.path.open("a") as fh:
                fh.write(json.dumps({**rec, "time": round(time.time(), 3)}, default=str) + "\n")
            if "step" in rec:
                prefix = "train" if rec["event"] == "step" else rec["event"]
                numbers = {k: v for k, v in rec.items()
                           if isinstance(v, int | float) and not isinstance(v, bool)}  # fmt: skip
                scalars = {f"{prefix}/{k}": float(v) for k, v in numbers.items()
                           if k not in ("step", "partial")}  # fmt: skip
                self.board.add_scalars(rec["step"], scalars)


def _micro_batches(setup: Setup, idx, cfg: TrainConfig, trie_dev, device, rank=0, world=1):
    """(batch, allowed mask, weight) micro-batches of rank ``rank``'s share ``idx[rank::world]``.

    Every rank gets as many micro-batches as the largest share needs (FSDP2's forwards are
    collective): a shorter share is topped up with stand-ins of weight 0, the step's first example,
    whose forward and backward run and add nothing. Under ``step`` normalisation the step's
    gradient does not depend on how its rows are split, so the share is sorted by length first
    and each micro-batch pads to rows of similar length (16 random Office rows carry 18 %
    padding in micro-batches of 4, sorted 5 %); ``micro-batch`` normalisation keeps the order.
    """
    out = []
    prompts, targets = setup.prompts["train"], setup.targets["train"]
    share, size = list(idx[rank::world]), cfg.micro_batch_size
    if cfg.normalisation == "step":
        share.sort(key=lambda i: len(prompts[i]) + len(setup.items[targets[i]]))
    parts = [(share[s : s + size], 1.0) for s in range(0, len(share), size)]
    needed = math.ceil(math.ceil(len(idx) / world) / size)
    for part, weight in parts + [(idx[:1], 0.0)] * (needed - len(parts)):
        batch = collate([prompts[i] for i in part], [targets[i] for i in part], setup.items,
                        setup.trie, setup.pad_id).to(device)  # fmt: skip
        U, W = batch.target.shape
        mask = trie_dev.allowed_mask(batch.node_ids.reshape(-1)).reshape(U, W, -1)
        out.append((batch, mask, weight))
    return out


def accumulate_gradients(engine, micro, settings, trie_dev, device, world=1) -> float:
    """Forward/backward of one optimiser step's micro-batches; returns the step's loss.

    ``step`` normalisation: each micro-batch contributes weight · (sum of its row losses) /
    (counted rows of the whole step, all ranks), so the accumulated gradient is that of one batch
    holding the whole step. ``micro-batch`` (upstream's): each contributes weight · its own mean
    loss divided by the number of micro-batches of the step (all ranks), as DDP averages
    upstream's per-GPU losses. ``engine`` is the model or its DDP / FSDP2 form
    (``bear.distributed.wrap_model``); it reduces gradients across ranks on the last micro-batch
    only, as a mean, so the backward runs on ``world`` times the loss to make that mean the sum
    over ranks.
    """
    vocab = trie_dev.vocab_size
    per_micro = settings.normalisation == "micro-batch"
    count = torch.zeros((), dtype=torch.float64)
    for batch, mask, weight in micro:
        if per_micro:
            count += weight
        else:
            count += weight * num_counted_rows(
                batch.target, mask if uses_trie_mask(settings.name) else None, vocab
            )
    if world > 1:
        dist.all_reduce(count)
    step_loss = torch.zeros((), dtype=torch.float64)
    for i, (batch, mask, weight) in enumerate(micro):
        thresholds = None
        if settings.name == "beam-sim":
            with decoding_model(engine) as model, autocast_for(device):
                model.eval()
                theta = beam_thresholds(model, batch.prompt_ids, batch.prompt_mask, trie_dev,
                                        settings.beam_width, scoring="before")  # fmt: skip
                model.train()
            thresholds = right_align(theta.float(), batch.response_len.to(theta.device),
                                     batch.width, float("-inf"))  # fmt: skip
        with gradient_sync(engine, enabled=i == len(micro) - 1):
            with autocast_for(device):
                logits = response_logits(engine, batch)  # (U, W, V)
            total_loss, denominator = batch_loss(logits, batch.target, settings, mask, thresholds)
            if per_micro:
                total_loss = total_loss / denominator.clamp(min=UPSTREAM_EPS)
            loss = weight * total_loss / count.clamp(min=1).to(total_loss.dtype)
            (loss * world).backward()
        step_loss += loss.detach().double().cpu()
    if world > 1:
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
    check_launcher_environment(cfg)
    device = resolve_device(cfg.device)
    rank, world = init_distributed(device)
    distributed = world > 1
    run = Path(cfg.out)
    # Everything that can fail on the input runs before the run folder is touched.
    check_run_folder(cfg, run)
    setup = build_setup(cfg, run, fresh=not cfg.resume, device=device)
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
    base_dtype = next(setup.model.parameters()).dtype  # what --dtype auto chose
    log(event="config", world_size=world, resolved_device=str(device),
        resolved_dtype=next(name for name, d in DTYPES.items() if d == base_dtype),
        **asdict(cfg))  # fmt: skip
    if rank == 0:
        print(json.dumps({"config": asdict(cfg), "world_size": world}, default=str), flush=True)

    model = setup.model.to(device)
    model.train()
    engine = wrap_model(model, cfg, device, world)  # FSDP2 shards `model` in place
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
        load_optimizer_state(optimizer, resume_from["optimizer"])
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
        weights, optim = trainable_state(model), optimizer_state(optimizer)  # collective (FSDP2)
        if rank == 0:
            save_atomic(run / "last.pt", {"model": weights, "optimizer": optim,
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
            micro = _micro_batches(setup, idx, cfg, trie_dev, device, rank, world)
            step_loss = accumulate_gradients(engine, micro, settings, trie_dev, device, world)
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
            _test_epoch(engine, model, setup, cfg, scoring, device, rank, world, state, epoch + 1,
                        log)  # fmt: skip
            save_last()
            if cfg.max_steps is not None and state["global_step"] >= cfg.max_steps:
                break
            continue
        valid = _validate(engine, setup, cfg, scoring, device, rank, world) if cfg.validate else {}
        state["history"].append({"epoch": epoch + 1, **valid})
        log(event="valid", epoch=epoch + 1, step=state["global_step"], **valid)
        if (
            not cfg.validate
            or state["best"] is None
            or valid[SELECT_METRIC] > state["best"]["valid"][SELECT_METRIC]
        ):
            state["best"] = {"epoch": epoch + 1, "valid": valid}
            weights = trainable_state(model)  # collective under FSDP2
            if rank == 0:
                save_atomic(run / "best.pt", {"model": weights, "epoch": epoch + 1})
        save_last()
        if cfg.max_steps is not None and state["global_step"] >= cfg.max_steps:
            break
    result = _finish(engine, model, setup, cfg, state, scoring, device, rank, world,
                     steps_per_epoch, stopped, log)  # fmt: skip
    if distributed:
        dist.barrier()
    return result


def _validate(engine, setup, cfg, scoring, device, rank, world, split="valid", full=False):
    """Metrics of a split, each rank decoding its share of the rows (``full``: with exact top-K,
    PR@K and violation share; per-epoch validation runs the beam search only)."""
    with decoding_model(engine) as model:
        return evaluate_split(model, setup, split, cfg.beam_width, scoring, cfg.limit_eval,
                              cfg.eval_batch_size, device, full=full,
                              length_penalty=cfg.length_penalty, rank=rank, world=world,
                              exact_budget=cfg.exact_budget, progress=cfg.progress)  # fmt: skip


def _test_epoch(engine, model, setup, cfg, scoring, device, rank, world, state, epoch,
                log) -> None:  # fmt: skip
    """Upstream's protocol after an epoch (or a partial one): the test metrics (unless --no-eval)
    into the history, and the weights as RUN/epoch_<epoch>.pt (upstream saves every epoch)."""
    test = _validate(engine, setup, cfg, scoring, device, rank, world, split="test",
                     full=True) if cfg.validate else {}  # fmt: skip
    state["history"].append({"epoch": epoch, "test": test})
    log(event="test", epoch=epoch, step=state["global_step"], **test)
    weights = trainable_state(model)  # collective under FSDP2
    if rank == 0:
        save_atomic(Path(cfg.out) / epoch_checkpoint(epoch), {"model": weights, "epoch": epoch})


def _finish(engine, model, setup, cfg, state, scoring, device, rank, world, steps_per_epoch,
            stopped, log) -> dict:  # fmt: skip
    """Choose the checkpoint (best validation epoch; a stop mid-epoch competes as a partial epoch),
    test it and write RUN/metrics.json, RUN/curves.png and RUN/model/ (Hugging Face format).
    Under the upstream protocol: test a stop mid-epoch as a partial epoch, report every epoch's
    test metrics and their maxima, and write the last weights to RUN/model/ (no selection)."""
    run = Path(cfg.out)
    distributed = world > 1
    best, checkpoint = state["best"], "best.pt"
    seconds = state["epoch_seconds"]
    per_epoch = sum(seconds) / len(seconds) if seconds else None
    if cfg.protocol == "upstream":
        if stopped:
            epoch = state["epoch"] + state["step_in_epoch"] / steps_per_epoch
            _test_epoch(engine, model, setup, cfg, scoring, device, rank, world, state, epoch, log)
        metrics = upstream_metrics(state["history"], cfg.length_penalty) | {
            "seconds_per_epoch": per_epoch
        }
        weights = trainable_state(model)  # collective under FSDP2
        if rank == 0:
            write_json_atomic(run / "metrics.json", metrics)
            save_run_model(model, setup.tokenizer, run / "model", weights)
        return metrics
    if not cfg.validate:
        metrics = {"protocol": "ours", "valid": {}, "test": {}, "best_epoch": state["epoch"],
                   "seconds_per_epoch": per_epoch, "checkpoint": "last.pt"}  # fmt: skip
        weights = trainable_state(model)  # collective under FSDP2
        if rank == 0:
            write_json_atomic(run / "metrics.json", metrics)
            save_run_model(model, setup.tokenizer, run / "model", weights)
        return metrics
    if stopped:
        valid = _validate(engine, setup, cfg, scoring, device, rank, world)
        epoch = state["epoch"] + state["step_in_epoch"] / steps_per_epoch
        log(event="valid", epoch=epoch, step=state["global_step"], partial=True, **valid)
        if best is None or valid[SELECT_METRIC] > best["valid"][SELECT_METRIC]:
            best, checkpoint = {"epoch": epoch, "valid": valid}, "partial.pt"
            weights = trainable_state(model)  # collective under FSDP2
            if rank == 0:
                save_atomic(run / checkpoint, {"model": weights, "epoch": epoch})
    if distributed:
        dist.barrier()
    weights = read_checkpoint(run / checkpoint)["model"]
    final = trainable_state(model)
    load_weights(model, weights, source=str(run / checkpoint))
    args = (engine, setup, cfg, scoring, device, rank, world)
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
    log(event="test", epoch=best["epoch"], step=state["global_step"], **test)
    if rank == 0:
        write_json_atomic(run / "metrics.json", metrics)
        save_run_model(model, setup.tokenizer, run / "model", weights)
        plot_run(run)
    load_weights(model, final)  # callers (tests) see the last weights, as trained
    return metrics

"""The training loop (``python -m bear train``): one readable file, nanoGPT style.

Per optimiser step, a global batch of ``batch_size`` examples (a seeded permutation per epoch)
goes through ``bear.train_step`` (micro-batches across ranks, gradient accumulation exact for
every loss). Each epoch ends with a validation by the configured decoder, sharded across ranks;
the best epoch by validation NDCG@10 is kept, tested and saved in Hugging Face format in
RUN/model/. Steps and metrics go to RUN/log.jsonl and TensorBoard events (``bear.run_log``).
RUN/last.pt is written at each epoch end and every ``save_every`` steps, so a killed run resumes
to the weights of an uninterrupted one; a non-finite loss stops training before its update.
The run's config is ``bear.config.TrainConfig``; its setup and files, ``bear.run``; the folder
rules, ``bear.run_folder``; metrics.json, ``bear.report``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from bear.config import TrainConfig
from bear.data import VALID_FRACTION
from bear.distributed import (
    check_launcher_environment,
    decoding_model,
    init_distributed,
    load_optimizer_state,
    optimizer_state,
    wrap_model,
)
from bear.evaluate import EvalSettings, evaluate_split
from bear.faults import fault_point
from bear.losses import Loss, build_loss
from bear.metrics import SELECT_METRIC
from bear.model import DTYPES, save_run_model, trainable_state
from bear.plots import plot_run
from bear.policies import load_init
from bear.protocol import PROTOCOLS, epoch_checkpoint, resolved_settings
from bear.report import Selection, run_metrics, write_metrics
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
from bear.run_folder import (
    LAST_KEYS,
    RunLock,
    check_run_folder,
    data_fingerprint,
    prepare_run,
    read_checkpoint,
)
from bear.run_log import RunLog
from bear.stopping import Stopped, requested, stop_signals
from bear.train_step import StepContext, accumulate_gradients, micro_batches
from bear.validation import validation_check

__all__ = ["RunContext", "train"]


@dataclass
class RunContext:
    """What every part of a run reads: its config and folder, setup, model, the step's context
    (engine, trie and device, rank among world), its loss, evaluation settings and log."""

    cfg: TrainConfig
    run: Path
    setup: Setup
    model: torch.nn.Module
    step: StepContext
    loss: Loss
    evaluation: EvalSettings
    log: RunLog
    lock: RunLock | None  # the run folder's (rank 0)

    @property
    def rank(self) -> int:
        return self.step.rank

    def evaluate(self, split: str, full: bool = False) -> dict:
        """A split's metrics, each rank decoding its share (``full``: with the exact top-K, PR@K
        and the violation share, under both scorings if asked; per-epoch validation decodes
        under the run's scoring only)."""
        settings, s = self.evaluation, self.step
        if not full:
            settings = dataclasses.replace(settings, both_scorings=False)
        with decoding_model(s.engine) as model:
            return evaluate_split(
                model, self.setup, split, settings, s.device, full, rank=s.rank, world=s.world
            )

    def save(self, name: str, payload: dict | None = None) -> dict[str, torch.Tensor]:
        """Write RUN/<name> ({"model": the trainable weights, **payload}) on rank 0; every rank
        calls it (gathering FSDP2 shards is collective). Returns the weights."""
        weights = trainable_state(self.model)
        if self.rank == 0:
            save_atomic(self.run / name, {"model": weights, **(payload or {})})
        return weights

    def barrier(self) -> None:
        if self.step.world > 1:
            dist.barrier()


@dataclass
class Optimisation:
    """The optimiser, its schedule and the run's progress (``state``, saved in RUN/last.pt:
    epoch, step_in_epoch, global_step, history, best, epoch_seconds); ``saved_step`` the step of
    the last good RUN/last.pt (None before the first)."""

    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    steps_per_epoch: int
    state: dict
    saved_step: int | None = None


def _schedule(total: int, warmup: int):
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at step ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def _check_valid_rows(cfg: TrainConfig, setup: Setup) -> None:
    if cfg.eval_every and not setup.targets["valid"]:
        raise ValueError(
            f"--eval-every: the run has no validation rows (protocol {cfg.protocol!r}, "
            f"{Path(cfg.data) / cfg.train_file}); use --protocol ours, which holds them out"
        )
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


def _start(cfg: TrainConfig) -> tuple[RunContext, dict | None]:
    """Check everything, then prepare the run folder (config.json last) and the model: the run's
    context and its resume point. Nothing in the folder is touched before every check passed."""
    check_launcher_environment(cfg)
    device = resolve_device(cfg.device)
    rank, world = init_distributed(device)
    run = Path(cfg.out)
    check_run_folder(cfg, run)
    setup = build_setup(cfg, run, fresh=not cfg.resume, device=device)
    _check_valid_rows(cfg, setup)
    loss = build_loss(cfg.loss_settings())
    if cfg.init is not None:  # also on --resume: what the loss starts from (a reference copy)
        load_init(cfg, setup.model)
    loss.start(cfg, setup, device)
    evaluation = EvalSettings.from_config(cfg)
    resume_from = _read_resume_point(cfg, run, setup.model)
    if world > 1:
        dist.barrier()  # every rank checked the folder before rank 0 changes it
    lock = prepare_run(cfg, run, rank)
    if world > 1:
        dist.barrier()
    log = RunLog(run / "log.jsonl", rank == 0)
    if rank == 0:
        if cfg.model == "tiny" and not cfg.resume:
            setup.tokenizer.save_pretrained(run / "tokenizer")
        config = asdict(cfg) | {
            "protocol_settings": resolved_settings(cfg),
            "data_resolved": str(Path(cfg.data).resolve()),  # evaluate from any folder
            "data_fingerprint": data_fingerprint(cfg),  # --resume refuses changed data
        }
        write_json_atomic(run / "config.json", config)  # last: the run's start is complete
    base_dtype = next(setup.model.parameters()).dtype  # what --dtype auto chose
    dtype = next(name for name, d in DTYPES.items() if d == base_dtype)
    resolved = {"resolved_device": str(device), "resolved_dtype": dtype}
    log(event="config", world_size=world, **resolved, **asdict(cfg))
    if rank == 0:
        print(json.dumps({"config": asdict(cfg), "world_size": world}, default=str), flush=True)
    model = setup.model.to(device)
    model.train()
    engine = wrap_model(model, cfg, device, world)  # FSDP2 shards `model` in place
    step = StepContext(engine, setup.trie.to(device), device, rank, world)
    ctx = RunContext(cfg, run, setup, model, step, loss, evaluation, log, lock)
    return ctx, resume_from


def _optimisation(ctx: RunContext, resume_from: dict | None) -> Optimisation:
    """AdamW and its schedule, fresh or as RUN/last.pt left them (with the random states)."""
    cfg = ctx.cfg
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(ctx.setup.targets["train"]) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, math.ceil(cfg.warmup_ratio * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total, warmup))
    counters = {"epoch": 0, "step_in_epoch": 0, "global_step": 0}
    state = counters | {"history": [], "best": None, "epoch_seconds": []}
    opt = Optimisation(params, optimizer, scheduler, steps_per_epoch, state)
    if resume_from is not None:
        load_optimizer_state(optimizer, resume_from["optimizer"])
        scheduler.load_state_dict(resume_from["scheduler"])
        set_rng_state(resume_from["rng"])
        opt.state, opt.saved_step = resume_from["state"], resume_from["state"]["global_step"]
    else:
        torch.manual_seed(cfg.seed)
    if cfg.resume:
        step = opt.state["global_step"]
        ctx.log.forget_after(step)  # a killed run's records past its last checkpoint
        ctx.log(event="resume", step=step, from_checkpoint=resume_from is not None)
        if ctx.rank == 0:
            (ctx.run / "partial.pt").unlink(missing_ok=True)
    return opt


def _save_last(ctx: RunContext, opt: Optimisation) -> None:
    """RUN/last.pt: weights, optimiser, schedule, random states and progress (collective)."""
    optim = optimizer_state(opt.optimizer)  # collective under FSDP2
    schedule = opt.scheduler.state_dict()
    ctx.save(
        "last.pt",
        {"optimizer": optim, "scheduler": schedule, "rng": rng_state(), "state": opt.state},
    )
    opt.saved_step = opt.state["global_step"]


def _non_finite_loss(step: int, loss: float, run: Path, saved_step: int | None):
    kept = "no checkpoint was written yet"
    if saved_step is not None:
        kept = f"{run / 'last.pt'} keeps the last good state (step {saved_step})"
    return FloatingPointError(
        f"step {step}: the training loss is {loss}; training stopped before applying it and "
        f"{kept}; lower --lr or check the data"
    )


def _reached_max_steps(cfg: TrainConfig, state: dict) -> bool:
    return cfg.max_steps is not None and state["global_step"] >= cfg.max_steps


def _train_epoch(ctx: RunContext, opt: Optimisation) -> bool:
    """The rest of the current epoch's steps; True if --max-steps stopped it mid-epoch."""
    cfg, state = ctx.cfg, opt.state
    epoch = state["epoch"]
    seed = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    order = torch.randperm(len(ctx.setup.targets["train"]), generator=seed)
    steps = range(state["step_in_epoch"], opt.steps_per_epoch)
    show = cfg.progress and ctx.rank == 0
    bar = tqdm(steps, desc=f"{cfg.loss} epoch {epoch + 1}", disable=not show, leave=False)
    for s in bar:
        idx = order[s * cfg.batch_size : (s + 1) * cfg.batch_size].tolist()
        size, step = cfg.micro_batch_size, state["global_step"]
        micro = micro_batches(ctx.setup, idx, ctx.loss, ctx.step, size, step)
        stats: dict[str, float] = {}
        step_loss = accumulate_gradients(ctx.step, micro, ctx.loss, stats)
        fault_point(f"backward:{state['global_step'] + 1}")
        if not math.isfinite(step_loss):
            raise _non_finite_loss(state["global_step"] + 1, step_loss, ctx.run, opt.saved_step)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(opt.params, cfg.max_grad_norm)
        opt.optimizer.step()
        opt.scheduler.step()
        opt.optimizer.zero_grad(set_to_none=True)
        state["global_step"] += 1
        state["step_in_epoch"] = s + 1
        progress = epoch + (s + 1) / opt.steps_per_epoch
        lr = opt.scheduler.get_last_lr()[0]
        ctx.log(
            event="step", step=state["global_step"], epoch=progress, loss=step_loss, lr=lr, **stats
        )
        bar.set_postfix(loss=f"{step_loss:.4f}")
        fault_point(f"step:{state['global_step']}")
        if cfg.eval_every and state["global_step"] % cfg.eval_every == 0 and _check(ctx, opt):
            state["early_stopped"] = True
        if state.get("early_stopped") and s + 1 < opt.steps_per_epoch:
            bar.close()
            return True  # a mid-epoch position, as --max-steps leaves it
        if requested() is not None:  # SIGINT / SIGTERM: stop here, resumable
            _save_last(ctx, opt)
            bar.close()
            where = f"after step {state['global_step']} ({ctx.run / 'last.pt'} holds it)"
            raise Stopped(requested(), where)
        if state["global_step"] % cfg.save_every == 0 and s + 1 < opt.steps_per_epoch:
            _save_last(ctx, opt)  # mid-epoch; the epoch's end saves after validation
        if _reached_max_steps(cfg, state):
            bar.close()
            return state["step_in_epoch"] < opt.steps_per_epoch
    bar.close()
    return False


def _check(ctx: RunContext, opt: Optimisation) -> bool:
    """An --eval-every check (``bear.validation``), logged; the weights of the best check so far
    kept as RUN/best_check.pt. True when --early-stopping says stop (the loss has not improved
    for that many checks in a row)."""
    cfg, state = ctx.cfg, opt.state
    decode = None
    if cfg.valid_decode_rows is not None:
        decode = dataclasses.replace(ctx.evaluation, limit=cfg.valid_decode_rows)
    full_vocabulary = ctx.loss.full_vocabulary
    size = cfg.micro_batch_size
    result = validation_check(ctx.step, ctx.setup, cfg.valid_rows, size, full_vocabulary, decode)
    checks = state.setdefault("checks", {"best": None, "since_best": 0})
    if checks["best"] is None or result["loss"] < checks["best"]:
        checks["best"], checks["since_best"] = result["loss"], 0
        ctx.save("best_check.pt", {"step": state["global_step"], "check": result})
    else:
        checks["since_best"] += 1
    epoch = state["epoch"] + state["step_in_epoch"] / opt.steps_per_epoch
    ctx.log(event="check", step=state["global_step"], epoch=epoch, **result)
    return cfg.early_stopping is not None and checks["since_best"] >= cfg.early_stopping


def _better(valid: dict, best: dict | None) -> bool:
    """Whether validation metrics ``valid`` beat the best epoch's (SPEC §3: NDCG@10)."""
    return best is None or valid[SELECT_METRIC] > best["valid"][SELECT_METRIC]


def _end_epoch(ctx: RunContext, opt: Optimisation) -> None:
    """After a whole epoch: upstream tests it and keeps its weights; ours validates it and keeps
    the best epoch's weights as RUN/best.pt; both write RUN/last.pt."""
    state = opt.state
    epoch = state["epoch"]
    if ctx.cfg.protocol == "upstream":
        _test_epoch(ctx, state, epoch)
    else:
        valid = ctx.evaluate("valid") if ctx.cfg.validate else {}
        state["history"].append({"epoch": epoch, **valid})
        ctx.log(event="valid", epoch=epoch, step=state["global_step"], **valid)
        best = state["best"]
        if not ctx.cfg.validate or _better(valid, best):
            state["best"] = {"epoch": epoch, "valid": valid}
            ctx.save("best.pt", {"epoch": epoch})
    _save_last(ctx, opt)


def train(cfg: TrainConfig) -> dict:
    """Train, validate each epoch, test the best epoch; return RUN/metrics.json's content.

    Every input is checked before the run folder is touched (ValueError / OSError naming the
    setting or file). Raises FloatingPointError at a non-finite loss (the last checkpoint stays),
    ``bear.stopping.Stopped`` on SIGINT / SIGTERM (after the step in progress, RUN/last.pt
    written; a second signal at once).
    """
    with stop_signals():
        ctx, resume_from = _start(cfg)
        try:
            return _train(ctx, resume_from)
        finally:
            if ctx.lock is not None:
                ctx.lock.release()


def _train(ctx: RunContext, resume_from: dict | None) -> dict:
    """The epochs of a started run, then its selection and test (``_finish``)."""
    cfg = ctx.cfg
    opt = _optimisation(ctx, resume_from)
    state, stopped = opt.state, False
    while state["epoch"] < cfg.epochs and not stopped:
        t0 = time.perf_counter()
        stopped = _train_epoch(ctx, opt)
        if stopped:
            _save_last(ctx, opt)  # a mid-epoch position: --resume continues from here
            break
        state["epoch_seconds"].append(time.perf_counter() - t0)
        state["epoch"], state["step_in_epoch"] = state["epoch"] + 1, 0
        _end_epoch(ctx, opt)
        if _reached_max_steps(cfg, state) or state.get("early_stopped"):
            break
    result = _finish(ctx, opt, stopped)
    ctx.barrier()
    return result


def _test_epoch(ctx: RunContext, state: dict, epoch: float) -> None:
    """Upstream's protocol after an epoch (or a partial one): the test metrics (unless --no-eval)
    into the history, and the weights as RUN/epoch_<epoch>.pt (upstream saves every epoch)."""
    test = ctx.evaluate("test", full=True) if ctx.cfg.validate else {}
    state["history"].append({"epoch": epoch, "test": test})
    ctx.log(event="test", epoch=epoch, step=state["global_step"], **test)
    ctx.save(epoch_checkpoint(epoch), {"epoch": epoch})


def _select(ctx: RunContext, opt: Optimisation, stopped: bool) -> tuple[dict, str]:
    """The checkpoint protocol ours tests: the best validation epoch, or a stop mid-epoch that
    validates better (kept as RUN/partial.pt): ({"epoch", "valid"}, its file name)."""
    state, best = opt.state, opt.state["best"]
    if not stopped:
        return best, "best.pt"
    valid = ctx.evaluate("valid")
    epoch = state["epoch"] + state["step_in_epoch"] / opt.steps_per_epoch
    ctx.log(event="valid", epoch=epoch, step=state["global_step"], partial=True, **valid)
    if _better(valid, best):
        ctx.save("partial.pt", {"epoch": epoch})
        return {"epoch": epoch, "valid": valid}, "partial.pt"
    return best, "best.pt"


def _finish(ctx: RunContext, opt: Optimisation, stopped: bool) -> dict:
    """Choose the checkpoint, test it and write RUN/metrics.json, RUN/curves.png and RUN/model/
    (Hugging Face format). Upstream: test a stop mid-epoch as a partial epoch, report every
    epoch's test metrics and their maxima, and write the last weights (no selection); --no-eval:
    the last weights, no metrics."""
    cfg, state = ctx.cfg, opt.state
    base = None if cfg.model == "tiny" else cfg.model  # what RUN/model's adapter records
    seconds = state["epoch_seconds"]
    per_epoch = sum(seconds) / len(seconds) if seconds else None
    alpha = cfg.length_penalty
    if cfg.protocol == "upstream" or not cfg.validate:
        if cfg.protocol == "upstream" and stopped:
            epoch = state["epoch"] + state["step_in_epoch"] / opt.steps_per_epoch
            _test_epoch(ctx, state, epoch)
        last = Selection(state["epoch"], "last.pt", {}, {})
        metrics = run_metrics(cfg.protocol, alpha, per_epoch, last, epochs=state["history"])
        weights = trainable_state(ctx.model)  # collective under FSDP2
        if ctx.rank == 0:
            write_metrics(ctx.run, metrics)
            save_run_model(ctx.model, ctx.setup.tokenizer, ctx.run / "model", weights, base)
        return metrics
    best, checkpoint = _select(ctx, opt, stopped)
    ctx.barrier()
    weights = read_checkpoint(ctx.run / checkpoint)["model"]
    final = trainable_state(ctx.model)
    load_weights(ctx.model, weights, source=str(ctx.run / checkpoint))
    valid, test = ctx.evaluate("valid", full=True), ctx.evaluate("test", full=True)
    selection = Selection(best["epoch"], checkpoint, valid, test)
    metrics = run_metrics("ours", alpha, per_epoch, selection)
    ctx.log(event="test", epoch=best["epoch"], step=state["global_step"], **test)
    if ctx.rank == 0:
        write_metrics(ctx.run, metrics)
        save_run_model(ctx.model, ctx.setup.tokenizer, ctx.run / "model", weights, base)
        plot_run(ctx.run)
    load_weights(ctx.model, final)  # callers (tests) see the last weights, as trained
    return metrics

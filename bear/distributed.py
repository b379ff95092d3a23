"""Several processes (SPEC §9): the process group, the DDP and FSDP2 wrappers, what they change.

``torchrun`` and ``accelerate launch`` start the processes with the same environment contract
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); ``init_distributed`` reads it. The model
is wrapped in ``DistributedDataParallel`` by default or sharded with FSDP2 (``fully_shard`` on each
decoder layer, then on the root) under ``--fsdp``. Each micro-batch runs inside
``gradient_sync(engine, last)``: gradients are reduced across ranks on the step's last micro-batch
only (DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync``). Decoding (validation, test,
beam-sim's thresholds) runs a data-dependent number of forwards per rank, so under FSDP2 it runs
inside ``decoding_model``, which gathers the whole model on each rank first (parameters only, in
their ``--dtype``) and shards it again after.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from bear.config import TrainConfig

__all__ = [
    "close_distributed",
    "PROCESS_GROUP_TIMEOUT",
    "init_distributed",
    "check_launcher_environment",
    "wrap_model",
    "gradient_sync",
    "decoding_model",
    "optimizer_state",
    "load_optimizer_state",
]

# Longest wait in a collective. Evaluation is sharded, so ranks wait only for the slowest share;
# an hour covers a long epoch's imbalance without hiding a hung rank for NCCL's default 10 minutes.
PROCESS_GROUP_TIMEOUT = timedelta(hours=1)


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size) of this process; starts the process group when WORLD_SIZE > 1.

    The backend is NCCL on a GPU and gloo on the CPU, with ``PROCESS_GROUP_TIMEOUT``.
    """
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=PROCESS_GROUP_TIMEOUT)
    return dist.get_rank(), world


def close_distributed() -> None:
    """Leave the process group together (barrier, then destroy) when one was started.

    Without it a gloo rank whose peer has already exited can abort in its own teardown
    ("terminate called without an active exception"), failing the launch after a good run.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def check_launcher_environment(cfg: TrainConfig, environ=os.environ) -> None:
    """Refuse accelerate-config settings that ``bear`` cannot honour, rather than ignore them.

    ``accelerate launch`` passes its config to the processes as ACCELERATE_* variables. bear takes
    the process layout from it and its engine from its own flags, so a config that asks for FSDP
    without ``--fsdp``, for DeepSpeed, or for fp16/fp8 mixed precision (bear autocasts to bf16 on a
    GPU; ``--dtype`` sets the weights) raises ValueError naming the setting and the fix.
    """
    if environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise ValueError("accelerate config: DeepSpeed is not supported by bear; use --fsdp")
    if environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not cfg.fsdp:
        raise ValueError("accelerate config: FSDP is on but --fsdp was not given; pass --fsdp")
    precision = environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if precision not in ("no", "bf16"):
        raise ValueError(
            f"accelerate config: mixed_precision {precision!r} is not supported; use 'no' or "
            "'bf16' (bear autocasts to bf16 on a GPU; --dtype bf16 stores the weights in bf16)"
        )


def _block_classes(model: torch.nn.Module) -> set[str]:
    """Class names of the model's repeated blocks (transformers' ``_no_split_modules``)."""
    for module in model.modules():
        names = getattr(module, "_no_split_modules", None)
        if names:
            return set(names)
    raise ValueError(f"--fsdp: {type(model).__name__} names no decoder block (_no_split_modules)")


def wrap_model(model: torch.nn.Module, cfg: TrainConfig, device: torch.device, world: int):
    """The module the training forwards run through: ``model`` itself (one process), DDP, or the
    same ``model`` sharded in place by FSDP2 (``cfg.fsdp``; build the optimizer after this).

    DDP does not broadcast buffers at each forward (they are constants here), so ranks may run
    different numbers of forwards between two gradient reductions.
    """
    if world == 1:
        return model
    if not cfg.fsdp:
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    mesh = init_device_mesh(device.type, (world,))
    blocks = _block_classes(model)
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def gradient_sync(engine: torch.nn.Module, enabled: bool):
    """Context for one micro-batch's forward and backward: reduce gradients across ranks only if
    ``enabled`` (the step's last micro-batch)."""
    if isinstance(engine, DistributedDataParallel):
        return nullcontext() if enabled else engine.no_sync()
    if isinstance(engine, FSDPModule):
        engine.set_requires_gradient_sync(enabled)
    return nullcontext()


@contextmanager
def decoding_model(engine: torch.nn.Module):
    """The plain model to decode with; under FSDP2 every rank holds the whole model meanwhile.

    Collective under FSDP2 (every rank enters and leaves together); the forwards inside are not,
    so each rank may decode a different number of steps.
    """
    if isinstance(engine, DistributedDataParallel):
        yield engine.module
        return
    if not isinstance(engine, FSDPModule):
        yield engine
        return
    sharded = [m for m in engine.modules() if isinstance(m, FSDPModule)]
    engine.set_reshard_after_forward(False)
    for module in sharded:
        module.unshard()
    try:
        yield engine
    finally:
        for module in sharded:
            module.reshard()
        engine.set_reshard_after_forward(True)


def _full(value):
    return value.full_tensor().cpu() if isinstance(value, DTensor) else value


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with FSDP2-sharded states gathered whole (collective under
    FSDP2: call it on every rank), so that a checkpoint does not depend on the number of ranks."""
    state = optimizer.state_dict()
    state["state"] = {
        i: {k: _full(v) for k, v in entry.items()} for i, entry in state["state"].items()
    }
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load an ``optimizer_state`` checkpoint; under FSDP2 each state is sharded like its param."""
    optimizer.load_state_dict(state)
    for param, entry in optimizer.state.items():
        if isinstance(param, DTensor):
            for key, value in entry.items():
                if value.shape == param.shape and not isinstance(value, DTensor):
                    local = value.to(param.device)
                    entry[key] = distribute_tensor(
                        local, param.device_mesh, param.placements, src_data_rank=None
                    )

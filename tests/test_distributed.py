"""Several processes (SPEC §9): DDP under torchrun and FSDP2 under accelerate launch equal one
process (weights and the sharded evaluation's metrics), and the launchers' environment contract.
Two gloo processes on the CPU; the tiny model keeps each launch to seconds of work."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
from _helpers_launch import launch
from _helpers_train import tiny_synth

from bear.config import TrainConfig
from bear.distributed import check_launcher_environment

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
# 17 rows in steps of 8, 8 and 1 over 2 ranks, micro-batches of 3: ranks hold 4/4, 4/4 and 1/0
# examples, so the last step runs a weight-0 stand-in on rank 1; 12 evaluation rows in batches of
# 4 give each rank a share of 6 rows with a partial batch; lr 0.05 moves the model off chance so
# that the metrics compared are not all zero.
LR = 0.05
ARGS = ["--loss", "bear", "--epochs", "1", "--limit-train", "17", "--batch-size", "8",
        "--micro-batch-size", "3", "--vocab-size", "320", "--hidden-size", "32",
        "--num-layers", "1", "--max-history", "4", "--limit-eval", "12", "--eval-batch-size", "4",
        "--lr", str(LR), "--no-progress", "--device", "cpu"]  # fmt: skip


def _free_port() -> str:
    """A TCP port free now (other sessions' tests run beside these: no fixed port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _train(launcher: list[str], data: Path, out: Path, *extra: str) -> None:
    cmd = [*launcher, "-m", "bear", "train", "--data", str(data), "--out", str(out), *ARGS, *extra]
    done = launch(cmd, env=ENV, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"best_epoch"') == 1  # one report per launch (rank 0), not per rank


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """(dataset, run folder) of the single-process reference run."""
    root = tmp_path_factory.mktemp("dist")
    data = tiny_synth(root / "synth")
    _train([sys.executable], data, root / "one")
    return data, root / "one"


def _assert_equals_one_process(one: Path, run: Path) -> None:
    """The same first gradient moments (Adam's exp_avg, a decayed sum of every step's gradient:
    the sensitive check), weights that differ by less than one step of size lr (Adam turns float
    noise in a near-zero gradient into an update of up to lr), and the same metrics."""
    a, b = (torch.load(r / "last.pt", weights_only=False) for r in (one, run))
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        torch.testing.assert_close(b["model"][name], a["model"][name], atol=LR, rtol=0)
    for i, state in a["optimizer"]["state"].items():
        moment = b["optimizer"]["state"][i]["exp_avg"]
        torch.testing.assert_close(moment, state["exp_avg"], atol=1e-6, rtol=1e-4)
    metrics = [json.loads((r / "metrics.json").read_text()) for r in (one, run)]
    assert metrics[0]["valid"]["ndcg@10"] > 0 and metrics[0]["test"]["ndcg@10"] > 0
    for split in ("valid", "test"):
        assert metrics[1][split] == pytest.approx(metrics[0][split], abs=1e-12), split
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert log[0]["world_size"] == 2


def test_ddp_under_torchrun_equals_one_process(one_process, tmp_path):
    """torchrun --nproc_per_node 2: DDP (no_sync accumulation) reaches the single process's weights;
    the evaluation, sharded across the two ranks, gives its metrics."""
    data, one = one_process
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", _free_port()]  # fmt: skip
    _train(torchrun, data, tmp_path / "ddp")
    _assert_equals_one_process(one, tmp_path / "ddp")


def test_sdpo_bear_under_torchrun_equals_one_process(one_process, tmp_path):
    """S-DPO + BEAR from a finished run (its own reference: a frozen copy on every rank): two DDP
    processes reach the single process's weights; each rank draws its examples' negatives, seeded
    by (seed, step, example), so the split across ranks changes nothing."""
    data, start = one_process
    args = ("--loss", "sdpo-bear", "--init", str(start), "--negatives", "2", "--reg-weight", "0.5")
    _train([sys.executable], data, tmp_path / "one", *args)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", _free_port()]  # fmt: skip
    _train(torchrun, data, tmp_path / "ddp", *args)
    _assert_equals_one_process(tmp_path / "one", tmp_path / "ddp")


def test_fsdp_under_accelerate_launch_equals_one_process(one_process, tmp_path):
    """accelerate launch --num_processes 2 with --fsdp (FSDP2 shards, gathers for decoding) reaches
    the single process's weights and metrics; RUN/model is written from the sharded model."""
    data, one = one_process
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                  "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no", "--main_process_port", _free_port()]  # fmt: skip
    _train(accelerate, data, tmp_path / "fsdp", "--fsdp")
    _assert_equals_one_process(one, tmp_path / "fsdp")
    assert (tmp_path / "fsdp" / "model" / "model.safetensors").is_file()


def test_fsdp_run_stopped_and_resumed_equals_one_process(one_process, tmp_path):
    """An FSDP2 run stopped after 2 of its 3 steps (RUN/last.pt holds the gathered weights and
    optimizer state) and resumed with --resume under FSDP2 (sharded again from that file) ends where
    the uninterrupted single process does: weights, Adam's moments, metrics."""
    data, one = one_process
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                  "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no"]  # fmt: skip
    run = tmp_path / "fsdp"
    _train([*accelerate, "--main_process_port", _free_port()], data, run, "--fsdp",
           "--max-steps", "2")  # fmt: skip
    stopped = torch.load(run / "last.pt", weights_only=False)
    assert stopped["state"]["global_step"] == 2
    _train([*accelerate, "--main_process_port", _free_port()], data, run, "--fsdp", "--resume")
    _assert_equals_one_process(one, run)
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "resume" and e["step"] == 2 for e in log)


def test_accelerate_config_that_bear_cannot_honour_is_refused():
    """An accelerate config is read, not ignored: FSDP without --fsdp, DeepSpeed and fp16 raise."""
    cfg = TrainConfig(data="d", out="o")
    check_launcher_environment(cfg, {"ACCELERATE_MIXED_PRECISION": "bf16"})
    with pytest.raises(ValueError, match="--fsdp"):
        check_launcher_environment(cfg, {"ACCELERATE_USE_FSDP": "true"})
    with_fsdp = TrainConfig(data="d", out="o", fsdp=True)
    check_launcher_environment(with_fsdp, {"ACCELERATE_USE_FSDP": "true"})
    with pytest.raises(ValueError, match="DeepSpeed"):
        check_launcher_environment(cfg, {"ACCELERATE_USE_DEEPSPEED": "true"})
    with pytest.raises(ValueError, match="fp16"):
        check_launcher_environment(cfg, {"ACCELERATE_MIXED_PRECISION": "fp16"})


def test_a_hung_launch_fails_in_time_and_leaves_no_process():
    """A launcher that never ends, whose worker sits in a session of its own (as torchrun's
    workers do): launch fails after its timeout and kills the worker too, which a kill of the
    launcher's process group would miss. (The worker closes its output so that a helper reading
    pipes would return here rather than wait out the sleep.)"""
    import psutil

    worker = "import os, time; os.close(1); os.close(2); time.sleep(120)"
    launcher = (
        "import subprocess, sys, time; "
        f"subprocess.Popen([sys.executable, '-c', {worker!r}], start_new_session=True); "
        "time.sleep(120)"
    )
    with pytest.raises(AssertionError, match="still running after 2 s"):
        launch([sys.executable, "-c", launcher], env=ENV, cwd=REPO, timeout=2)
    left = [
        p for p in psutil.process_iter(["cmdline"]) if worker in " ".join(p.info["cmdline"] or [])
    ]
    assert left == []

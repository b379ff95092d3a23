"""Fault injection (SPEC §10): training killed with SIGKILL mid-step, mid-epoch and during
checkpoint writes, then resumed, ends on the weights of an uninterrupted run, bit for bit, with no
temporary file left. The kills come from the test hook ``BEAR_FAULT_AT`` (``bear.faults``); each
run is a forked child so that the kill is real and the parent's imports are reused."""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

import pytest
import torch
from _helpers_train import tiny_config, tiny_synth

from bear.train import train

# 24 rows, 8 per step: 3 steps per epoch, 6 in all; RUN/last.pt after steps 2, 3 (epoch end), 4, 6.
SETTINGS = dict(epochs=2, limit_train=24, batch_size=8, save_every=2, validate=False)


def _train_in_child(cfg, fault: str | None) -> None:
    torch.set_num_threads(1)  # the same arithmetic in every child (and no OpenMP pool after fork)
    if fault:
        os.environ["BEAR_FAULT_AT"] = fault
    train(cfg)


def _run_child(cfg, fault: str | None = None) -> int:
    child = multiprocessing.get_context("fork").Process(target=_train_in_child, args=(cfg, fault))
    child.start()
    child.join()
    return child.exitcode


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=False)["model"]


def _last_step(run: Path) -> int:
    return torch.load(run / "last.pt", weights_only=False)["state"]["global_step"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_killed_runs_resume_to_the_uninterrupted_weights(tmp_path):
    data = tiny_synth(tmp_path / "data")
    whole = tiny_config(data, tmp_path / "whole", **SETTINGS)
    assert _run_child(whole) == 0
    run = tmp_path / "killed"
    fresh = tiny_config(data, run, **SETTINGS)
    resume = tiny_config(data, run, resume=True, **SETTINGS)
    killed = -signal.SIGKILL
    # 1. mid-step in epoch 1 (gradients of step 2 accumulated, not applied): no checkpoint yet
    assert _run_child(fresh, "backward:2") == killed
    assert not (run / "last.pt").exists()
    # 2. resumed from the start, killed while writing the first last.pt (step 2)
    assert _run_child(resume, "write:last.pt") == killed
    assert not (run / "last.pt").exists() and list(run.glob(".last.pt.*.bear-tmp"))
    # 3. resumed from the start again, killed mid-epoch 2 (after step 4, before its checkpoint)
    assert _run_child(resume, "step:4") == killed
    assert _last_step(run) == 3
    # 4. resumed from step 3, killed while writing last.pt at the end of epoch 2 (its second
    #    last.pt write; best.pt of epoch 2 is already written)
    assert _run_child(resume, "write:last.pt*2") == killed
    assert _last_step(run) == 4
    # 5. resumed from step 4, killed while writing best.pt at the end of epoch 2
    assert _run_child(resume, "write:best.pt") == killed
    assert _last_step(run) == 4
    # 6. resumed from step 4 to the end
    assert _run_child(resume) == 0
    for name in ("last.pt", "best.pt"):
        expected, got = _weights(tmp_path / "whole" / name), _weights(run / name)
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected), name
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == [".bear-run"]

"""Faults a long run meets (issue): SIGINT and SIGTERM stop training after the step in progress
with RUN/last.pt written and one line saying how to continue (a second signal at once,
evaluation between batches, no traceback); one launch owns a run folder; --resume refuses
changed data; a relative --data evaluates from anywhere; no temporary file outlives a run."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _helpers_train import last_weights, tiny_config, tiny_synth

from bear.evaluate import EvalSettings, evaluate_split
from bear.run import build_setup
from bear.stopping import Stopped, requested, stop_signals

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return tiny_synth(tmp_path_factory.mktemp("stopping") / "synth")


def _args(data, out):
    sizes = ["--vocab-size", "320", "--hidden-size", "32", "--num-layers", "1"]
    rows = ["--batch-size", "8", "--limit-train", "24", "--limit-eval", "3", "--max-history", "4"]
    where = ["--data", str(data), "--out", str(out), "--no-progress", "--device", "cpu"]
    return [*where, "--epochs", "2", *sizes, *rows]


def _bear(*args, **env):
    cmd = [sys.executable, "-m", "bear", *args]
    environ = dict(os.environ, **env)
    return subprocess.run(cmd, cwd=REPO, env=environ, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("name", "status"), [("TERM", 143), ("INT", 130)])
def test_a_signal_stops_after_the_step_and_the_printed_command_resumes(synth, tmp_path, name,
                                                                      status):  # fmt: skip
    """Stopped at step 2 of 6 (the signal arrives as the step ends): exit 128 + signal, one
    line naming the step and the command that continues; that command ends where an
    uninterrupted run does."""
    whole = _bear("train", *_args(synth, tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    cut = _bear("train", *_args(synth, tmp_path / "cut"), BEAR_FAULT_AT="step:2",
                BEAR_FAULT_SIGNAL=name)  # fmt: skip
    assert cut.returncode == status
    line = cut.stderr.strip().splitlines()[-1]
    assert "Traceback" not in cut.stderr
    assert f"stopped by SIG{name} after step 2" in line
    command = shlex.split(line.split("continue with: ")[1])
    assert command[:3] == ["python", "-m", "bear"] and command[-1] == "--resume"
    resumed = _bear(*command[3:])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = last_weights(tmp_path / "whole"), last_weights(tmp_path / "cut")
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5)


def test_the_second_signal_stops_at_once():
    with stop_signals():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert requested() == signal.SIGINT  # recorded, nothing raised
        with pytest.raises(Stopped, match="SIGTERM at once"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    assert requested() is None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_evaluation_stops_between_batches(synth, tmp_path):
    cfg = tiny_config(synth, tmp_path / "r")
    setup = build_setup(cfg, tmp_path / "r", fresh=True)
    with stop_signals(), pytest.raises(Stopped, match="while evaluating test"):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        evaluate_split(setup.model, setup, "test", EvalSettings(limit=4))


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]


def test_a_run_folder_is_owned_by_one_launch_at_a_time(synth, tmp_path):
    """While a launch holds the folder (stopped at step 1 with SIGSTOP), a second train on it,
    --resume or --overwrite, is refused naming its pid and touches nothing; once that process
    is killed, its lock file blocks nothing and --resume continues."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "bear", "train", *_args(synth, run)]
    env = dict(os.environ, BEAR_FAULT_AT="step:1", BEAR_FAULT_SIGNAL="STOP")
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 120
        while _state(first.pid) != "T":
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.2)
        before = sorted(p.name for p in run.iterdir())
        for flag in ("--resume", "--overwrite"):
            refused = _bear("train", *_args(synth, run), flag)
            assert refused.returncode == 2
            assert f"another bear train (pid {first.pid}) is writing this run folder" in (
                refused.stderr
            )
        assert sorted(p.name for p in run.iterdir()) == before
    finally:
        first.kill()
        first.wait()
    assert (run / ".bear-lock").is_file()  # left by the killed launch
    resumed = _bear("train", *_args(synth, run), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not (run / ".bear-lock").exists()


def test_resume_refuses_changed_data_unless_told(synth, tmp_path):
    """config.json fingerprints the files read; --resume after rows left train.csv is refused
    naming it (the run would go on with another schedule), --allow-data-change accepts it."""
    import shutil

    from bear.train import train

    data = tmp_path / "data"
    shutil.copytree(synth, data)
    run = tmp_path / "run"
    train(tiny_config(data, run, epochs=2, max_steps=2))
    lines = (data / "train.csv").read_text().splitlines()
    (data / "train.csv").write_text("\n".join(lines[:-10]) + "\n")
    with pytest.raises(ValueError, match=r"--resume: .*train.csv changed since .* began"):
        train(tiny_config(data, run, epochs=2, resume=True))
    train(tiny_config(data, run, epochs=2, resume=True, allow_data_change=True))


def test_a_run_with_a_relative_data_path_evaluates_from_any_folder(synth, tmp_path):
    import shutil

    shutil.copytree(synth, tmp_path / "data")
    trained = subprocess.run(
        [sys.executable, "-m", "bear", "train", *_args("data", "run")], cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-2000:]
    again = _bear("evaluate", "--run", str(tmp_path / "run"), "--device", "cpu")
    assert again.returncode == 0, again.stderr[-2000:]


def test_evaluate_removes_the_temporary_file_a_killed_write_left(synth, tmp_path):
    from bear.train import train

    run = tmp_path / "run"
    train(tiny_config(synth, run))
    (run / ".metrics.json.abc123.bear-tmp").write_text("{")  # a killed atomic write's leftover
    done = _bear("evaluate", "--run", str(run), "--device", "cpu")
    assert done.returncode == 0, done.stderr[-2000:]
    assert not list(run.glob("*.bear-tmp"))


def test_a_step_count_of_zero_with_supervised_labels_is_refused():
    from bear_kernels.transformers import BEARForCausalLMLoss

    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    with pytest.raises(ValueError, match="num_items_in_batch: got 0 with 8 supervised labels"):
        BEARForCausalLMLoss(logits, labels, num_items_in_batch=0)


def test_prompts_past_the_context_are_refused_or_truncated(synth, tmp_path):
    """Titles of ~600 tokens put 4-item prompts past the tiny model's 2048 positions: the run is
    refused before any work, naming the row and the limit; --truncate-history drops the oldest
    history items of those rows until they fit."""
    import json as json_module
    import shutil

    from bear.train import train

    data = tmp_path / "long"
    shutil.copytree(synth, data)
    titles = json_module.loads((data / "id2name4Rec.json").read_text())
    tail = " ".join(f"part{k}" for k in range(200))
    (data / "id2name4Rec.json").write_text(
        json_module.dumps({k: f"{v} {tail}" for k, v in titles.items()})
    )
    refused = r"train.csv:\d+: its prompt \(\d+ tokens\) and its response \(\d+\) exceed"
    with pytest.raises(ValueError, match=refused + " the model's context of 2048"):
        train(tiny_config(data, tmp_path / "refused", limit_train=8))
    assert not (tmp_path / "refused").exists()
    cfg = tiny_config(data, tmp_path / "cut", limit_train=8, truncate_history=True, epochs=1)
    setup = build_setup(cfg, tmp_path / "cut", fresh=True)
    for split in ("train", "valid", "test"):
        longest = max(len(p) for p in setup.prompts[split])
        assert longest + setup.trie.max_len + 1 <= 2048 or split == "train"
    assert min(len(e.history) for e in setup.data.train) < 4  # some histories were cut


def test_the_log_holds_one_record_per_step_after_a_kill_and_resume(synth, tmp_path):
    """Killed after step 3 with the last checkpoint at step 2, then resumed: step 3 runs again
    and the log keeps one record of it (before: two, and curves.png drew both)."""
    run = tmp_path / "run"
    killed = _bear("train", *_args(synth, run), "--save-every", "2", BEAR_FAULT_AT="step:3")
    assert killed.returncode == -signal.SIGKILL
    resumed = _bear("train", *_args(synth, run), "--save-every", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["event"] == "step"]
    assert steps == sorted(set(steps)) == list(range(1, steps[-1] + 1))


def test_an_out_that_is_a_dangling_link_is_named(synth, tmp_path):
    link = tmp_path / "run"
    link.symlink_to(tmp_path / "nowhere")
    done = _bear("train", *_args(synth, link))
    assert done.returncode == 2
    assert f"--out {link}: a symbolic link to {tmp_path / 'nowhere'}, which does not exist" in (
        done.stderr
    )


def test_run_files_are_readable_by_the_group_as_the_umask_allows(synth, tmp_path):
    """Atomic writes went through mkstemp's 0600: metrics.json, config.json and the checkpoints
    were unreadable to a shared group; now they get the umask's mode, as any other file."""
    from bear.train import train

    old = os.umask(0o022)
    try:
        train(tiny_config(synth, tmp_path / "run"))
    finally:
        os.umask(old)
    for name in ("config.json", "metrics.json", "last.pt", "best.pt"):
        assert (tmp_path / "run" / name).stat().st_mode & 0o777 == 0o644, name


@pytest.mark.parametrize("file", ["last.pt", "model"])
def test_a_full_disk_is_named_and_resume_continues(synth, tmp_path, file):
    """A write that runs out of space (a checkpoint, the model folder): one line saying the disk
    is full, that nothing was lost and to continue with --resume; the resume ends as a run the
    disk never stopped."""
    whole = _bear("train", *_args(synth, tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    args = _args(synth, tmp_path / "full")
    cut = _bear("train", *args, BEAR_FAULT_AT=f"write:{file}", BEAR_FAULT_SIGNAL="ENOSPC")
    assert cut.returncode == 2 and "Traceback" not in cut.stderr
    line = cut.stderr.strip().splitlines()[-1]
    assert line.startswith(f"bear train: error: {tmp_path / 'full' / file}: the disk is full")
    assert "nothing was lost" in line and "--resume" in line
    assert (
        not list((tmp_path / "full").glob("*.bear-tmp"))
        and not (tmp_path / "full" / ".model.tmp").exists()
    )
    resumed = _bear("train", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (tmp_path / "full" / "model").is_dir()
    a, b = last_weights(tmp_path / "whole"), last_weights(tmp_path / "full")
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5)


def test_an_older_runs_record_of_its_test_file_does_not_block_resume(synth, tmp_path):
    """Runs before the fingerprint left the test file out recorded it too; a resume compares
    only the files that decide training, and still names one that changed."""
    from bear.run_folder import _check_data, data_fingerprint

    cfg = tiny_config(synth, tmp_path / "run")
    older = data_fingerprint(cfg) | {"test.csv": {"bytes": 1, "sha256": "0" * 64}}
    _check_data(cfg, {"data_fingerprint": older}, tmp_path / "run")
    changed = older | {cfg.train_file: {"bytes": 2, "sha256": "1" * 64}}
    with pytest.raises(ValueError, match=f"{cfg.train_file} changed since"):
        _check_data(cfg, {"data_fingerprint": changed}, tmp_path / "run")


def test_an_error_with_another_errno_is_not_called_a_full_disk(tmp_path):
    import errno

    from bear.faults import disk_full

    assert not disk_full(PermissionError(errno.EACCES, "Permission denied"), tmp_path)
    assert disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    wrapped = RuntimeError("unexpected pos 64 vs 0")
    wrapped.__cause__ = OSError(errno.ENOSPC, "full")
    assert disk_full(wrapped, tmp_path)

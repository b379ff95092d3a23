"""Hostile input to ``python -m bear train/evaluate`` (SPEC §10): nothing bear did not create is
deleted, every flag is checked before the run folder is touched, ``--resume`` refuses a changed
setting, damaged files give one line naming the file (exit 2), never a traceback."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from _helpers_train import tiny_config, tiny_synth

from bear.cli import main
from bear.config import TrainConfig
from bear.run import load_run_config, load_weights
from bear.train import train

# The CLI twin of _helpers_train.tiny_config (msl, one epoch, 16 rows): seconds on a CPU.
TINY = ["--loss", "msl", "--epochs", "1", "--limit-train", "16", "--batch-size", "8",
        "--vocab-size", "320", "--hidden-size", "32", "--num-layers", "1", "--max-history", "4",
        "--limit-eval", "1", "--beam-width", "4", "--no-progress", "--device", "cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return tiny_synth(tmp_path_factory.mktemp("folder") / "synth")


@pytest.fixture(scope="module")
def finished(synth, tmp_path_factory):
    """A finished run (validated, tested) made by the CLI; tests copy it before changing it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--data", str(synth), "--out", str(run), *TINY]) == 0
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _fails(argv: list[str], capsys, *needles: str) -> str:
    """Run the CLI, expect exit 2 and one error line that names every needle."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bear ") and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


# --- every hyperparameter checked as in SPEC §2, before any work ---------------------------------


@pytest.mark.parametrize(
    "field, value, name",
    [("reg_weight", -5.0, "--reg-weight"), ("reg_weight", float("nan"), "--reg-weight"),
     ("reg_temperature", 0.0, "--reg-temperature"), ("reg_temperature", float("inf"),
     "--reg-temperature"), ("lr", -1.0, "--lr"), ("lr", float("nan"), "--lr"), ("lr", 0.0, "--lr"),
     ("warmup_ratio", 1.5, "warmup_ratio"), ("max_grad_norm", -1.0, "max_grad_norm"),
     ("save_every", 0, "--save-every")],
)  # fmt: skip
def test_config_refuses_hyperparameters_outside_spec(field, value, name):
    with pytest.raises(ValueError, match=name):
        TrainConfig(data="d", out="o", **{field: value})


@pytest.mark.parametrize(
    "bad, needle",
    [(["--lr", "-1"], "--lr"), (["--reg-weight", "-5"], "--reg-weight"),
     (["--reg-weight", "nan"], "--reg-weight"), (["--reg-temperature", "0"], "--reg-temperature"),
     (["--device", "cud"], "--device"), (["--device", "cuda:7"], "--device")],
)  # fmt: skip
def test_bad_flag_with_overwrite_leaves_the_finished_run_intact(synth, finished, tmp_path, capsys,
                                                                bad, needle):  # fmt: skip
    run = _copy(finished, tmp_path)
    before = _snapshot(run)
    argv = ["train", "--data", str(synth), "--out", str(run), *TINY, "--overwrite", *bad]
    _fails(argv, capsys, needle)
    assert _snapshot(run) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu_is_refused_first(synth, finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    before = _snapshot(run)
    _fails(["train", "--data", str(synth), "--out", str(run), *TINY, "--overwrite",
            "--device", "cuda"], capsys, "--device cuda", "--device cpu")  # fmt: skip
    assert _snapshot(run) == before


# --- --overwrite deletes only a bear run, and only bear's files ----------------------------------


def test_overwrite_never_deletes_a_hugging_face_checkpoint_folder(synth, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "llama"}')
    (ckpt / "model.safetensors").write_bytes(b"weights")
    before = _snapshot(ckpt)
    _fails(["train", "--data", str(synth), "--out", str(ckpt), *TINY, "--overwrite"], capsys,
           str(ckpt), ".bear-run")  # fmt: skip
    assert _snapshot(ckpt) == before


def test_overwrite_replaces_bear_files_and_keeps_the_others(synth, finished, tmp_path):
    run = _copy(finished, tmp_path)
    (run / "notes.txt").write_text("mine")
    (run / ".last.pt.stale.bear-tmp").write_bytes(b"killed write")
    assert main(["train", "--data", str(synth), "--out", str(run), *TINY, "--overwrite",
                 "--seed", "1", "--no-eval"]) == 0  # fmt: skip
    assert (run / "notes.txt").read_text() == "mine"
    assert json.loads((run / "config.json").read_text())["seed"] == 1
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in log if r["event"] == "config"] == [1]  # the old log is gone
    assert not list(run.glob(".*.bear-tmp")) and (run / ".bear-run").is_file()


# --- --resume refuses every setting that changes the weights -------------------------------------


@pytest.mark.parametrize(
    "changed, needle",
    [(["--reg-weight", "0.5"], "--reg-weight is 0.5 but the run used 1.0"),
     (["--micro-batch-size", "4"], "--micro-batch-size is 4 but the run used 8"),
     (["--max-history", "3"], "--max-history is 3 but the run used 4"),
     (["--limit-train", "12"], "--limit-train is 12 but the run used 16"),
     (["--train-file", "other.csv"], "--train-file is 'other.csv' but the run used 'train.csv'"),
     (["--hidden-size", "64"], "--hidden-size is 64 but the run used 32")],
)  # fmt: skip
def test_resume_refuses_a_changed_setting(synth, finished, tmp_path, capsys, changed, needle):
    run = _copy(finished, tmp_path)
    before = _snapshot(run)
    _fails(["train", "--data", str(synth), "--out", str(run), *TINY, "--resume", *changed],
           capsys, "--resume", needle)  # fmt: skip
    assert _snapshot(run) == before


def test_resume_accepts_settings_that_cannot_change_the_weights(finished, tmp_path):
    from bear.run_folder import check_run_folder

    run = _copy(finished, tmp_path)
    cfg = dataclasses.replace(load_run_config(run), resume=True, out=str(tmp_path / "moved"),
                              limit_eval=5, progress=True, max_steps=9, save_every=3,
                              eval_batch_size=4, test_file="valid.csv",
                              length_penalty=0.5)  # fmt: skip
    shutil.move(run, tmp_path / "moved")
    check_run_folder(cfg, tmp_path / "moved")


# --- damaged or foreign files name the file ------------------------------------------------------


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "random": os.urandom(4096),
                      "empty": b""}[how])  # fmt: skip


@pytest.mark.parametrize("how", ["truncated", "random", "empty"])
def test_damaged_last_pt_on_resume_names_the_file(synth, finished, tmp_path, capsys, how):
    run = _copy(finished, tmp_path)
    _damage(run / "last.pt", how)
    before = _snapshot(run)
    _fails(["train", "--data", str(synth), "--out", str(run), *TINY, "--resume"], capsys,
           str(run / "last.pt"), "delete it")  # fmt: skip
    assert _snapshot(run) == before


@pytest.mark.parametrize("how", ["truncated", "random", "empty"])
def test_damaged_best_pt_on_evaluate_names_the_file(finished, tmp_path, capsys, how):
    run = _copy(finished, tmp_path)
    _damage(run / "best.pt", how)
    _fails(["evaluate", "--run", str(run), "--device", "cpu"], capsys, str(run / "best.pt"))


def test_checkpoint_of_another_model_size_names_the_file():
    model = torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match="other.pt: parameter weight has shape"):
        load_weights(model, {"weight": torch.zeros(5, 4)}, source="other.pt")


# --- --out and --model that cannot work ----------------------------------------------------------


def test_out_that_is_a_file_or_under_a_file(synth, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    _fails(["train", "--data", str(synth), "--out", str(tmp_path / "file"), *TINY], capsys,
           "--out", "is a file")  # fmt: skip
    _fails(["train", "--data", str(synth), "--out", str(tmp_path / "file" / "run"), *TINY], capsys,
           "--out", "is a file")  # fmt: skip
    assert (tmp_path / "file").read_text() == "x"


def test_read_only_out(synth, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() == 0:  # root writes anyway: let the OS answer as it does for other users
        real_access = os.access

        def access(path, mode, **kwargs):
            return Path(path) != locked and real_access(path, mode, **kwargs)

        monkeypatch.setattr(os, "access", access)
    try:
        _fails(["train", "--data", str(synth), "--out", str(locked / "run"), *TINY], capsys,
               "--out", "not writable")  # fmt: skip
    finally:
        locked.chmod(0o700)
    assert not (locked / "run").exists()


@pytest.mark.parametrize(
    "files, needle",
    [({}, "config.json"), ({"notes.txt": "x"}, "config.json"),
     ({"config.json": "{}", "tokenizer.json": "{}"}, "weights"),
     ({"config.json": "{}", "model.safetensors": "w"}, "tokenizer")],
)  # fmt: skip
def test_model_folder_that_is_no_checkpoint(synth, tmp_path, capsys, files, needle):
    folder = tmp_path / "model"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    _fails(["train", "--data", str(synth), "--out", str(tmp_path / "run"), *TINY,
            "--model", str(folder)], capsys, f"--model {folder}", needle,
           "a checkpoint folder holds")  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_one_row_train_file_names_the_file_and_the_fix(synth, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(synth, data)
    with (synth / "train.csv").open(newline="") as fh:
        header, first = list(csv.reader(fh))[:2]
    with (data / "train.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([header, first])
    _fails(["train", "--data", str(data), "--out", str(tmp_path / "run"), *TINY], capsys,
           str(data / "train.csv"), "no validation rows", "--no-eval")  # fmt: skip
    assert not (tmp_path / "run").exists()
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), *TINY,
                 "--no-eval"]) == 0  # fmt: skip


# --- a non-finite loss stops training, the last good checkpoint stays ----------------------------


def test_non_finite_loss_stops_at_its_step_and_keeps_the_last_checkpoint(synth, tmp_path,
                                                                         monkeypatch):  # fmt: skip
    """3 steps per epoch: the loss of step 4 is NaN; last.pt of epoch 1 (step 3) stays."""
    import bear.train as train_module

    real = train_module.accumulate_gradients
    calls = []

    def nan_at_step_4(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return float("nan") if len(calls) == 4 else loss

    monkeypatch.setattr(train_module, "accumulate_gradients", nan_at_step_4)
    run = tmp_path / "run"
    cfg = tiny_config(synth, run, epochs=2, limit_train=24, validate=False)
    with pytest.raises(FloatingPointError, match=r"step 4: the training loss is nan.*step 3"):
        train(cfg)
    last = torch.load(run / "last.pt", weights_only=False)
    assert last["state"]["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in last["model"].values())
    assert not (run / "metrics.json").exists()

"""python -m bear sweep (issue: the paper's questions as one command): a grid from train's flags,
checked before any cell runs, run in parallel, resumed, failures recorded, a table and plots."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from _helpers_train import tiny_config, tiny_synth

from bear.cli import main
from bear.evaluate import EvalSettings

REPO = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "1", "--vocab-size", "320", "--hidden-size", "32", "--num-layers", "1",
        "--limit-train", "16", "--limit-eval", "3", "--max-history", "3",
        "--beam-width", "4", "--batch-size", "8", "--device", "cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return tiny_synth(tmp_path_factory.mktemp("sweep") / "synth")


def _sweep(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "bear", "sweep", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_a_grid_runs_each_cell_once_writes_its_table_and_resumes(synth, tmp_path):
    """msl runs once over the λ values it does not read; two jobs; the table has a row per cell
    with the flags by name and the metrics; run again, it trains nothing."""
    out = tmp_path / "grid"
    args = ["--data", str(synth), "--out", str(out), "--loss", "msl", "bear", "--reg-weight",
            "0", "1", "--eval-beam-width", "4", "6", "--jobs", "2", *TINY]  # fmt: skip
    done = _sweep(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert len(rows) == 2 + 4  # msl × 2 inference widths, bear × 2 λ × 2 widths
    assert {r["loss"] for r in rows} == {"msl", "bear"} and all(r["status"] == "done" for r in rows)
    assert {"reg_weight", "eval_beam_width", "ndcg@10", "pr@10", "seconds_per_epoch"} <= set(
        rows[0]
    )
    assert {r["reg_weight"] for r in rows if r["loss"] == "msl"} == {""}  # not read by msl
    config = json.loads((out / rows[-1]["cell"] / "config.json").read_text())
    assert config["eval_beam_width"] == int(rows[-1]["eval_beam_width"])
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["axes"] == ["loss", "eval_beam_width", "reg_weight"]  # the flags' order
    assert "sweep_lambda.png" in summary["plots"] and (out / "sweep_widths.png").is_file()
    again = _sweep(*args, "--no-progress")  # how it reports: the finished cells stand
    assert again.returncode == 0 and "6 done before, 0 to run" in again.stdout
    # a fixed flag changed: the finished cells ran otherwise (they were reused silently before)
    other = [("2" if a == "1" and args[i - 1] == "--epochs" else a) for i, a in enumerate(args)]
    refused = _sweep(*other)
    assert refused.returncode == 2 and "nothing was run" in refused.stderr
    assert "--epochs is 2 but the run used 1" in refused.stderr


def test_a_bad_value_or_flag_is_refused_before_any_cell_runs(synth, tmp_path, capsys):
    out = tmp_path / "bad"
    code = main(["sweep", "--data", str(synth), "--out", str(out), "--reg-weight", "1", "-2",
                 *TINY])  # fmt: skip
    assert (
        code == 2
        and "sweep cell reg_weight--2.0: --reg-weight: got -2.0" in capsys.readouterr().err
    )
    assert not out.exists()
    with pytest.raises(SystemExit):
        main(["sweep", "--data", str(synth), "--out", str(out), "--no-such-flag", "1"])
    assert main(["sweep", "--data", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert not out.exists()


def test_a_failing_cell_is_recorded_and_the_others_run(synth, tmp_path):
    out = tmp_path / "failing"
    missing = str(tmp_path / "no_model")
    done = _sweep("--data", str(synth), "--out", str(out), "--model", "tiny", missing, *TINY)
    assert done.returncode == 1
    rows = {r["model"]: r for r in csv.DictReader((out / "sweep.csv").open())}
    assert rows["tiny"]["status"] == "done"
    assert rows[missing]["status"] == "failed" and "no_model" in rows[missing]["error"]
    assert (out / "logs").is_dir()


def test_the_inference_width_defaults_to_the_training_width(synth, tmp_path):
    assert EvalSettings.from_config(tiny_config(synth, tmp_path, beam_width=4)).beam_width == 4
    wider = tiny_config(synth, tmp_path, beam_width=4, eval_beam_width=7)
    assert EvalSettings.from_config(wider).beam_width == 7


def test_plot_series_are_in_reading_order():
    from bear.sweep_report import ordered

    # by value, not as text ("10.0" sorts before "4.0"); names after numbers
    assert ordered([10.0, 0.25, 4.0, 0.0, 1.0, 4.0]) == [0.0, 0.25, 1.0, 4.0, 10.0]
    assert ordered(x for x in ["msl", 5, "bear", 20, 10]) == [5, 10, 20, "bear", "msl"]


def test_a_loss_runs_once_over_training_widths_it_does_not_read(synth, tmp_path):
    """msl trains without B: once --eval-beam-width fixes the inference width, its cells do not
    repeat over --beam-width (they did: a third of a widths grid ran msl three times over);
    without --eval-beam-width, B is its inference width and each value is a cell."""
    from bear.sweep import cells_of

    base = {"data": [str(synth)], "epochs": [1]}
    grid = base | {"loss": ["msl", "bear"], "beam_width": [5, 10], "eval_beam_width": [5, 10]}
    names = [c.name for c in cells_of(grid, tmp_path)]
    assert names == [
        "loss-msl__eval_beam_width-5",
        "loss-msl__eval_beam_width-10",
        "loss-bear__beam_width-5__eval_beam_width-5",
        "loss-bear__beam_width-5__eval_beam_width-10",
        "loss-bear__beam_width-10__eval_beam_width-5",
        "loss-bear__beam_width-10__eval_beam_width-10",
    ]
    alone = cells_of(base | {"loss": ["msl"], "beam_width": [5, 10]}, tmp_path)
    assert [c.name for c in alone] == ["beam_width-5", "beam_width-10"]

"""``--config FILE`` for train and sweep (a run's config.json works as one), and ``--help`` in
groups."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from bear.cli import build_parser, config_from_args, main, parse_args, sweep_grid
from bear.config import FLAG_GROUPS, TrainConfig
from bear.config_file import RUN_RECORD_KEYS
from tests._helpers_train import tiny_config, tiny_synth


def _settings(config: TrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _train_config(argv: list[str]) -> TrainConfig:
    args = parse_args(argv)
    return config_from_args(TrainConfig, args, args.config_values)


def test_a_config_file_trains_and_a_runs_config_json_reproduces_its_settings(tmp_path):
    data = tiny_synth(tmp_path / "data")
    wanted = tiny_config(data, tmp_path / "run", loss="bear", beam_width=4, weight_decay=0.01)
    file = tmp_path / "tiny.json"
    settings = {k: v for k, v in _settings(wanted).items() if k != "out"}
    file.write_text(json.dumps(settings))
    assert main(["train", "--config", str(file), "--out", str(tmp_path / "run")]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert {k: v for k, v in saved.items() if k not in RUN_RECORD_KEYS} == _settings(wanted)

    # the run's config.json read back as a config: the same settings, a flag overrides one
    again = _train_config(["train", "--config", str(tmp_path / "run" / "config.json")])
    assert _settings(again) == _settings(wanted)
    other = _train_config(
        ["train", "--config", str(tmp_path / "run" / "config.json"), "--out", "x", "--lr", "0.5"]
    )
    assert (other.lr, other.out, other.weight_decay) == (0.5, "x", 0.01)
    # what its protocol filled is filled again by the protocol in force
    upstream = _train_config(
        ["train", "--config", str(tmp_path / "run" / "config.json"), "--protocol", "upstream"]
    )
    reference = TrainConfig(data=str(data), out="y", protocol="upstream")
    assert upstream.train_file == reference.train_file != wanted.train_file
    assert upstream.length_penalty == reference.length_penalty != wanted.length_penalty


def test_switches_in_the_file_and_on_the_command_line(tmp_path):
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"data": "d", "out": "o", "progress": False, "validate": True}))
    quiet = _train_config(["train", "--config", str(file)])
    assert (quiet.progress, quiet.validate) == (False, True)
    file.write_text(json.dumps({"data": "d", "out": "o", "progress": True}))
    assert _train_config(["train", "--config", str(file), "--no-progress"]).progress is False
    assert _train_config(["train", "--config", str(file), "--resume"]).resume is True


def _run_config(tmp_path, **settings) -> Path:
    """A config.json as train writes it (settings, then the run's records), without training."""
    from bear.protocol import resolved_settings

    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    config = TrainConfig(data=str(data), out=str(tmp_path / "run"), **settings)
    saved = dataclasses.asdict(config) | {
        "protocol_settings": resolved_settings(config),
        "data_resolved": str(data.resolve()),
        "data_fingerprint": {},
    }
    file = tmp_path / "config.json"
    file.write_text(json.dumps(saved))
    return file


def test_a_runs_explicit_settings_survive_and_what_it_derived_is_derived_again(tmp_path):
    chosen = dict(length_penalty=0.5, test_file="mine.csv", normalisation="micro-batch",
                  lr=3e-4, batch_size=8, micro_batch_size=4)  # fmt: skip
    again = _train_config(["train", "--config", str(_run_config(tmp_path, **chosen))])
    assert {k: getattr(again, k) for k in chosen} == chosen
    derived = _run_config(tmp_path, batch_size=8)  # lr, micro-batch, protocol files derived
    moved = _train_config(["train", "--config", str(derived), "--model", str(tmp_path),
                           "--batch-size", "16", "--protocol", "upstream"])  # fmt: skip
    assert (moved.lr, moved.micro_batch_size, moved.length_penalty) == (1e-4, 16, 1.0)
    assert moved.train_file == TrainConfig(data="d", out="o", protocol="upstream").train_file


def test_a_runs_launch_switches_are_not_settings(tmp_path):
    """A resumed or overwriting run records resume / overwrite true; reusing its config.json
    neither resumes nor overwrites; a hand-written file may not set them."""
    file = _run_config(tmp_path, resume=True, overwrite=True, allow_data_change=True)
    again = _train_config(["train", "--config", str(file), "--out", "elsewhere"])
    assert (again.resume, again.overwrite, again.allow_data_change) == (False, False, False)
    hand = tmp_path / "hand.json"
    hand.write_text(json.dumps({"data": "d", "out": "o", "overwrite": True}))
    with pytest.raises(ValueError, match=r"\['overwrite'\] belong to one launch"):
        parse_args(["train", "--config", str(hand)])


def test_a_sweep_file_keeps_its_data_axis_and_floats(tmp_path):
    file = tmp_path / "grid.json"
    file.write_text(json.dumps({"data": ["a", "b"], "reg_weight": [1, 2], "data_resolved": "x"}))
    grid = sweep_grid(parse_args(["sweep", "--config", str(file), "--out", "s"]))
    assert grid["data"] == ["a", "b"]
    assert grid["reg_weight"] == [1.0, 2.0] and all(
        isinstance(v, float) for v in grid["reg_weight"]
    )


def test_required_flags_may_come_from_the_file_and_are_still_required_without_it(tmp_path):
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"data": "d"}))
    with pytest.raises(SystemExit):
        parse_args(["train", "--config", str(file)])  # --out is in neither
    assert _train_config(["train", "--config", str(file), "--out", "o"]).data == "d"


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"lrr": 0.1}', "unknown keys ['lrr']; lrr: did you mean lr?"),
        ('{"epochs": "three"}', "epochs: got 'three', expected int"),
        ('{"lr": [0.1, 0.2]}', "lr: got [0.1, 0.2], expected float or null (one value"),
        ('{"lora_targets": "q_proj"}', "lora_targets: got 'q_proj', expected a list of str"),
        ('{"progress": 1}', "progress: got 1, expected bool"),
        ("[1, 2]", "a JSON list; write one object of settings"),
        ("{lr: 1}", "not JSON"),
    ],
)
def test_a_bad_file_is_one_line_naming_the_file_and_the_key(tmp_path, capsys, content, message):
    file = tmp_path / "c.json"
    file.write_text(content)
    assert main(["train", "--config", str(file), "--data", "d", "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bear train: error: --config {file}: ") and message in err
    assert err.count("\n") == 1


def test_a_missing_file_is_named(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "none.json"), "--data", "d"]) == 2
    assert "none.json: cannot read it (No such file or directory)" in capsys.readouterr().err


def test_sweep_takes_a_file_whose_lists_are_axes_and_keeps_its_own_folder(tmp_path):
    file = tmp_path / "grid.json"
    settings = {"data": "d", "out": "elsewhere", "resume": False, "reg_weight": [0.5, 1.0]}
    file.write_text(json.dumps({**settings, "lora_targets": ["q_proj", "k_proj"]}))
    args = parse_args(["sweep", "--config", str(file), "--out", "s", "--seed", "0", "1"])
    grid = sweep_grid(args)
    assert grid["reg_weight"] == [0.5, 1.0] and grid["seed"] == [0, 1]
    assert grid["lora_targets"] == [("q_proj", "k_proj")]  # one value, not an axis
    assert "out" not in grid and "resume" not in grid and args.out == "s"


def test_sweep_takes_a_tuple_flag_as_one_value_not_an_axis():
    args = parse_args(["sweep", "--data", "d", "--out", "s", "--lora-targets", "q_proj", "v_proj"])
    assert sweep_grid(args)["lora_targets"] == [("q_proj", "v_proj")]


def test_every_setting_sits_in_one_help_group():
    grouped = [name for members in FLAG_GROUPS.values() for name in members]
    assert sorted(grouped) == sorted(f.name for f in dataclasses.fields(TrainConfig))
    helps = build_parser()._subparsers._group_actions[0].choices
    text = helps["train"].format_help()
    positions = [text.index(f"\n{title}:\n") for title in FLAG_GROUPS]
    assert positions == sorted(positions)
    assert text.index("\n  --reg-weight") > text.index("\nloss:\n") > text.index("\n  --lora-r")
    assert "\nevaluation:\n" in helps["evaluate"].format_help()

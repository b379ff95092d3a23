"""The command line: every flag documented, synth/train/evaluate end to end on a tiny run."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from _helpers_train import TINY_SYNTH

from bear.cli import build_parser, config_from_args, main
from bear.config import TrainConfig
from bear.data import load_dataset

REPO = Path(__file__).resolve().parents[1]


def test_every_flag_has_help_text():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == {"synth", "train", "sweep", "evaluate", "demo"}
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings} has no help text"
    train = subparsers.choices["train"]
    flags = {s for a in train._actions for s in a.option_strings}
    spec = {"--data", "--out", "--loss", "--model", "--epochs", "--max-steps", "--limit-eval",
            "--seed", "--beam-width", "--reg-weight", "--reg-temperature", "--lr",
            "--batch-size", "--overwrite", "--resume"}  # fmt: skip
    assert spec <= flags


def test_train_flags_come_from_train_config():
    """No flag given: the config equals TrainConfig's defaults; each flag sets its field."""
    parser = build_parser()
    args = parser.parse_args(["train", "--data", "d", "--out", "o"])
    assert config_from_args(TrainConfig, args) == TrainConfig(data="d", out="o")
    argv = ["train", "--data", "d", "--out", "o", "--loss", "sft", "--max-steps", "5",
            "--reg-weight", "0.5", "--lr", "0.01", "--lora-targets", "k_proj", "o_proj",
            "--resume", "--no-progress", "--no-eval"]  # fmt: skip
    cfg = config_from_args(TrainConfig, parser.parse_args(argv))
    assert (cfg.loss, cfg.max_steps, cfg.reg_weight, cfg.lr) == ("sft", 5, 0.5, 0.01)
    assert cfg.lora_targets == ("k_proj", "o_proj")
    assert cfg.resume and not cfg.progress and not cfg.validate and not cfg.overwrite


def test_train_rejects_a_non_positive_count_and_an_unknown_loss(capsys):
    parser = build_parser()
    for bad in (["--epochs", "0"], ["--loss", "nope"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["train", "--data", "d", "--out", "o", *bad])
        assert bad[0] in capsys.readouterr().err


def test_input_errors_print_one_line_and_exit_2(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["train", "--data", str(missing), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bear train: error:") and str(missing) in err
    assert not (tmp_path / "run").exists()


def test_module_entry_point_prints_help():
    out = subprocess.run([sys.executable, "-m", "bear", "--help"], capture_output=True, text=True,
                         cwd=REPO, check=True)  # fmt: skip
    assert "demo" in out.stdout and "train" in out.stdout


def test_synth_train_evaluate(tmp_path, capsys):
    data = tmp_path / "data"
    assert (
        main(["synth", "--out", str(data), "--seed", "3", "--users", str(TINY_SYNTH.num_users)])
        == 0
    )
    assert len(load_dataset(data).test) == TINY_SYNTH.num_users
    run = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(run), "--loss", "bear", "--epochs", "1",
            "--limit-train", "16", "--batch-size", "8", "--vocab-size", "320", "--hidden-size",
            "32", "--num-layers", "1", "--max-history", "4", "--limit-eval", "2",
            "--beam-width", "4", "--no-progress", "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    trained = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**trained, "test": {}}))
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--device", "cpu"]) == 0
    again = json.loads((run / "metrics.json").read_text())
    assert again["test"] == trained["test"] and again["valid"] == trained["valid"]
    assert again["best_epoch"] == trained["best_epoch"] == 1
    assert json.loads(capsys.readouterr().out)["test"] == trained["test"]


def test_evaluation_records_no_gradients(tmp_path):
    """Every forward of evaluate_split (prefill, beam search, teacher forcing, the exact count)
    runs without autograd: with it, each test batch would keep its activations alive."""
    import torch
    from _helpers_train import tiny_config, tiny_synth

    import bear.evaluate
    from bear.run import build_setup

    cfg = tiny_config(tiny_synth(tmp_path / "data"), tmp_path / "run")
    setup = build_setup(cfg, tmp_path / "run", fresh=True)
    grad_enabled = []
    hook = setup.model.register_forward_pre_hook(
        lambda module, args: grad_enabled.append(torch.is_grad_enabled())
    )
    settings = bear.evaluate.EvalSettings(beam_width=4, scoring="before", limit=4)
    bear.evaluate.evaluate_split(setup.model, setup, "test", settings)
    hook.remove()
    assert len(grad_enabled) > 3 and not any(grad_enabled)
    assert torch.is_grad_enabled()


def test_evaluation_shows_progress_only_when_asked(tmp_path, capsys, monkeypatch):
    """A long test shows a bar of the decoded rows on stderr with progress=True, nothing without;
    the bar counts every row by the time it closes (read from the bar, not from its redraws,
    which tqdm throttles in time)."""
    from _helpers_train import tiny_config, tiny_synth
    from tqdm import tqdm

    import bear.evaluate
    from bear.run import build_setup

    closed_at = []

    class Recording(tqdm):
        def close(self):
            if not self.disable:  # a shown bar, closed for the first time
                closed_at.append((self.n, self.total))
            super().close()

    monkeypatch.setattr(bear.evaluate, "tqdm", Recording)
    cfg = tiny_config(tiny_synth(tmp_path / "data"), tmp_path / "run")
    setup = build_setup(cfg, tmp_path / "run", fresh=True)
    settings = bear.evaluate.EvalSettings(beam_width=4, scoring="before", limit=6, batch_size=4)
    bear.evaluate.evaluate_split(setup.model, setup, "test", settings)
    assert capsys.readouterr().err == ""
    shown = dataclasses.replace(settings, progress=True)
    bear.evaluate.evaluate_split(setup.model, setup, "test", shown)
    assert "test (full)" in capsys.readouterr().err
    assert closed_at == [(6, 6)]


def test_evaluation_batches_prompts_of_similar_length(tmp_path, monkeypatch):
    """evaluate_split decodes the rows in order of prompt length (least left padding per
    batch) and gives the metrics of decoding each row alone."""
    from _helpers_train import tiny_config, tiny_synth

    import bear.evaluate
    from bear.run import build_setup

    cfg = tiny_config(tiny_synth(tmp_path / "data"), tmp_path / "run")
    setup = build_setup(cfg, tmp_path / "run", fresh=True)
    lengths, collate = [], bear.evaluate.collate

    def recording_collate(prompts, *args):
        lengths.extend(len(p) for p in prompts)
        return collate(prompts, *args)

    monkeypatch.setattr(bear.evaluate, "collate", recording_collate)
    settings = bear.evaluate.EvalSettings(beam_width=4, scoring="before", limit=12, batch_size=4)
    batched = bear.evaluate.evaluate_split(setup.model, setup, "test", settings)
    assert len(set(lengths)) > 1 and lengths == sorted(lengths)
    assert [len(p) for p in setup.prompts["test"][:12]] != lengths  # the split's order differs
    one_by_one = dataclasses.replace(settings, batch_size=1)
    alone = bear.evaluate.evaluate_split(setup.model, setup, "test", one_by_one)
    assert batched == alone


def test_exact_budget_flag_reaches_the_test_metrics(tmp_path):
    """--exact-budget bounds the exact search of the final test: with 1 expansion per row no
    row's exact rank is decided by a full search, so every searched row is undecided."""
    import json

    from _helpers_train import tiny_synth

    data = tiny_synth(tmp_path / "data")
    run = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(run), "--loss", "sft", "--epochs", "1",
            "--limit-train", "16", "--limit-eval", "4", "--vocab-size", "320", "--hidden-size",
            "32", "--num-layers", "1", "--max-history", "4", "--device", "cpu", "--no-progress",
            "--exact-budget", "1"]  # fmt: skip
    assert main(args) == 0
    test = json.loads((run / "metrics.json").read_text())["test"]
    assert test["exact_undecided"] > 0
    assert test["exact_undecided"] + test["pr@10_count"] <= test["users"]


def test_exact_search_shortcut_agrees_with_searching_every_row(tmp_path):
    """evaluate_split skips exact_topk where the beam proves the target is outside the exact
    top-10; the metrics equal those of running exact_topk on every row."""
    import torch
    from _helpers_train import tiny_config, tiny_synth

    from bear.evaluate import EvalSettings, evaluate_split
    from bear.run import build_setup
    from bear.train import train

    data = tiny_synth(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "run", loss="sft", epochs=2, limit_train=64, validate=False)
    train(cfg)
    setup = build_setup(cfg, tmp_path / "run", fresh=False)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)["model"]
    setup.model.load_state_dict(state, strict=False)
    for scoring in ("after", "before"):
        for alpha in (0.0, 1.0):  # α = 1: the beam's scores are compared at α = 0
            settings = EvalSettings(beam_width=4, scoring=scoring, length_penalty=alpha, limit=4)
            args = (setup.model, setup, "test", settings)
            assert evaluate_split(*args) == evaluate_split(*args, exact_all=True)

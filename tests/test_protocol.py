"""The two protocols through the CLI (SPEC §3, §7): ours and the paper's, each labelled."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _helpers_train import tiny_config, tiny_synth, write_six_columns

from bear.cli import main
from bear.losses import build_loss
from bear.report import max_over_epochs
from bear.run import build_setup
from bear.train_step import StepContext, accumulate_gradients, micro_batches

TINY = ["--vocab-size", "320", "--hidden-size", "32", "--num-layers", "1", "--max-history", "4",
        "--limit-train", "16", "--batch-size", "8", "--limit-eval", "3", "--beam-width", "4",
        "--no-progress", "--device", "cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def paper_data(tmp_path_factory):
    """A synthetic folder with the paper's file names; its test file has upstream's six columns."""
    folder = tiny_synth(tmp_path_factory.mktemp("protocol") / "synth")
    shutil.copy(folder / "train.csv", folder / "train_10000.csv")
    write_six_columns(folder / "test.csv", folder / "test_5000.csv")
    return folder


def test_upstream_protocol_end_to_end(paper_data, tmp_path, capsys):
    run = tmp_path / "up"
    args = ["train", "--data", str(paper_data), "--out", str(run), "--loss", "msl",
            "--epochs", "2", "--protocol", "upstream", *TINY]  # fmt: skip
    assert main(args) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["protocol"] == "upstream" and metrics["length_penalty"] == 1.0
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert "valid" not in metrics
    for key, best in metrics["test_max"].items():
        assert best == max(e["test"][key] for e in metrics["epochs"])
    config = json.loads((run / "config.json").read_text())
    settings = config["protocol_settings"]
    assert (config["train_file"], config["test_file"]) == ("train_10000.csv", "test_5000.csv")
    assert settings["length_penalty"] == 1.0 and settings["validation"] is False
    assert settings["normalisation"] == "micro-batch" and "max" in settings["selection"]
    assert settings["inference_prompt"] == "two spaces"
    assert (run / "epoch_1.pt").is_file() and (run / "epoch_2.pt").is_file()
    # evaluate re-tests every epoch's checkpoint and gets the same numbers
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--device", "cpu"]) == 0
    again = json.loads((run / "metrics.json").read_text())
    assert again["epochs"] == metrics["epochs"] and again["test_max"] == metrics["test_max"]
    # a run's protocol is fixed by training
    assert main(["evaluate", "--run", str(run), "--protocol", "ours"]) == 2
    assert "trained under 'upstream'" in capsys.readouterr().err


def test_upstream_protocol_uses_every_row_and_the_inference_prompt(paper_data, tmp_path):
    cfg = tiny_config(paper_data, tmp_path / "r", protocol="upstream", limit_train=None)
    setup = build_setup(cfg, tmp_path / "r", fresh=True)
    n_rows = len((paper_data / "train_10000.csv").read_text().splitlines()) - 1
    assert len(setup.data.train) == n_rows and setup.data.valid == []
    decode = setup.tokenizer.decode
    assert "the request.  \n" in decode(setup.prompts["test"][0])
    assert "the request. \n" in decode(setup.prompts["train"][0])


def test_ours_protocol_is_labelled_and_takes_a_length_penalty(paper_data, tmp_path, capsys):
    run = tmp_path / "ours"
    args = ["train", "--data", str(paper_data), "--out", str(run), "--loss", "bear",
            "--epochs", "1", "--length-penalty", "0.5", *TINY]  # fmt: skip
    assert main(args) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["protocol"] == "ours" and metrics["length_penalty"] == 0.5
    assert set(metrics) >= {"valid", "test", "best_epoch"}
    config = json.loads((run / "config.json").read_text())
    assert (config["train_file"], config["test_file"]) == ("train.csv", "test.csv")
    assert config["protocol_settings"]["normalisation"] == "step"
    assert main(["evaluate", "--run", str(run), "--length-penalty", "0", "--device", "cpu"]) == 0
    assert json.loads((run / "metrics.json").read_text())["length_penalty"] == 0.0


def test_upstream_protocol_needs_the_papers_files(tmp_path, capsys):
    data = tiny_synth(tmp_path / "synth")  # train.csv / test.csv only
    args = ["train", "--data", str(data), "--out", str(tmp_path / "r"), "--protocol", "upstream"]
    assert main(args) == 2
    assert "train_10000.csv: missing file" in capsys.readouterr().err


def test_upstream_protocol_tests_on_test_csv_where_the_release_has_no_test_5000(tmp_path):
    data = tiny_synth(tmp_path / "synth")  # Office's layout: train_10000.csv, test.csv only
    shutil.copy(data / "train.csv", data / "train_10000.csv")
    cfg = tiny_config(data, tmp_path / "r", protocol="upstream")
    assert (cfg.train_file, cfg.test_file) == ("train_10000.csv", "test.csv")
    (data / "test_5000.csv").write_bytes((data / "test.csv").read_bytes())
    assert tiny_config(data, tmp_path / "r2", protocol="upstream").test_file == "test_5000.csv"
    assert tiny_config(data, tmp_path / "r3", protocol="upstream", test_file="x.csv").test_file == (
        "x.csv"
    )


def test_max_over_epochs_skips_null_metrics():
    epochs = [
        {"epoch": 1, "test": {"ndcg@10": 0.1, "hr@10": None, "pr@10": 0.9}},
        {"epoch": 2, "test": {"ndcg@10": 0.3, "hr@10": None, "pr@10": 0.2}},
        {"epoch": 3, "test": {"ndcg@10": None, "hr@10": None}},
    ]
    best = max_over_epochs(epochs)
    assert best["ndcg@10"] == 0.3 and best["hr@10"] is None
    assert "pr@10" not in best  # lower is better: not a maximum upstream reports
    assert max_over_epochs([])["ndcg@5"] is None


@pytest.mark.parametrize("loss", ["msl", "bear-upstream"])
def test_micro_batch_normalisation_averages_micro_batch_means(paper_data, tmp_path, loss):
    """Upstream's normalisation: a step of micro-batches 4 + 4 has the mean gradient of the two
    micro-batches each taken as a whole step (as DDP averages upstream's per-GPU losses); it
    depends on the micro-batch size, unlike the step normalisation."""
    cfg = tiny_config(paper_data, tmp_path / "r", loss=loss, limit_train=8, batch_size=8,
                      normalisation="micro-batch", beam_width=4)  # fmt: skip
    setup = build_setup(cfg, tmp_path / "r", fresh=True)
    model, trie, cpu = setup.model.float(), setup.trie, torch.device("cpu")
    loss, ctx = build_loss(cfg.loss_settings()), StepContext(model, trie, cpu)

    def grad(idx, micro_size):
        model.zero_grad()
        accumulate_gradients(ctx, micro_batches(setup, idx, loss, ctx, micro_size), loss)
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    split = grad(list(range(8)), 4)
    halves = [grad(list(range(4)), 4), grad(list(range(4, 8)), 4)]
    whole = grad(list(range(8)), 8)
    for name in split:
        want = (halves[0][name] + halves[1][name]) / 2
        torch.testing.assert_close(split[name], want, atol=1e-7, rtol=1e-5, msg=name)
    assert any(not torch.allclose(split[n], whole[n], atol=1e-6) for n in split)

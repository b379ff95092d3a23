"""The training loop: accumulation = one large batch, 2 DDP processes = 1, resume = uninterrupted,
run-folder rules. Tiny settings; no timing assertions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _helpers_train import last_weights, tiny_config, tiny_synth

from bear.data import DataError
from bear.losses import LossSettings
from bear.run import build_setup
from bear.train import _micro_batches, accumulate_gradients, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return tiny_synth(tmp_path_factory.mktemp("train") / "synth")


def _assert_same_weights(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-5, msg=name)


@pytest.mark.parametrize("loss", ["sft", "msl", "bear", "bear-upstream", "beam-sim"])
def test_accumulated_gradient_equals_one_large_batch(synth, tmp_path, loss):
    """The gradient of 7 examples as micro-batches of 3, 3 and 1 (a partial last window) equals
    the gradient of one batch of 7, for every loss under the step normalisation."""
    cfg = tiny_config(synth, tmp_path / "r", loss=loss, limit_train=7, batch_size=7)
    setup = build_setup(cfg, tmp_path / "r", fresh=True)
    model, trie = setup.model.float(), setup.trie
    settings = LossSettings(loss, beam_width=4)
    idx = list(range(7))
    grads = []
    for micro_size in (7, 3):
        cfg.micro_batch_size = micro_size
        model.zero_grad()
        micro = _micro_batches(setup, idx, cfg, trie, torch.device("cpu"))
        accumulate_gradients(model, micro, settings, trie, torch.device("cpu"))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-7, rtol=1e-5, msg=name)


@pytest.mark.parametrize("loss", ["sft", "bear"])
def test_accumulation_equals_one_large_batch(synth, tmp_path, loss):
    """7 examples per step as micro-batches of 3, 3 and 1 (a partial last window) give the same
    update as one batch of 7: each micro-batch is normalised by the counted rows of the step."""
    common = dict(loss=loss, limit_train=14, batch_size=7, validate=False, epochs=1)
    train(tiny_config(synth, tmp_path / "big", **common))
    train(tiny_config(synth, tmp_path / "acc", micro_batch_size=3, **common))
    # two AdamW steps: Adam's normalisation amplifies float noise in near-zero gradients to ~1e-6
    _assert_same_weights(last_weights(tmp_path / "big"), last_weights(tmp_path / "acc"), 1e-5)


def test_two_ddp_processes_equal_one(synth, tmp_path):
    """torchrun --nproc_per_node 2 (gloo, CPU) reaches the weights of a single process."""
    args = ["--data", str(synth), "--loss", "bear", "--epochs", "1", "--limit-train", "16",
            "--batch-size", "8", "--vocab-size", "320", "--hidden-size", "32", "--num-layers", "1",
            "--max-history", "4", "--no-eval", "--no-progress", "--device", "cpu"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", "29517"]  # fmt: skip
    subprocess.run([*torchrun, "-m", "bear", "train", "--out", str(tmp_path / "ddp"), *args],
                   check=True, env=env, cwd=REPO, capture_output=True)  # fmt: skip
    subprocess.run([sys.executable, "-m", "bear", "train", "--out", str(tmp_path / "one"), *args],
                   check=True, env=env, cwd=REPO, capture_output=True)  # fmt: skip
    _assert_same_weights(last_weights(tmp_path / "one"), last_weights(tmp_path / "ddp"), 1e-5)
    log = [json.loads(x) for x in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert log[0]["world_size"] == 2


def test_resume_continues_to_the_uninterrupted_result(synth, tmp_path):
    """Stop after 4 of 6 optimiser steps (mid epoch 2), resume: the same weights and metrics."""
    common = dict(loss="bear", epochs=2, limit_train=24, batch_size=8, limit_eval=1, beam_width=4)
    whole = train(tiny_config(synth, tmp_path / "whole", **common))
    part = tiny_config(synth, tmp_path / "part", max_steps=4, **common)
    stopped = train(part)
    assert stopped["checkpoint"] in ("best.pt", "partial.pt")
    resumed = train(tiny_config(synth, tmp_path / "part", resume=True, **common))
    _assert_same_weights(last_weights(tmp_path / "whole"), last_weights(tmp_path / "part"), 0)
    assert resumed["valid"] == whole["valid"] and resumed["test"] == whole["test"]
    assert resumed["best_epoch"] == whole["best_epoch"]
    run = tmp_path / "whole"
    assert {"config.json", "log.jsonl", "last.pt", "best.pt", "metrics.json", "curves.png"} <= {
        p.name for p in run.iterdir()
    }
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == [".bear-run"]  # no temp
    metrics = json.loads((run / "metrics.json").read_text())
    keys = {"ndcg@1", "ndcg@5", "ndcg@10", "hr@1", "hr@5", "hr@10", "pr@5", "pr@10"}
    counts = {"users", "pr@5_count", "pr@10_count", "violation_share_count"}  # denominators
    assert keys | {"violation_share"} | counts == set(metrics["test"]) == set(metrics["valid"])
    assert metrics["seconds_per_epoch"] > 0 and metrics["best_epoch"] in (1, 2)


def test_run_folder_needs_overwrite_and_bad_data_writes_nothing(synth, tmp_path):
    cfg = tiny_config(synth, tmp_path / "run", validate=False)
    train(cfg)
    with pytest.raises(FileExistsError, match="--overwrite"):
        train(cfg)
    train(tiny_config(synth, tmp_path / "run", validate=False, overwrite=True))
    with pytest.raises(DataError, match="does not exist"):
        train(tiny_config(tmp_path / "missing", tmp_path / "never"))
    assert not (tmp_path / "never").exists()
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(tiny_config(synth, tmp_path / "fresh", resume=True))


def test_local_checkpoint_gets_lora_adapters(synth, tmp_path):
    """--model PATH: a saved Hugging Face checkpoint is fine-tuned through LoRA on q_proj, v_proj
    (only the adapters are trained and saved)."""
    from bear.data import load_dataset
    from bear.model import TinyConfig, build_tiny_model
    from bear.prompts import format_prompt, format_response
    from bear.tokenizer import train_tokenizer

    data = load_dataset(synth)
    texts = [format_response(t) for t in data.titles.values()] + [format_prompt(["a"], "generic")]
    tok = train_tokenizer(texts, 400)
    size = TinyConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2)  # fmt: skip
    model = build_tiny_model(len(tok), tok.pad_token_id, tok.eos_token_id, size, seed=0)
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    train(tiny_config(synth, tmp_path / "run", model=str(tmp_path / "ckpt"), validate=False))
    names = sorted(last_weights(tmp_path / "run"))
    assert len(names) == 4 and all("lora_" in n for n in names)
    assert {n.split(".")[-4] for n in names} == {"q_proj", "v_proj"}

"""The training loop: accumulation = one large batch, resume = uninterrupted, run-folder rules
(several processes: test_distributed.py). Tiny settings; no timing assertions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _helpers_train import last_weights, tiny_checkpoint, tiny_config, tiny_synth

from bear.data import DataError
from bear.losses import LossSettings, build_loss
from bear.run import build_setup
from bear.train import train
from bear.train_step import StepContext, accumulate_gradients, micro_batches

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
        ctx = StepContext(model, trie, torch.device("cpu"))
        micro = micro_batches(setup, idx, build_loss(settings), ctx, micro_size)
        accumulate_gradients(ctx, micro, build_loss(settings))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-7, rtol=1e-5, msg=name)


def _padding(micro) -> int:
    """Padding positions of a step's micro-batches (prompt and response windows)."""
    return sum(int((~m.batch.attention_mask.bool()).sum()) for m in micro)


@pytest.mark.parametrize("normalisation", ["step", "micro-batch"])
def test_micro_batches_grouped_by_length_only_under_step(synth, tmp_path, normalisation):
    """Under step normalisation a step's rows are split into micro-batches in order of length
    (less padding, same gradient: test above); under upstream's micro-batch normalisation the
    split changes the loss, so the rows keep the step's order."""
    cfg = tiny_config(synth, tmp_path / "r", limit_train=40, micro_batch_size=2,
                      normalisation=normalisation)  # fmt: skip
    setup = build_setup(cfg, tmp_path / "r", fresh=True)
    prompts, targets = setup.prompts["train"], setup.targets["train"]
    lengths = [len(p) + len(setup.items[t]) for p, t in zip(prompts, targets, strict=True)]
    idx = sorted(range(40), key=lambda i: (lengths[i] * 7919) % 97)[:8]  # a scrambled step
    assert sorted(lengths[i] for i in idx) != [lengths[i] for i in idx]
    ctx = StepContext(setup.model, setup.trie, torch.device("cpu"))
    micro = micro_batches(setup, idx, build_loss(cfg.loss_settings()), ctx, cfg.micro_batch_size)
    rows = [
        int(m.batch.attention_mask.sum(1)[k]) for m in micro for k in range(len(m.batch.target))
    ]
    expected = (
        sorted(lengths[i] for i in idx) if normalisation == "step" else [lengths[i] for i in idx]
    )
    assert rows == expected
    if normalisation == "step":
        cfg.normalisation = "micro-batch"
        loss = build_loss(cfg.loss_settings())
        kept = micro_batches(setup, idx, loss, ctx, cfg.micro_batch_size)
        assert _padding(micro) < _padding(kept)


@pytest.mark.parametrize("loss", ["sft", "bear"])
def test_accumulation_equals_one_large_batch(synth, tmp_path, loss):
    """7 examples per step as micro-batches of 3, 3 and 1 (a partial last window) give the same
    update as one batch of 7: each micro-batch is normalised by the counted rows of the step."""
    common = dict(loss=loss, limit_train=14, batch_size=7, validate=False, epochs=1)
    train(tiny_config(synth, tmp_path / "big", **common))
    train(tiny_config(synth, tmp_path / "acc", micro_batch_size=3, **common))
    # two AdamW steps: Adam's normalisation amplifies float noise in near-zero gradients to ~1e-6
    _assert_same_weights(last_weights(tmp_path / "big"), last_weights(tmp_path / "acc"), 1e-5)


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
    files = {
        "config.json",
        "log.jsonl",
        "last.pt",
        "best.pt",
        "metrics.json",
        "curves.png",
        "model",
    }
    assert files <= {p.name for p in run.iterdir()}
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == [".bear-run"]  # no temp
    metrics = json.loads((run / "metrics.json").read_text())
    keys = {"ndcg@1", "ndcg@5", "ndcg@10", "hr@1", "hr@5", "hr@10", "pr@5", "pr@10"}
    counts = {"users", "pr@5_count", "pr@10_count", "violation_share_count", "exact_undecided"}
    bounds = {"pr@10_low", "pr@10_high"}
    assert keys | {"violation_share"} | counts | bounds == set(metrics["test"])
    assert set(metrics["test"]) == set(metrics["valid"])
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
    tiny_checkpoint(synth, tmp_path / "ckpt")
    train(tiny_config(synth, tmp_path / "run", model=str(tmp_path / "ckpt"), validate=False))
    names = sorted(last_weights(tmp_path / "run"))
    assert len(names) == 4 and all("lora_" in n for n in names)
    assert {n.split(".")[-4] for n in names} == {"q_proj", "v_proj"}


def test_bear_reports_the_ratio_of_its_regulariser_gradient_to_ce(synth, tmp_path):
    """accumulate_gradients' stats: bear's reg_grad_ratio is the mean over the step's counted rows
    of (λ/ξ)·σ(−Δ/ξ), the factor by which the regulariser scales each row's ce gradient; the
    training log carries it per step."""
    from bear.model import response_logits
    from bear_kernels import ce_margin_reference

    cfg = tiny_config(synth, tmp_path / "r", loss="bear", limit_train=7, batch_size=7,
                      micro_batch_size=3, reg_weight=0.7, reg_temperature=0.4)  # fmt: skip
    setup = build_setup(cfg, tmp_path / "r", fresh=True)
    loss = build_loss(cfg.loss_settings())
    ctx = StepContext(setup.model, setup.trie, torch.device("cpu"))
    micro = micro_batches(setup, list(range(7)), loss, ctx, 3)
    stats: dict = {}
    accumulate_gradients(ctx, micro, loss, stats)
    ratios, rows = [], 0
    with torch.no_grad():
        for m in micro:
            logits = response_logits(setup.model, m.batch).double()
            _, margin = ce_margin_reference(logits, m.batch.target, beam_width=cfg.beam_width,
                                            allowed_mask=m.allowed_mask)  # fmt: skip
            ratios.append((0.7 / 0.4 * torch.sigmoid(-margin / 0.4))[m.counted].sum())
            rows += int(m.counted.sum())
    assert stats["reg_grad_ratio"] == pytest.approx(float(sum(ratios)) / rows, rel=1e-5)
    train(tiny_config(synth, tmp_path / "run", loss="bear"))
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all("reg_grad_ratio" in r for r in log if r["event"] == "step")

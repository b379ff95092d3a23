"""Cheap model selection and a learnable catalogue (issue: the real-model study): the
--eval-every validation loss and its early stopping, and --min-item-count."""

from __future__ import annotations

import json

import pytest
import torch
from _helpers_train import tiny_config, tiny_synth

from bear.data import DataError, filter_catalogue, load_dataset
from bear.items import collate
from bear.run import build_setup
from bear.train import train
from bear.train_step import StepContext
from bear.validation import validation_check
from bear_kernels import bear_loss_reference


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return tiny_synth(tmp_path_factory.mktemp("checks") / "synth")


def _events(run, event):
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
            if r["event"] == event]  # fmt: skip


def test_the_check_is_the_mean_cross_entropy_of_each_softmax(synth, tmp_path):
    """check/ce: full-vocabulary cross-entropy per supervised token; check/msl: over the trie
    children per counted token, against the reference loss on the same logits."""
    cfg = tiny_config(synth, tmp_path / "r")
    setup = build_setup(cfg, tmp_path / "r", fresh=True)
    ctx = StepContext(setup.model, setup.trie, torch.device("cpu"))
    got = validation_check(ctx, setup, rows=6, size=4, full_vocabulary=False)
    batch = collate(setup.prompts["valid"][:6], setup.targets["valid"][:6], setup.items,
                    setup.trie, setup.pad_id)  # fmt: skip
    with torch.no_grad():
        logits = setup.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             position_ids=batch.position_ids).logits[:, -batch.width :]  # fmt: skip
    mask = setup.trie.allowed_mask(batch.node_ids.reshape(-1)).reshape(*batch.target.shape, -1)
    kw = dict(reg_weight=0.0, reduction="mean")
    ce = bear_loss_reference(logits.double(), batch.target, **kw)
    msl = bear_loss_reference(logits.double(), batch.target, allowed_mask=mask, **kw)
    assert got["ce"] == pytest.approx(float(ce), rel=1e-5)
    assert got["msl"] == pytest.approx(float(msl), rel=1e-5)
    assert got["loss"] == got["msl"]  # msl trains the children's softmax


def test_checks_are_logged_and_early_stopping_ends_the_run(synth, tmp_path):
    """Every --eval-every steps a check is logged (with the decoded slice's HR@10 and NDCG@10);
    with a learning rate of 20 that makes things worse and patience 1, the run stops at the
    second check instead of running its 9 steps, and reports metrics as a stop mid-epoch does."""
    run = tmp_path / "r"
    cfg = tiny_config(synth, run, limit_train=72, epochs=1, eval_every=2, valid_rows=8,
                      valid_decode_rows=4, early_stopping=1, lr=20.0)  # fmt: skip
    metrics = train(cfg)
    checks = _events(run, "check")
    assert [c["step"] for c in checks][:1] == [2] and {"ce", "msl", "loss", "hr@10"} <= set(
        checks[0]
    )
    losses = [c["loss"] for c in checks]
    stop = next(i for i in range(1, len(losses)) if losses[i] >= min(losses[:i]))
    assert len(checks) == stop + 1  # stopped at the first check without improvement
    steps = [r["step"] for r in _events(run, "step")]
    assert steps[-1] == checks[-1]["step"] < 9
    kept = torch.load(run / "best_check.pt", weights_only=False)
    best = min(checks, key=lambda c: c["loss"])
    assert kept["step"] == best["step"] and kept["check"]["loss"] == best["loss"]
    assert metrics["test"]["users"] == 3


def test_check_flags_need_eval_every(synth, tmp_path):
    with pytest.raises(ValueError, match="--early-stopping: given without --eval-every"):
        tiny_config(synth, tmp_path / "r", early_stopping=2)


def test_min_item_count_keeps_only_items_seen_often_enough(synth):
    data = load_dataset(synth)
    kept = filter_catalogue(data, 3)
    counts = {}
    for e in data.train:
        for i in (e.target, *e.history):
            counts[i] = counts.get(i, 0) + 1
    assert set(kept.titles) == {i for i, c in counts.items() if c >= 3} < set(data.titles)
    for split in ("train", "valid", "test"):
        rows = getattr(kept, split)
        assert rows and all(e.target in kept.titles and e.history for e in rows)
        assert all(set(e.history) <= set(kept.titles) for e in rows)
    with pytest.raises(DataError, match="--min-item-count 100000: leaves 0 of"):
        filter_catalogue(data, 100000)

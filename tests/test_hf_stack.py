"""BEAR in the Hugging Face stack (SPEC §8): the trie's label masks, BEARForCausalLMLoss,
apply_bear_loss, Trainer and TRL with gradient accumulation, two processes."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer
from transformers.loss.loss_utils import ForCausalLMLoss

from bear_kernels import bear_loss, unpack_allowed_mask
from bear_kernels.transformers import BEARForCausalLMLoss, apply_bear_loss, bear_compute_loss_func
from tests._helpers_hf import (
    EOS,
    IGNORE,
    LOSSES,
    VOCAB,
    GradCapture,
    collate,
    examples,
    item_trie,
    reference_grad,
    relative_error,
    tiny_llama,
    tiny_lora,
    training_args,
    word_tokenizer,
)
from tests._helpers_launch import launch

# (per-device batch, accumulation steps): one step of 8 or 9 examples, split three ways
SPLITS = [(8, 1), (2, 4), (3, 3)]
TOLERANCE = 1e-5  # relative error of a step's gradient against the single-batch reference
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ ItemTrie.labels_allowed_mask
def test_labels_allowed_mask_walks_each_row_from_its_first_supervised_label():
    labels = torch.tensor(
        [
            [IGNORE, IGNORE, 5, 10, 11, EOS, IGNORE],  # item 0, right-padded
            [IGNORE, 5, 13, EOS, IGNORE, IGNORE, IGNORE],  # item 2
            [IGNORE] * 7,  # nothing supervised
        ]
    )
    allowed = unpack_allowed_mask(item_trie().labels_allowed_mask(labels), VOCAB)  # (3, 7, V)
    assert item_trie().labels_allowed_mask(labels).dtype == torch.int32

    def tokens(u, t):
        return allowed[u, t].nonzero().squeeze(1).tolist()

    assert [tokens(0, t) for t in range(7)] == [
        [],
        [],
        [5],  # the root: every item starts with 5 (a forced row)
        [10, 13, 20],
        [11, 12],
        [EOS, 14],  # item 0 ends here, item 3 goes on
        [],  # after EOS: the leaf has no children
    ]
    assert [tokens(1, t) for t in range(4)] == [[], [5], [10, 13, 20], [EOS, 30]]
    assert not allowed[2].any()


def test_labels_allowed_mask_rejects_labels_off_the_trie():
    trie = item_trie()
    with pytest.raises(ValueError, match="row 0, position 2 has token 12"):
        trie.labels_allowed_mask(torch.tensor([[IGNORE, 5, 12, EOS]]))
    with pytest.raises(ValueError, match="row 1, position 3 has token 7"):
        trie.labels_allowed_mask(torch.tensor([[5, 13, EOS, IGNORE], [5, 13, EOS, 7]]))
    with pytest.raises(ValueError, match="int64"):
        trie.labels_allowed_mask(torch.tensor([[5, 13]], dtype=torch.int32))


# ------------------------------------------------------------------ BEARForCausalLMLoss
def _logits_labels(seed=0):
    batch = collate(examples(4, seed))
    torch.manual_seed(seed)
    logits = torch.randn(*batch["labels"].shape, VOCAB, dtype=torch.float64)
    return logits, batch["labels"]


def test_sft_options_equal_transformers_own_causal_lm_loss():
    logits, labels = _logits_labels()
    for n in (None, 37):
        ours = BEARForCausalLMLoss(logits, labels, VOCAB, num_items_in_batch=n, reg_weight=0.0)
        theirs = ForCausalLMLoss(logits, labels, VOCAB, num_items_in_batch=n)
        torch.testing.assert_close(ours, theirs.to(ours.dtype))


def test_loss_shifts_logits_labels_and_mask_together():
    logits, labels = _logits_labels(1)
    mask = item_trie().labels_allowed_mask(labels)
    options = dict(beam_width=2, reg_weight=1.5, reg_temperature=0.7)
    shifted = dict(allowed_mask=mask[:, 1:], **options)
    expected_mean = bear_loss(logits[:, :-1], labels[:, 1:], **shifted)
    expected_sum = bear_loss(logits[:, :-1], labels[:, 1:], reduction="sum", **shifted)
    ours = BEARForCausalLMLoss(logits, labels, allowed_mask=mask, **options)
    torch.testing.assert_close(ours, expected_mean)
    ours = BEARForCausalLMLoss(
        logits, labels, num_items_in_batch=torch.tensor(11), allowed_mask=mask, **options
    )
    torch.testing.assert_close(ours, expected_sum / 11)
    pre_shifted = F.pad(labels, (0, 1), value=IGNORE)[:, 1:]
    pre_mask = F.pad(mask, (0, 0, 0, 1))[:, 1:]
    ours = BEARForCausalLMLoss(
        logits, None, shift_labels=pre_shifted, allowed_mask=pre_mask, **options
    )
    torch.testing.assert_close(ours, expected_mean)


def test_a_batch_without_supervised_labels_gives_zero_and_zero_gradients():
    logits = torch.randn(2, 5, VOCAB, requires_grad=True)
    labels = torch.full((2, 5), IGNORE)
    for n in (None, 0):
        loss = BEARForCausalLMLoss(logits, labels, num_items_in_batch=n)
        loss.backward()
        assert loss.item() == 0.0 and not logits.grad.any()


def test_loss_checks_its_arguments():
    logits, labels = _logits_labels()
    with pytest.raises(ValueError, match="vocab_size=66"):
        BEARForCausalLMLoss(logits, labels, vocab_size=66)
    with pytest.raises(ValueError, match="labels must have shape"):
        BEARForCausalLMLoss(logits, labels[:, 1:])
    with pytest.raises(TypeError, match="unknown BEAR option"):
        bear_compute_loss_func(beam_witdh=4)
    with pytest.raises(ValueError, match="reg_temperature"):
        bear_compute_loss_func(reg_temperature=0.0)
    with pytest.raises(TypeError, match="allowed_mask_fn"):
        bear_compute_loss_func(allowed_mask_fn=item_trie())


# ------------------------------------------------------------------ apply_bear_loss
@pytest.mark.parametrize("peft", [False, True], ids=["llama", "peft-llama"])
def test_apply_bear_loss_equals_the_loss_on_full_logits(peft):
    model = tiny_lora() if peft else tiny_llama()
    batch = collate(examples(5, seed=3))
    trie = item_trie()
    options = LOSSES["bear"][1]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = trie.labels_allowed_mask(batch["labels"])
    expected = BEARForCausalLMLoss(
        logits, batch["labels"], num_items_in_batch=9, allowed_mask=mask, **options
    )
    expected.backward()
    expected_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()

    apply_bear_loss(model, allowed_mask_fn=trie.labels_allowed_mask, **options)
    out = model(**batch, num_items_in_batch=9)
    assert out.logits is None  # only the supervised positions were projected
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)
    # without labels, the original forward: full logits, unchanged
    plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(plain, logits)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_a_patched_model_computes_with_its_own_weights(how, tmp_path):
    """copy.deepcopy and torch.save / torch.load carry the BEAR forward with the model: the copy
    gives the same loss, its gradient lands on its own parameters, and it keeps its own guard."""
    import copy

    model = tiny_lora()
    apply_bear_loss(model, allowed_mask_fn=item_trie().labels_allowed_mask, **LOSSES["bear"][1])
    batch = collate(examples(4, seed=7))
    if how == "deepcopy":
        twin = copy.deepcopy(model)
    else:
        torch.save(model, tmp_path / "model.pt")
        twin = torch.load(tmp_path / "model.pt", weights_only=False)
    expected = model(**batch).loss
    out = twin(**batch)
    assert out.logits is None  # still the BEAR forward
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert all(p.grad is None for p in model.parameters() if p.requires_grad)
    assert all(p.grad is not None for p in twin.parameters() if p.requires_grad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the copy's decoder runs inside the copy's forward
        twin(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():  # the copy's weights, not the original's
        next(p for p in twin.parameters() if p.requires_grad).add_(1.0)
    assert not torch.allclose(twin(**batch).loss, expected)


def test_apply_bear_loss_projects_only_supervised_positions():
    model = tiny_llama()
    batch = collate(examples(4, seed=5))
    rows = []
    model.lm_head.register_forward_hook(lambda module, args, out: rows.append(out.shape[0]))
    apply_bear_loss(model)
    model(**batch)
    assert rows == [int((batch["labels"][:, 1:] != IGNORE).sum())]


def test_apply_bear_loss_refuses_what_it_cannot_serve():
    with pytest.raises(TypeError, match="causal LM"):
        apply_bear_loss(tiny_llama().model)
    model = tiny_llama()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        apply_bear_loss(model)
    with pytest.raises(ValueError, match="beam_width"):
        apply_bear_loss(tiny_llama(), beam_width=0)


def test_bear_kernels_imports_transformers_only_in_its_transformers_module():
    code = "import sys, bear_kernels; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------ Trainer, accumulation
def _step_setup(n, loss, seed):
    """n examples, a LoRA model, the one-batch reference gradient, the mask fn and options."""
    exs = examples(n, seed=seed)
    model = tiny_lora()
    uses_mask, options = LOSSES[loss]
    mask_fn = item_trie().labels_allowed_mask if uses_mask else None
    return exs, model, reference_grad(model, exs, loss), mask_fn, options


def _train_one_step(tmp_path, model, exs, batch_size, accumulation, **trainer_kwargs):
    capture = GradCapture()
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, batch_size, accumulation),
        train_dataset=exs,
        data_collator=collate,
        callbacks=[capture],
        **trainer_kwargs,
    )
    trainer.train()
    return capture.grad


@pytest.mark.parametrize("split", SPLITS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("path", ["apply_bear_loss", "compute_loss_func"])
def test_trainer_step_gradient_equals_one_batch(tmp_path, path, loss, split):
    batch_size, accumulation = split
    exs, model, reference, mask_fn, options = _step_setup(batch_size * accumulation, loss, seed=7)
    if path == "apply_bear_loss":
        apply_bear_loss(model, allowed_mask_fn=mask_fn, **options)
        grad = _train_one_step(tmp_path, model, exs, batch_size, accumulation)
    else:
        loss_func = bear_compute_loss_func(allowed_mask_fn=mask_fn, **options)
        grad = _train_one_step(
            tmp_path, model, exs, batch_size, accumulation, compute_loss_func=loss_func
        )
    assert relative_error(grad, reference) <= TOLERANCE


def test_a_batch_mean_from_the_model_is_scaled_by_the_accumulation_steps(tmp_path):
    """The trap of a plain `bear_loss(...)` (reduction mean) returned by the model: Trainer takes a
    loss from a model that accepts loss kwargs as already normalised over the step, so it does
    not divide by the accumulation steps; with 4 equal micro-batches the gradient is 4x."""
    exs = [examples(1, seed=11)[0]] * 8  # equal micro-batches: each mean is the step's mean
    model = tiny_lora()
    reference = reference_grad(model, exs, "sft")

    def batch_mean(logits, labels, vocab_size, **kwargs):
        return bear_loss(logits[:, :-1], labels[:, 1:], reg_weight=0.0)  # ignores the kwargs

    model.get_base_model().loss_function = batch_mean
    grad = _train_one_step(tmp_path, model, exs, 2, 4)
    assert relative_error(grad, 4 * reference) <= TOLERANCE


# ------------------------------------------------------------------ TRL
def _bear_sft_trainer():
    """bear_kernels.trl.BEARSFTTrainer, or a skip where TRL is not installed (the floor
    environment: TRL 1.x needs transformers >= 4.56.2)."""
    pytest.importorskip("trl", reason="TRL 1.x needs transformers >= 4.56.2")
    from bear_kernels.trl import BEARSFTTrainer

    return BEARSFTTrainer


def _sft_trainer(tmp_path, model, exs, batch_size, accumulation, trainer_cls=None, **kwargs):
    """One TRL step's gradient (trainer_cls: trl.SFTTrainer by default)."""
    trainer = _make_sft_trainer(
        tmp_path, model, exs, batch_size, accumulation, trainer_cls, **kwargs
    )
    trainer.train()
    (capture,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, GradCapture)]
    return capture.grad


def _make_sft_trainer(tmp_path, model, exs, batch_size, accumulation, trainer_cls=None, **kwargs):
    trl = pytest.importorskip("trl", reason="TRL 1.x needs transformers >= 4.56.2")
    from datasets import Dataset

    args = training_args(
        tmp_path,
        batch_size,
        accumulation,
        args_cls=trl.SFTConfig,
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    return (trainer_cls or trl.SFTTrainer)(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(exs),
        data_collator=collate,
        processing_class=word_tokenizer(),
        callbacks=[GradCapture()],
        **kwargs,
    )


@pytest.mark.parametrize("split", SPLITS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("loss", list(LOSSES))
def test_bear_sft_trainer_gives_the_step_gradient(tmp_path, loss, split):
    """The TRL subclass (no compute_loss_func) trains the loss it is given, exactly, however the
    step is split into micro-batches."""
    BEARSFTTrainer = _bear_sft_trainer()

    batch_size, accumulation = split
    exs, model, reference, mask_fn, options = _step_setup(batch_size * accumulation, loss, seed=13)
    grad = _sft_trainer(
        tmp_path, model, exs, batch_size, accumulation, trainer_cls=BEARSFTTrainer,
        allowed_mask_fn=mask_fn, bear_options=options,
    )  # fmt: skip
    assert relative_error(grad, reference) <= TOLERANCE


def test_bear_sft_trainer_refuses_a_compute_loss_func(tmp_path):
    BEARSFTTrainer = _bear_sft_trainer()

    with pytest.raises(TypeError, match="computes BEAR itself"):
        _make_sft_trainer(
            tmp_path, tiny_lora(), examples(4), 4, 1, trainer_cls=BEARSFTTrainer,
            compute_loss_func=bear_compute_loss_func(),
        )  # fmt: skip


def test_bear_sft_trainer_refuses_trl_options_that_change_its_own_loss(tmp_path):
    BEARSFTTrainer = _bear_sft_trainer()

    trainer = _make_sft_trainer(
        tmp_path, tiny_lora(), examples(4), 4, 1, trainer_cls=BEARSFTTrainer
    )
    assert trainer.args.loss_type == "nll"
    trainer.args.loss_type = "dft"
    with pytest.raises(ValueError, match=r"\['loss_type'\] change TRL's own loss"):
        BEARSFTTrainer(model=tiny_lora(), args=trainer.args, train_dataset=trainer.train_dataset,
                       data_collator=collate, processing_class=word_tokenizer())  # fmt: skip


def test_bear_sft_trainer_gives_compute_metrics_the_full_logits(tmp_path):
    """What compute_metrics receives is what TRL gives it without BEAR: the model's logits."""
    BEARSFTTrainer = _bear_sft_trainer()

    seen = {}

    def metrics_of(name):
        def compute_metrics(prediction):
            seen[name] = (prediction.predictions, prediction.label_ids)
            return {"rows": float(prediction.predictions.shape[0])}

        return compute_metrics

    exs = examples(6, seed=5)
    from datasets import Dataset

    for name, cls, extra in [
        ("plain", None, {}),
        ("bear", BEARSFTTrainer, {"allowed_mask_fn": item_trie().labels_allowed_mask}),
    ]:
        trainer = _make_sft_trainer(
            tmp_path / name, tiny_lora(), exs, 2, 1, trainer_cls=cls,
            eval_dataset=Dataset.from_list(exs), compute_metrics=metrics_of(name), **extra,
        )  # fmt: skip
        assert trainer.evaluate()["eval_rows"] == 6
    (plain, plain_labels), (bear, bear_labels) = seen["plain"], seen["bear"]
    assert plain.shape == bear.shape and plain.shape[-1] == VOCAB
    assert (plain_labels == bear_labels).all()
    assert abs(plain - bear).max() < 1e-5


def test_apply_bear_loss_under_trl_fails_loudly(tmp_path):
    """Installed after TRL's fused head, the forward refuses TRL's fused call."""
    model = tiny_lora()
    trainer = _make_sft_trainer(tmp_path, model, examples(4), 4, 1)
    apply_bear_loss(trainer.model, allowed_mask_fn=item_trie().labels_allowed_mask)
    with pytest.raises(RuntimeError, match="BEARSFTTrainer"):
        trainer.train()


@pytest.mark.parametrize("split", SPLITS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("loss", list(LOSSES))
def test_trl_sft_trainer_with_compute_loss_func_gives_the_step_gradient(tmp_path, loss, split):
    batch_size, accumulation = split
    exs, model, reference, mask_fn, options = _step_setup(batch_size * accumulation, loss, seed=13)
    loss_func = bear_compute_loss_func(allowed_mask_fn=mask_fn, **options)
    grad = _sft_trainer(tmp_path, model, exs, batch_size, accumulation, compute_loss_func=loss_func)
    assert relative_error(grad, reference) <= TOLERANCE


@pytest.mark.parametrize("how", ["loss_function", "apply_bear_loss"])
def test_trl_ignores_the_models_loss(tmp_path, how):
    """TRL's SFTTrainer computes its own loss through a fused LM head: a BEAR loss installed on the
    model (model.loss_function, or apply_bear_loss) is never called, and the step trains plain
    SFT; apply_bear_loss warns. Hence BEARSFTTrainer (or compute_loss_func) with TRL."""
    exs = examples(8, seed=17)
    model = tiny_lora()
    sft = reference_grad(model, exs, "sft")
    bear = reference_grad(model, exs, "bear")
    options = LOSSES["bear"][1]
    mask_fn = item_trie().labels_allowed_mask
    if how == "loss_function":

        def bear_loss_function(logits, labels, **kwargs):
            mask = mask_fn(labels)
            return BEARForCausalLMLoss(logits, labels, allowed_mask=mask, **options, **kwargs)

        model.get_base_model().loss_function = bear_loss_function
        grad = _sft_trainer(tmp_path, model, exs, 2, 4)
    else:
        apply_bear_loss(model, allowed_mask_fn=mask_fn, **options)
        with pytest.warns(RuntimeWarning, match="does not train BEAR; use .*BEARSFTTrainer"):
            grad = _sft_trainer(tmp_path, model, exs, 2, 4)
    assert relative_error(grad, sft) <= TOLERANCE
    assert relative_error(grad, bear) > 0.1


# ------------------------------------------------------------------ two processes
@pytest.mark.parametrize("how", ["trainer", "trl"])
def test_two_processes_with_average_tokens_equal_one(tmp_path, how):
    """torchrun --nproc_per_node 2 (gloo), average_tokens_across_devices: 2 processes x batch 2 x
    accumulation 2 give the gradient of one batch of 8 (Trainer + apply_bear_loss; TRL through
    BEARSFTTrainer)."""
    if how == "trl":
        pytest.importorskip("trl", reason="TRL 1.x needs transformers >= 4.56.2")
    worker = Path(__file__).with_name("_hf_ddp_worker.py")
    out = tmp_path / "grad.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    done = launch([*cmd, str(worker), str(tmp_path), str(out), how], env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    grad = torch.load(out)
    exs = examples(8, seed=19)
    reference = reference_grad(tiny_lora(), exs, "bear")
    assert relative_error(grad, reference) <= TOLERANCE


def test_meta_logits_get_the_losss_error_in_the_hugging_face_entry_points():
    logits = torch.empty(2, 6, VOCAB, device="meta")
    labels = torch.zeros(2, 6, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="logits: a meta tensor"):
        BEARForCausalLMLoss(logits, labels)

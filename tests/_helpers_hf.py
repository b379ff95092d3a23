"""A tiny catalogue, a tiny Llama with LoRA and a gradient-capturing Trainer for the HF tests.

The catalogue has forced steps (the root's only child, items whose prefix has one continuation)
beside real choices, so msl / bear count fewer rows than the supervised labels.
"""

from __future__ import annotations

import copy
import random

import torch
from transformers import TrainerCallback, TrainingArguments

from bear.trie import ItemTrie
from bear_kernels import bear_loss
from tests._helpers_decoding import EOS, PAD, VOCAB
from tests._helpers_decoding import tiny_model as tiny_llama

IGNORE = -100
# item id -> tokens without EOS; every item starts with token 5 (a forced first step, as the
# opening quote of bear's responses)
ITEMS = {
    0: [5, 10, 11],
    1: [5, 10, 12],
    2: [5, 13],
    3: [5, 10, 11, 14],
    4: [5, 20, 21, 22],
    5: [5, 13, 30, 31],
}
# loss name -> (uses the trie mask, BEAR options)
LOSSES = {
    "sft": (False, dict(reg_weight=0.0)),
    "msl": (True, dict(reg_weight=0.0)),
    "bear": (True, dict(beam_width=2, reg_weight=2.0, reg_temperature=0.5)),
}


def item_trie() -> ItemTrie:
    return ItemTrie(list(ITEMS.values()), list(ITEMS), eos_token_id=EOS, vocab_size=VOCAB)


def examples(n: int, seed: int = 0) -> list[dict]:
    """n examples: a random prompt (3-8 tokens) then an item and EOS; labels mask the prompt."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(40, VOCAB) for _ in range(rng.randint(3, 8))]
        response = ITEMS[rng.choice(list(ITEMS))] + [EOS]
        out.append({"input_ids": prompt + response, "labels": [IGNORE] * len(prompt) + response})
    return out


def collate(features: list[dict]) -> dict:
    """Right-padded input_ids, attention_mask and labels (right padding keeps positions fixed)."""
    width = max(len(f["input_ids"]) for f in features)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for f in features:
        pad = width - len(f["input_ids"])
        batch["input_ids"].append(list(f["input_ids"]) + [PAD] * pad)
        batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * pad)
        batch["labels"].append(list(f["labels"]) + [IGNORE] * pad)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def word_tokenizer():
    """A tokenizer whose token i is "t{i}" (what TRL and the README need; no training)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t1")),
        pad_token=f"t{PAD}",
        eos_token=f"t{EOS}",
    )


def tiny_lora(seed: int = 0):
    """The tiny Llama with LoRA on q_proj / v_proj, both factors random (B != 0, so A has a
    gradient)."""
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(seed)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
    )
    torch.manual_seed(seed + 1)
    return get_peft_model(model, config)


def trainable_grads(model) -> torch.Tensor:
    """The gradients of the trainable parameters, concatenated in name order."""
    named = sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)
    return torch.cat([p.grad.detach().reshape(-1).clone() for _, p in named])


def reference_grad(model, exs: list[dict], loss: str) -> torch.Tensor:
    """BEAR over the whole step as one batch, with plain bear_loss on full logits (no HF module):
    Σ row losses / supervised labels (Trainer's num_items_in_batch for the step)."""
    model = copy.deepcopy(model)
    uses_mask, options = LOSSES[loss]
    batch = collate(exs)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    target = batch["labels"][:, 1:]  # (U, T-1)
    mask = item_trie().labels_allowed_mask(batch["labels"])[:, 1:] if uses_mask else None
    total = bear_loss(logits[:, :-1], target, allowed_mask=mask, reduction="sum", **options)
    (total / (target != IGNORE).sum()).backward()
    return trainable_grads(model)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


class GradCapture(TrainerCallback):
    """Keeps the gradients of the first optimiser step (after accumulation, before the update)."""

    def __init__(self):
        self.grad = None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.grad is None:
            self.grad = trainable_grads(kwargs["model"])


def training_args(out_dir, batch_size: int, accumulation: int, args_cls=TrainingArguments, **extra):
    """One optimiser step, no clipping (the callback sees the raw gradient), CPU, no logging."""
    return args_cls(
        output_dir=str(out_dir),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        max_grad_norm=0.0,
        learning_rate=1e-3,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        bf16=False,
        gradient_checkpointing=False,
        **extra,
    )

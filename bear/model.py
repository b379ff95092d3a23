"""Models: a tiny Llama built from a config (full fine-tuning) or a local checkpoint with LoRA, and
the helpers that call them the same way in training and evaluation."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

__all__ = [
    "TinyConfig",
    "LoraSettings",
    "build_tiny_model",
    "check_model_folder",
    "load_pretrained",
    "trainable_state",
    "response_logits",
    "autocast_for",
    "scoring_for",
]


@dataclass(frozen=True)
class TinyConfig:
    """Size of the tiny Llama (``--model tiny``); vocab_size comes from the trained tokenizer."""

    hidden_size: int = 128  # model width
    intermediate_size: int = 384  # MLP width
    num_hidden_layers: int = 2  # decoder blocks
    num_attention_heads: int = 4  # heads (key/value heads: the same)
    max_position_embeddings: int = 2048  # RoPE table; longer prompts raise in the tokenizer step


@dataclass(frozen=True)
class LoraSettings:
    """LoRA for ``--model PATH``, upstream's values."""

    r: int = 8  # rank
    alpha: int = 16  # scaling numerator (scale = alpha / r)
    dropout: float = 0.05  # dropout on the LoRA input
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")  # modules that get adapters


def build_tiny_model(vocab_size: int, pad_id: int, eos_id: int, cfg: TinyConfig, seed: int):
    """A randomly initialised LlamaForCausalLM of the given size (seeded, float32)."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


# What a Hugging Face checkpoint folder holds: its config, weights (one file or a sharded index)
# and a tokenizer (a fast tokenizer.json, or a slow tokenizer's vocabulary / sentencepiece model).
CHECKPOINT_CONFIG = "config.json"
CHECKPOINT_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "pytorch_model.bin.index.json")  # fmt: skip
CHECKPOINT_TOKENIZER = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json",
                        "vocab.txt")  # fmt: skip


def check_model_folder(path: str | Path) -> None:
    """Raise unless ``path`` is a local Hugging Face checkpoint folder that ``load_pretrained`` can
    read: CHECKPOINT_CONFIG, one of CHECKPOINT_WEIGHTS and one of CHECKPOINT_TOKENIZER.

    Raises FileNotFoundError if ``path`` is not a folder, ValueError naming what is missing.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"--model {path}: not 'tiny' and not a local folder")
    missing = []
    if not (folder / CHECKPOINT_CONFIG).is_file():
        missing.append(CHECKPOINT_CONFIG)
    for kind, names in (("weights", CHECKPOINT_WEIGHTS), ("tokenizer", CHECKPOINT_TOKENIZER)):
        if not any((folder / name).is_file() for name in names):
            missing.append(f"{kind} ({' or '.join(names)})")
    if missing:
        raise ValueError(
            f"--model {path}: not a Hugging Face checkpoint folder, it lacks {'; '.join(missing)}; "
            "a checkpoint folder holds config.json, the weights and the tokenizer files, as "
            "save_pretrained writes them"
        )


def load_pretrained(path: str, lora: LoraSettings, dtype: torch.dtype = torch.float32):
    """(model with LoRA adapters, tokenizer) from a local Hugging Face checkpoint folder."""
    from peft import LoraConfig, get_peft_model

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"--model {path}: the tokenizer has no EOS token; responses end with EOS")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config), tokenizer


def trainable_state(model) -> dict[str, torch.Tensor]:
    """CPU copies of the trainable parameters by name (all of the tiny model; the adapters under
    LoRA): what a checkpoint stores and ``bear.run.load_weights`` restores."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def response_logits(model, batch) -> torch.Tensor:
    """(U, W, V) logits of the positions that predict the right-aligned response targets of a
    ``bear.items.Batch``."""
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=batch.width,
        use_cache=False,
    )
    return out.logits


def autocast_for(device: torch.device):
    """bf16 autocast on a GPU, nothing on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def scoring_for(loss: str) -> str:
    """Beam scoring that matches the training softmax: "after" for sft, "before" otherwise."""
    return "after" if loss == "sft" else "before"

"""Shared tiny settings for workstream C's tests (data, synth, losses, train, cli)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from bear.config import TrainConfig
from bear.synth import SynthConfig, write_synth

# the real datasets beside the checkout; BEAR_AMAZON_DATA points elsewhere (e.g. from a worktree)
SHARED_DATA = Path(
    os.environ.get("BEAR_AMAZON_DATA")
    or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "amazon"
)
TINY_SYNTH = SynthConfig(seed=3, num_users=30, num_brands=3, lines_per_brand=2, max_events=8)


def tiny_synth(folder: Path) -> Path:
    """A small synthetic dataset (108 items, about 150 training rows)."""
    return write_synth(folder, TINY_SYNTH)


def tiny_config(data: Path, out: Path, **overrides) -> TrainConfig:
    """A training config that runs in seconds on a CPU."""
    base = dict(
        data=str(data),
        out=str(out),
        loss="msl",
        epochs=1,
        vocab_size=320,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        batch_size=8,
        limit_train=24,
        limit_eval=3,
        eval_batch_size=8,
        progress=False,
        device="cpu",
        max_history=4,
    )
    base.update(overrides)
    return TrainConfig(**base)


def last_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(run) / "last.pt", weights_only=False)["model"]


def write_six_columns(src: Path, dst: Path) -> None:
    """Copy a user_id,item_ids,timestamp CSV to ``dst`` with the six columns of some published
    test files (UPSTREAM.md §2): the three extra ones sit between item_ids and timestamp."""
    rows = src.read_text().splitlines()
    out = ["user_id,item_ids,mask,item_titles,replaced_item_titles,timestamp"]
    for row in rows[1:]:
        user, rest = row.split(",", 1)
        ids, ts = rest.rsplit(",", 1)
        out.append(f'{user},{ids},"[1, 1]","[\'a, b\']",x,{ts}')
    dst.write_text("\n".join(out) + "\n")


def tiny_checkpoint(data: Path, folder: Path) -> Path:
    """A small Llama and its tokenizer saved in Hugging Face format (a ``--model PATH`` base)."""
    from bear.data import load_dataset
    from bear.model import TinyConfig, build_tiny_model
    from bear.prompts import format_prompt, format_response
    from bear.tokenizer import train_tokenizer

    dataset = load_dataset(data)
    texts = [format_response(t) for t in dataset.titles.values()]
    tok = train_tokenizer(texts + [format_prompt(["a"], "generic")], 400)
    size = TinyConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2)  # fmt: skip
    model = build_tiny_model(len(tok), tok.pad_token_id, tok.eos_token_id, size, seed=0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder

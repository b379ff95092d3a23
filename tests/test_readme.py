"""The README's "BEAR in your trainer" code blocks run as written, on a tiny peft Llama."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests._helpers_hf import ITEMS, collate, examples, tiny_lora, word_tokenizer

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## BEAR in your trainer"


def _section_blocks() -> list[str]:
    text = README.read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def _lora_weights(model) -> torch.Tensor:
    named = sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)
    return torch.cat([p.detach().reshape(-1).clone() for _, p in named])


def test_the_section_has_the_three_ways_in():
    blocks = _section_blocks()
    assert len(blocks) == 3
    assert "BEARForCausalLMLoss" in blocks[0]
    assert "apply_bear_loss" in blocks[1] and "Trainer(" in blocks[1]
    assert "compute_loss_func=" in blocks[2] and "SFTTrainer(" in blocks[2]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["custom-loop", "trainer", "trl"])
def test_readme_block_trains(index, tmp_path, monkeypatch):
    block = _section_blocks()[index]
    if "from trl" in block:
        pytest.importorskip("trl", reason="TRL 1.x needs transformers >= 4.56.2")
        from datasets import Dataset

        train_dataset = Dataset.from_list(examples(8, seed=23))
    else:
        train_dataset = examples(8, seed=23)
    monkeypatch.chdir(tmp_path)  # the blocks' output_dir "runs/..."
    model = tiny_lora()
    before = _lora_weights(model)
    namespace = dict(
        items=ITEMS,
        tokenizer=word_tokenizer(),
        model=model,
        train_dataset=train_dataset,
        data_collator=collate,
        optimizer=torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
    )
    if index > 0:  # the blocks after the first use its trie
        exec(_section_blocks()[0].split("step = ")[0], namespace)
    exec(block, namespace)
    after = _lora_weights(model)
    assert torch.isfinite(after).all()
    assert not torch.equal(before, after)  # one optimiser step happened

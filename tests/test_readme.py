"""The README's code blocks run as written: the decoding example on a tiny random model, the
"BEAR in your trainer" blocks on a tiny peft Llama (offline)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests._helpers_hf import ITEMS, collate, examples, tiny_lora, word_tokenizer

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Decoding your own catalogue"
TRAINER_SECTION = "## BEAR in your trainer"


def python_blocks(markdown: str, heading: str) -> list[str]:
    """The fenced ```python blocks between `heading` and the next heading of its level or above."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = markdown.splitlines()
    if heading not in lines:
        raise ValueError(f"heading {heading!r} not found in the README")
    start = lines.index(heading) + 1
    end = next(
        (i for i in range(start, len(lines)) if re.match(rf"#{{1,{level}}} ", lines[i])),
        len(lines),
    )
    section = "\n".join(lines[start:end])
    return re.findall(r"^```python\n(.*?)^```$", section, flags=re.S | re.M)


def test_python_blocks_finds_only_the_section():
    fence, end = "```python\n", "```\n"
    text = f"# t\n## A\n{fence}a = 1\n{end}### sub\n{fence}b = 2\n{end}## B\n{fence}c\n{end}"
    assert python_blocks(text, "## A") == ["a = 1\n", "b = 2\n"]
    assert python_blocks(text, "## B") == ["c\n"]
    with pytest.raises(ValueError, match="not found"):
        python_blocks(text, "## C")


def test_readme_decoding_example_runs(capsys):
    blocks = python_blocks(README.read_text(), SECTION)
    assert blocks, f"no ```python block under {SECTION!r} in README.md"
    namespace: dict = {"__name__": "readme_example"}
    for block in blocks:
        exec(compile(block, f"README.md ({SECTION})", "exec"), namespace)
    # What the example computes is consistent: beam results are catalogue items with scores equal
    # to their teacher-forced scores, and the exact top-K is at least as good as the beam.
    beams, top, trie = namespace["beams"], namespace["top"], namespace["trie"]
    assert set(beams.item_ids.flatten().tolist()) <= set(namespace["titles"])
    assert (top.scores[:, 0] >= beams.scores[:, 0] - 1e-5).all()
    prompts = namespace["input_ids"], namespace["attention_mask"]
    rescored = namespace["score_items"](namespace["model"], *prompts, trie, beams.item_ids)
    assert (rescored - beams.scores).abs().max() < 1e-4
    assert "tensor(" in capsys.readouterr().out


def _section_blocks() -> list[str]:
    return python_blocks(README.read_text(), TRAINER_SECTION)


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

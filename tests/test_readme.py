"""The README's code blocks run as written: the decoding example on a tiny random model, the
"BEAR in your trainer" blocks on a tiny peft Llama (offline)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from bear.train import train
from tests._helpers_train import tiny_config, tiny_synth

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Decoding your own catalogue"
TRAINER_SECTION = "## BEAR in your trainer"


def _outside_fences(lines: list[str]) -> list[bool]:
    """Whether each line is prose (not inside a ``` fence, where "# ..." is a comment)."""
    inside, prose = False, []
    for line in lines:
        if line.startswith("```"):
            inside = not inside
        prose.append(not inside and not line.startswith("```"))
    return prose


def python_blocks(markdown: str, heading: str) -> list[str]:
    """The fenced ```python blocks between `heading` and the next heading of its level or above."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = markdown.splitlines()
    if heading not in lines:
        raise ValueError(f"heading {heading!r} not found in the README")
    start = lines.index(heading) + 1
    prose = _outside_fences(lines)
    end = next(
        (
            i
            for i in range(start, len(lines))
            if prose[i] and re.match(rf"#{{1,{level}}} ", lines[i])
        ),
        len(lines),
    )
    section = "\n".join(lines[start:end])
    return re.findall(r"^```python\n(.*?)^```$", section, flags=re.S | re.M)


def test_python_blocks_finds_only_the_section():
    fence, end = "```python\n", "```\n"
    sub = f"### sub\n{fence}# no heading\nb = 2\n{end}"
    text = f"# t\n## A\n{fence}a = 1\n{end}{sub}## B\n{fence}c\n{end}"
    assert python_blocks(text, "## A") == ["a = 1\n", "# no heading\nb = 2\n"]
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


def test_the_section_has_a_setup_and_the_three_ways_in():
    setup, *ways = _section_blocks()
    assert "train_dataset = " in setup and "ItemTrie.from_titles" in setup
    assert len(ways) == 3
    assert "BEARForCausalLMLoss" in ways[0]
    assert "apply_bear_loss" in ways[1] and "Trainer(" in ways[1]
    assert "BEARSFTTrainer(" in ways[2] and "compute_loss_func" not in ways[2]


@pytest.mark.parametrize("index", [1, 2, 3], ids=["custom-loop", "trainer", "trl"])
def test_readme_block_trains(index, tmp_path, monkeypatch):
    """The setup block, then one of the three, as written: one optimiser step happens."""
    setup, block = _section_blocks()[0], _section_blocks()[index]
    if "from trl" in block:
        pytest.importorskip("trl", reason="TRL 1.x needs transformers >= 4.56.2")
    monkeypatch.chdir(tmp_path)  # the blocks' output_dir "runs/..."
    namespace: dict = {"__name__": "readme_trainer"}
    exec(compile(setup, f"README.md ({TRAINER_SECTION}) setup", "exec"), namespace)
    before = _lora_weights(namespace["model"])
    exec(compile(block, f"README.md ({TRAINER_SECTION}) {index}", "exec"), namespace)
    after = _lora_weights(namespace["model"])
    assert torch.isfinite(after).all()
    assert not torch.equal(before, after)  # one optimiser step happened


def test_readme_own_loop_block_runs():
    block = python_blocks(README.read_text(), "## The loss in your own training loop")[0]
    namespace: dict = {"__name__": "readme_loop"}
    exec(compile(block, "README.md (own loop)", "exec"), namespace)
    assert torch.isfinite(namespace["loss"]) and namespace["ce"].shape == namespace["margin"].shape


def test_readme_load_run_block_opens_a_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train(tiny_config(tiny_synth(tmp_path / "data"), tmp_path / "runs" / "bear"))
    (block,) = python_blocks(README.read_text(), "### The run folder")
    namespace: dict = {"__name__": "readme_run"}
    exec(compile(block, "README.md (run folder)", "exec"), namespace)
    assert not namespace["model"].training and namespace["tokenizer"].eos_token_id is not None


# Every README section with ```python blocks, and the test file that runs them.
RUN_BY = {
    "## The loss in your own training loop": "test_readme.py",
    "### Add BEAR to your own DPO loss": "test_regularizer.py",
    SECTION: "test_readme.py",
    TRAINER_SECTION: "test_readme.py",
    "## A new loss, a new decoder": "test_loss_seam.py",
    "### The run folder": "test_readme.py",
}


def test_every_python_block_in_the_readme_is_run_by_a_test():
    lines = README.read_text().splitlines()
    heading, sections = "", set()
    for line, prose in zip(lines, _outside_fences(lines), strict=True):
        if prose and re.match(r"#{1,6} ", line):
            heading = line
        elif line == "```python":
            sections.add(heading)
    assert sections == set(RUN_BY), sections ^ set(RUN_BY)
    tests = Path(__file__).parent
    for heading, file in RUN_BY.items():
        assert heading in (tests / file).read_text(), (heading, file)

"""The README's decoding example runs as written (a tiny random model, offline)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Decoding your own catalogue"


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

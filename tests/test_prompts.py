"""The paper's prompts, character for character, against fixtures copied from UPSTREAM.md §1."""

from __future__ import annotations

import pytest

from bear.prompts import PromptText, domain_from_folder, format_prompt, format_response

# UPSTREAM.md §1's table, copied by hand: (domain, instruction, history prefix).
UPSTREAM_TABLE = [
    (
        "toy",
        "Given a list of toys the user has played before, please recommend a new toy that the "
        "user likes to the user.",
        "The user has played the following toys before: ",
    ),
    (
        "book",
        "Given a list of books the user has read before, please recommend a new book that the "
        "user likes to the user.",
        "The user has read the following books before: ",
    ),
    (
        "clothing",
        "Given a list of clothing the user has worn before, please recommend a new clothing that "
        "the user likes to the user.",
        "The user has worn the following clothing before: ",
    ),
    (
        "office",
        "Given a list of office products the user has used before, please recommend a new office "
        "product that the user likes to the user.",
        "The user has used the following office products before: ",
    ),
    (
        "beauty",
        "Given a list of beauty products the user has used before, please recommend a new beauty "
        "product that the user likes to the user.",
        "The user has used the following beauty products before: ",
    ),
    (
        "electronic",
        "Given a list of electronic products the user has used before, please recommend a new "
        "electronic product that the user likes to the user.",
        "The user has used the following electronic products before: ",
    ),
    (
        "game",
        "Given a list of video games the user has played before, please recommend a new video "
        "game that the user likes to the user.",
        "The user has played the following video games before: ",
    ),
    (
        "music",
        "Given a list of music the user has listened to before, please recommend a new music that "
        "the user likes to the user.",
        "The user has listened to the following music before: ",
    ),
]
FIRST_LINE = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request."
)


@pytest.mark.parametrize(("domain", "instruction", "prefix"), UPSTREAM_TABLE)
def test_every_domain_prompt_is_upstreams(domain, instruction, prefix):
    want = (
        FIRST_LINE + " \n"
        "\n"
        "### Instruction:\n" + instruction + "\n"
        "\n"
        "### Input:\n" + prefix + '"A b", "C "d""\n'
        " \n"
        "\n"
        "### Response:\n"
    )
    assert format_prompt(["A b", 'C "d"'], domain) == want
    # upstream's inference prompt: two spaces end the first line, nothing else differs
    inference = format_prompt(["A b", 'C "d"'], domain, inference=True)
    assert inference == FIRST_LINE + "  \n" + want[len(FIRST_LINE) + 2 :]


def test_office_prompt_literal():
    """The whole Office prompt as one literal, to catch a slip in how the test builds them."""
    assert format_prompt(["Pen", "Ink"], "office") == (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request. \n\n### Instruction:\n"
        "Given a list of office products the user has used before, please recommend a new office "
        "product that the user likes to the user.\n\n### Input:\nThe user has used the following "
        'office products before: "Pen", "Ink"\n \n\n### Response:\n'
    )
    assert format_response("T") == '"T"'
    assert format_response("") == '""'


@pytest.mark.parametrize(
    ("folder", "domain"),
    [
        ("data/Toys_and_Games", "toy"),
        ("x/Books", "book"),
        ("Clothing_Shoes_and_Jewelry", "clothing"),
        ("amazon/Office", "office"),
        ("All_Beauty", "beauty"),
        ("Electronics", "electronic"),
        ("Video_Games", "game"),
        ("Digital_Music", "music"),
        ("office", "office"),
        ("runs/synth", "generic"),
    ],
)
def test_domain_from_folder_name(tmp_path, folder, domain):
    assert domain_from_folder(tmp_path / folder) == domain


def test_generic_and_user_strings():
    generic = format_prompt(["a"], "generic")
    assert generic.startswith(FIRST_LINE + " \n\n### Instruction:\n")
    assert generic.endswith('"a"\n \n\n### Response:\n')
    own = PromptText("Pick one.", "Seen: ")
    assert format_prompt(["a", "b"], own) == (
        FIRST_LINE + ' \n\n### Instruction:\nPick one.\n\n### Input:\nSeen: "a", "b"\n \n\n'
        "### Response:\n"
    )
    with pytest.raises(ValueError, match="domain: got 'nope'"):
        format_prompt(["a"], "nope")

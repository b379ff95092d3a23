"""Upstream's prompt template (Alpaca style) with a per-domain instruction (SPEC §3).

The prompt ends with the response header ``### Response:\\n``; the response is the quoted title
followed by EOS. The header ends in a newline so that byte-level BPE pre-tokenisation never merges
a token across the prompt/response boundary (checked per dataset by ``bear.data``).
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "TEMPLATE",
    "INSTRUCTIONS",
    "GENERIC_DOMAIN",
    "domain_from_folder",
    "instruction_for",
    "format_prompt",
    "format_response",
]

# Upstream's template (github.com/Tiny-Snow/BEAR-SIGIR-2026), as in Alpaca.
TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

# (plural, singular) product nouns per domain; the instruction is upstream's sentence.
_NOUNS = {
    "office": ("office products", "office product"),
    "clothing": ("clothing products", "clothing product"),
    "generic": ("items", "item"),
}
GENERIC_DOMAIN = "generic"

INSTRUCTIONS = {
    domain: (
        f"Given a list of {plural} the user has bought before, please recommend a new "
        f"{singular} that the user likes to the user."
    )
    for domain, (plural, singular) in _NOUNS.items()
}


def domain_from_folder(folder: str | Path) -> str:
    """The domain named by a dataset folder ("Office" -> "office"), else the generic one."""
    name = Path(folder).resolve().name.lower()
    return name if name in INSTRUCTIONS else GENERIC_DOMAIN


def instruction_for(domain: str) -> str:
    """Upstream's instruction sentence for ``domain`` (one of ``INSTRUCTIONS``)."""
    if domain not in INSTRUCTIONS:
        raise ValueError(f"domain: got {domain!r}, expected one of {sorted(INSTRUCTIONS)}")
    return INSTRUCTIONS[domain]


def format_response(title: str) -> str:
    """The response text for an item: its title in double quotes (EOS is added as a token)."""
    return f'"{title}"'


def format_prompt(history_titles: list[str], domain: str) -> str:
    """The full prompt for a user history (oldest first), ending with the response header."""
    history = ", ".join(format_response(t) for t in history_titles)
    return TEMPLATE.format(
        instruction=instruction_for(domain), input=f"The user has bought: {history}"
    )

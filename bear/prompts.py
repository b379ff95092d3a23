"""The paper's prompts (``UPSTREAM.md`` §1), character for character, per domain (SPEC §3).

Training prompt (``format_prompt``), the response header last::

    Below is an instruction ... completes the request.␠\\n\\n
    ### Instruction:\\n{instruction}\\n\\n
    ### Input:\\n{history_prefix}"Title 1", "Title 2"\\n␠\\n\\n
    ### Response:\\n

The response is the quoted title followed by EOS (a token). Upstream's inference prompt differs
from its training prompt only by a second space at the end of the first line
(``inference=True``); our own protocol uses the training prompt for both. The header ends in a
newline so that byte-level BPE never merges a token across the prompt/response boundary (checked
per dataset by ``bear.items``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "PromptText",
    "DOMAINS",
    "GENERIC_DOMAIN",
    "domain_from_folder",
    "prompt_text",
    "format_prompt",
    "format_response",
    "chat_wrap",
]

_MESSAGE = "\x00bear-user-message\x00"  # stands for the user message inside a chat template

# Upstream's first line: one trailing space when training, two at inference (UPSTREAM.md §1).
_PREAMBLE = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request."
)
_TRAIN_PREAMBLE_END = " \n"
_INFERENCE_PREAMBLE_END = "  \n"
_BODY = "\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
_HISTORY_END = "\n "  # after the last quoted history title: a newline and one space


@dataclass(frozen=True)
class PromptText:
    """The two domain strings of a prompt: the instruction and the prefix before the history;
    ``chat``: the chat template's text before and after a user message (``chat_wrap``), which
    then wraps the instruction and the history instead of the paper's template."""

    instruction: str
    history_prefix: str  # upstream's end with one space
    chat: tuple[str, str] | None = None


def _upstream(noun_plural: str, verb: str, noun_singular: str) -> PromptText:
    """Upstream's two sentences for a domain, e.g. ("toys", "played", "toy")."""
    return PromptText(
        f"Given a list of {noun_plural} the user has {verb} before, please recommend a new "
        f"{noun_singular} that the user likes to the user.",
        f"The user has {verb} the following {noun_plural} before: ",
    )


# UPSTREAM.md §1, in upstream's order: the first word the folder name contains picks the domain.
DOMAINS = {
    "toy": _upstream("toys", "played", "toy"),
    "book": _upstream("books", "read", "book"),
    "clothing": _upstream("clothing", "worn", "clothing"),
    "office": _upstream("office products", "used", "office product"),
    "beauty": _upstream("beauty products", "used", "beauty product"),
    "electronic": _upstream("electronic products", "used", "electronic product"),
    "game": _upstream("video games", "played", "video game"),
    "music": _upstream("music", "listened to", "music"),
}
# Ours, for a folder that names no upstream domain (upstream has none).
GENERIC_DOMAIN = "generic"
GENERIC = PromptText(
    "Given a list of items the user has interacted with before, please recommend a new item "
    "that the user likes to the user.",
    "The user has interacted with the following items before: ",
)


def domain_from_folder(folder: str | Path) -> str:
    """The domain whose word the folder's name contains (case-insensitive), else "generic".

    As upstream, the words are tried in the order of ``DOMAINS``: "Toys_and_Games" -> "toy",
    "Office" -> "office", "Electronics" -> "electronic", "synth" -> "generic".
    """
    name = Path(folder).resolve().name.lower()
    return next((domain for domain in DOMAINS if domain in name), GENERIC_DOMAIN)


def prompt_text(
    domain: str, instruction: str | None = None, history_prefix: str | None = None
) -> PromptText:
    """The prompt strings of ``domain`` (a key of ``DOMAINS`` or "generic"), either of them
    replaced by the user's own (``instruction``, ``history_prefix``) when given.

    Raises ValueError for an unknown domain and TypeError for a string argument that is not one.
    """
    if domain != GENERIC_DOMAIN and domain not in DOMAINS:
        raise ValueError(
            f"domain: got {domain!r}, expected one of {sorted(DOMAINS)} or {GENERIC_DOMAIN!r}"
        )
    for name, value in (("instruction", instruction), ("history_prefix", history_prefix)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name}: got {type(value).__name__}, expected a string or None")
    base = DOMAINS.get(domain, GENERIC)
    return PromptText(
        base.instruction if instruction is None else instruction,
        base.history_prefix if history_prefix is None else history_prefix,
    )


def format_response(title: str) -> str:
    """The response text for an item: its title in double quotes (EOS is added as a token)."""
    return f'"{title}"'


def format_prompt(
    history_titles: list[str], domain: str | PromptText, inference: bool = False
) -> str:
    """The prompt of a user history (titles oldest first), up to and including the response
    header ``### Response:\\n``; with ``domain.chat`` (a chat prompt), the instruction, a blank
    line and the history as the user's message of the chat template, up to the assistant's turn.

    ``domain``: a domain name (``prompt_text``) or the ``PromptText`` to use.
    ``inference``: upstream's inference prompt (two spaces ending the first line).
    Raises ValueError for an unknown domain name.
    """
    text = domain if isinstance(domain, PromptText) else prompt_text(domain)
    history = ", ".join(format_response(t) for t in history_titles)
    if text.chat is not None:  # the generation prompt of the chat template ends it
        before, after = text.chat
        return before + text.instruction + "\n\n" + text.history_prefix + history + after
    history += _HISTORY_END
    end = _INFERENCE_PREAMBLE_END if inference else _TRAIN_PREAMBLE_END
    body = _BODY.format(instruction=text.instruction, input=text.history_prefix + history)
    return _PREAMBLE + end + body


def chat_wrap(tokenizer) -> tuple[str, str]:
    """The text a tokenizer's chat template puts before and after one user message, up to the
    start of the assistant's answer (``add_generation_prompt``): ``PromptText.chat``.

    A leading BOS the tokenizer adds by itself is dropped from the text (it would come twice).
    Raises ValueError if the tokenizer has no chat template or the template does not show the
    message once, verbatim.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"chat prompt: the tokenizer {type(tokenizer).__name__} has no chat template; use "
            "the paper's prompt (--prompt paper) or a tokenizer of an instruct model"
        )
    messages = [{"role": "user", "content": _MESSAGE}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if text.count(_MESSAGE) != 1:
        raise ValueError(
            "chat prompt: the tokenizer's chat template changes or repeats the user message; "
            "write the prompt with --instruction/--history-prefix and --prompt paper instead"
        )
    before, after = text.split(_MESSAGE)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and before.startswith(bos):
        ids = tokenizer("x", add_special_tokens=True)["input_ids"]
        if ids and ids[0] == tokenizer.bos_token_id:
            before = before[len(bos) :]
    return before, after

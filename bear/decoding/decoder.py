"""``Decoder``: the seam every trie-constrained decoder plugs into (SPEC §11).

A decoder takes what ``beam_search`` takes — a Hugging Face causal LM, left-padded prompts
(U, P), an ``ItemTrie`` — and returns a ``DecodeResult`` of ``width`` items per user, best first.
Evaluation (``bear.evaluate``) calls it through this interface only, so a new decoder is one
module: a dataclass subclass whose fields are its own options (``--decoder-option KEY=VALUE``),
decorated with ``bear.decoding.registry.register_decoder``.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from bear.decoding.common import DecodeResult
    from bear.decoding.prompt_cache import PromptCache
    from bear.trie import ItemTrie

__all__ = ["Decoder"]

_PARSERS = {int: int, float: float, str: str}
_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")


@dataclasses.dataclass(frozen=True)
class Decoder:
    """A trie-constrained decoder; subclasses are frozen dataclasses of their options.

    Class attributes a subclass sets:
        name: its ``--decoder`` name.
        length_penalties: whether it honours a length penalty α (False: only α = 0).
    """

    name: ClassVar[str]
    length_penalties: ClassVar[bool] = True

    @classmethod
    def from_options(cls, options: typing.Iterable[str] = ()) -> Decoder:
        """The decoder with ``KEY=VALUE`` options (values parsed by the fields' types: int,
        float, str, bool). Raises ValueError naming an unknown key or a value of the wrong type."""
        hints = typing.get_type_hints(cls)
        known = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
        values = {}
        for option in options:
            key, sep, text = option.partition("=")
            if not sep or key not in known:
                raise ValueError(
                    f"--decoder-option: got {option!r}; decoder {cls.name!r} takes KEY=VALUE with "
                    f"KEY one of {tuple(known) or '(none: it has no options)'}"
                )
            values[key] = _parse(key, text, known[key], cls.name)
        return cls(**values)

    def check(self, width: int, scoring: str, length_penalty: float) -> None:
        """Raise ValueError for evaluation settings this decoder cannot honour."""
        if length_penalty != 0 and not self.length_penalties:
            raise ValueError(
                f"--length-penalty: got {length_penalty} with --decoder {self.name}, which ranks "
                "by full score (α = 0); use --length-penalty 0 or another decoder"
            )

    def decode(
        self,
        model,
        input_ids,
        attention_mask,
        trie: ItemTrie,
        width: int,
        scoring: str,
        length_penalty: float,
        prompt: PromptCache | None = None,
    ) -> DecodeResult:
        """``width`` items per user, best first (SPEC §4's scoring and length penalty);
        ``prompt``: a ``PromptCache`` of these prompts to read instead of a new prefill."""
        raise NotImplementedError


def _parse(key: str, text: str, kind, decoder: str):
    if kind is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
    elif kind in _PARSERS:
        try:
            return _PARSERS[kind](text)
        except ValueError:
            pass
    expected = getattr(kind, "__name__", kind)
    raise ValueError(f"--decoder-option {key}={text}: decoder {decoder!r} expects {expected}")

"""The decoder registry; imports no torch (SPEC §11).

A decoder is a class on ``bear.decoding.decoder.Decoder`` registered under its ``--decoder``
name. The built-in decoders are listed by the module that defines each, imported the first time
its decoder is asked for (so that ``bear --help`` lists the names without loading torch); a
decoder defined elsewhere registers itself with ``@register_decoder`` when its module is imported.
"""

from __future__ import annotations

import importlib

__all__ = ["BUILTIN_DECODERS", "decoder_names", "get_decoder", "register_decoder"]

# --decoder name -> the module that defines and registers it (imported on first use)
BUILTIN_DECODERS = {
    "beam": "bear.decoding.beam",
    "exact": "bear.decoding.best_first",
    "diverse": "bear.decoding.diverse",
    "sample": "bear.decoding.sampling",
}
_REGISTERED: dict[str, type] = {}  # name -> the Decoder subclass


def register_decoder(cls: type) -> type:
    """Class decorator: make ``cls`` (a ``Decoder`` subclass) the decoder named ``cls.name``.
    Raises ValueError for a missing name or one another class already holds."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_decoder: {cls.__name__} needs a class attribute name = '...'")
    held = _REGISTERED.get(name)
    if held is not None and held is not cls:
        raise ValueError(
            f"register_decoder: the name {name!r} is taken by {held.__module__}.{held.__name__}; "
            "choose another name"
        )
    _REGISTERED[name] = cls
    return cls


def decoder_names() -> tuple[str, ...]:
    """Every decoder ``--decoder`` accepts: the built-in ones, then those registered since."""
    return tuple(BUILTIN_DECODERS) + tuple(n for n in _REGISTERED if n not in BUILTIN_DECODERS)


def get_decoder(name: str) -> type:
    """The decoder class registered as ``name`` (a built-in one's module is imported here).

    Raises ValueError naming the known decoders for another name.
    """
    if name not in _REGISTERED and name in BUILTIN_DECODERS:
        importlib.import_module(BUILTIN_DECODERS[name])
    if name not in _REGISTERED:
        raise ValueError(f"decoder: got {name!r}, expected one of {decoder_names()}")
    return _REGISTERED[name]

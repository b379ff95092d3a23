"""Lazy exports (PEP 562): a package's public names, each imported from its module on first use,
so that importing the package (``import bear``, ``bear --help``) loads neither torch nor
transformers."""

from __future__ import annotations

import importlib
import sys

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: dict[str, str]):
    """The ``__getattr__`` and ``__dir__`` of ``package`` whose names ``exports`` maps to the
    modules defining them; a name is imported once, then cached in the package."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__

"""The loss registry and the settings every loss takes; imports no torch (SPEC §11).

A loss is a class on ``bear.losses.base.Loss`` registered under its ``--loss`` name. The
built-in losses are listed here by the module that defines each, and a module is imported the
first time its loss is asked for, so that ``bear --help`` and ``bear synth`` can list the names
without loading torch. A loss defined elsewhere (a user's own) registers itself with
``@register_loss`` when its module is imported.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

__all__ = [
    "BUILTIN_LOSSES",
    "NORMALISATIONS",
    "LossSettings",
    "get_loss",
    "loss_names",
    "register_loss",
]

# --loss name -> the module that defines and registers it (imported on first use)
BUILTIN_LOSSES = {
    "sft": "bear.losses.sft",
    "msl": "bear.losses.msl",
    "bear": "bear.losses.bear",
    "bear-upstream": "bear.losses.bear_upstream",
    "beam-sim": "bear.losses.beam_sim",
    "sdpo": "bear.losses.sdpo",
    "sdpo-bear": "bear.losses.sdpo",
}
NORMALISATIONS = ("step", "micro-batch")  # see bear.losses.base
_REGISTERED: dict[str, type] = {}  # name -> the Loss subclass


def register_loss(cls: type) -> type:
    """Class decorator: make ``cls`` (a ``bear.losses.base.Loss`` subclass) the loss named
    ``cls.name``. Raises ValueError for a missing name or one another class already holds."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_loss: {cls.__name__} needs a class attribute name = '...'")
    held = _REGISTERED.get(name)
    if held is not None and held is not cls:
        raise ValueError(
            f"register_loss: the name {name!r} is taken by {held.__module__}.{held.__name__}; "
            "choose another name"
        )
    _REGISTERED[name] = cls
    return cls


def loss_names() -> tuple[str, ...]:
    """Every loss ``--loss`` accepts: the built-in ones, then those registered since."""
    return tuple(BUILTIN_LOSSES) + tuple(n for n in _REGISTERED if n not in BUILTIN_LOSSES)


def get_loss(name: str) -> type:
    """The loss class registered as ``name`` (a built-in one's module is imported here).

    Raises ValueError naming the known losses for another name.
    """
    if name not in _REGISTERED and name in BUILTIN_LOSSES:
        importlib.import_module(BUILTIN_LOSSES[name])
    if name not in _REGISTERED:
        raise ValueError(f"loss: got {name!r}, expected one of {loss_names()}")
    return _REGISTERED[name]


@dataclass(frozen=True)
class LossSettings:
    """Hyper-parameters shared by the losses (paper symbols); checked when built, the general
    ones here and those of one loss by its class (``Loss.check``)."""

    name: str  # a registered loss (loss_names())
    beam_width: int = 10  # B
    reg_weight: float = 1.0  # λ
    reg_temperature: float = 1.0  # ξ
    ignore_index: int = -100
    temperature: float = 1.0  # τ: softmax(z/τ) over the loss's allowed set
    topk_weight: float | None = None  # bear-upstream's λ_u; None: λ/ξ
    normalisation: str = "step"  # one of NORMALISATIONS
    negatives: int = 3  # M, preference losses (S-DPO)
    negative_sampling: str = "uniform"  # bear.config.NEGATIVE_SAMPLING
    dpo_beta: float = 1.0  # β of S-DPO

    def __post_init__(self):
        loss = get_loss(self.name)
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(
                f"normalisation: got {self.normalisation!r}, expected one of {NORMALISATIONS}"
            )
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature: got {self.temperature}, expected a finite τ > 0")
        loss.check(self)

"""``--config FILE``: the settings of ``train`` or ``sweep`` read from a JSON object.

Keys are ``TrainConfig`` field names (``lr``, ``reg_weight``, ...), so the ``config.json`` of an
earlier run works as one: its records of the run (``protocol_settings``, ``data_fingerprint``,
``data_resolved``) are read, not taken as settings. Flags given on the command line override
the file, and the file overrides the defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path

__all__ = ["RUN_RECORD_KEYS", "read_config_file"]

# What train adds to RUN/config.json beside the settings: records of the run, not settings.
RUN_RECORD_KEYS = ("protocol_settings", "data_fingerprint", "data_resolved")
# The settings a protocol fills when they are left unset (``TrainConfig._resolve_protocol``).
_PROTOCOL_FILLED = ("train_file", "test_file", "length_penalty", "normalisation")


def read_config_file(path: str | Path, config_cls, axes: bool = False) -> dict:
    """The field values in the JSON object at ``path``, checked against ``config_cls``'s types.

    ``{"lr": 1e-4, "lora_targets": ["q_proj"]}`` -> ``{"lr": 1e-4, "lora_targets": ("q_proj",)}``.
    A run's config.json: where its protocol filled a setting (``protocol_settings`` records the
    value), the setting is left unset so that the protocol in force fills it again (a
    ``--protocol`` on the command line decides them); a relative ``data`` that does not
    resolve from here is read where the run resolved it. ``axes``: a list for a one-valued
    field is kept as a list (a sweep's axis) instead of refused.

    Raises ValueError naming the file and the key: unreadable or not a JSON object, a key that is
    no setting, a value of the wrong type.
    """
    where = f"--config {path}"
    try:
        saved = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where}: not JSON ({exc}); write one object of settings") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{where}: a JSON {type(saved).__name__}; write one object of settings")
    hints = typing.get_type_hints(config_cls)
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(saved) - known - set(RUN_RECORD_KEYS))
    if unknown:
        near = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
        hints_text = "".join(f"; {k}: did you mean {m[0]}?" for k, m in near.items() if m)
        raise ValueError(
            f"{where}: unknown keys {unknown}{hints_text}; the keys are the settings' names "
            "(--reg-weight is reg_weight; see train --help)"
        )
    values = {}
    for key, value in saved.items():
        if key in known:
            values[key] = _checked(where, key, value, hints[key], axes)
    filled = saved.get("protocol_settings")
    if isinstance(filled, dict):
        for key in _PROTOCOL_FILLED:
            if key in values and values[key] == filled.get(key):
                values[key] = None
    resolved = saved.get("data_resolved")
    if "data" in values and not Path(str(values["data"])).is_dir() and isinstance(resolved, str):
        values["data"] = resolved
    return values


def _checked(where: str, key: str, value, hint, axes: bool):
    """``value`` if it has the type ``hint`` asks for (a list becomes a tuple for a tuple field;
    with ``axes``, a list of such values for any other field)."""
    if typing.get_origin(hint) is tuple:
        (element,) = typing.get_args(hint)[:1]
        if isinstance(value, list) and all(_is(v, element) for v in value):
            return tuple(value)
        raise ValueError(f"{where}: {key}: got {value!r}, expected a list of {element.__name__}")
    if axes and isinstance(value, list) and value and all(_is(v, hint) for v in value):
        return value
    if _is(value, hint):
        return value
    expected = " or ".join(_type_name(k) for k in _kinds(hint))
    several = " (one value: several are a sweep's axis)" if isinstance(value, list) else ""
    raise ValueError(f"{where}: {key}: got {value!r}, expected {expected}{several}")


def _kinds(hint) -> tuple:
    return typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)


def _is(value, hint) -> bool:
    for kind in _kinds(hint):
        if kind is type(None) and value is None:
            return True
        if kind is bool and isinstance(value, bool):
            return True
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            return True
        if kind in (str, dict) and isinstance(value, kind):
            return True
    return False


def _type_name(kind) -> str:
    return "null" if kind is type(None) else kind.__name__

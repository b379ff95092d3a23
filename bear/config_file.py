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

from bear.config import default_lr
from bear.protocol import PROTOCOLS, test_file_for

__all__ = ["LAUNCH_KEYS", "RUN_RECORD_KEYS", "read_config_file"]

# What train adds to RUN/config.json beside the settings: records of the run, not settings.
RUN_RECORD_KEYS = ("protocol_settings", "data_fingerprint", "data_resolved")
# Switches of one launch: a run's config.json records them, a file of settings never sets them.
LAUNCH_KEYS = ("resume", "overwrite", "allow_data_change")


def read_config_file(path: str | Path, config_cls, axes: bool = False) -> dict:
    """The field values in the JSON object at ``path``, checked against ``config_cls``'s types.

    ``{"lr": 1e-4, "lora_targets": ["q_proj"]}`` -> ``{"lr": 1e-4, "lora_targets": ("q_proj",)}``.
    A run's config.json (it has ``RUN_RECORD_KEYS``): its launch switches (``LAUNCH_KEYS``) are
    dropped, what it derived is left unset to be derived again from the settings in force (the
    protocol's defaults, the model kind's learning rate, a micro-batch equal to the batch), and a
    relative ``data`` that does not resolve from here is read where the run resolved it.
    ``axes``: a list for a one-valued field is kept as a list (a sweep's axis) instead of
    refused. An integer for a float setting becomes a float.

    Raises ValueError naming the file and the key: unreadable or not a JSON object, a key that is
    no setting, a value of the wrong type, a launch switch in a file of settings.
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
    launch = sorted(key for key in LAUNCH_KEYS if values.get(key))
    for key in LAUNCH_KEYS:
        values.pop(key, None)
    if any(key in saved for key in RUN_RECORD_KEYS):  # a run's config.json
        _unset_what_was_derived(values)
    elif launch:
        raise ValueError(
            f"{where}: {launch} belong to one launch, not to a file of settings; give them on "
            "the command line (--resume, --overwrite, --allow-data-change)"
        )
    resolved = saved.get("data_resolved")
    data = values.get("data")
    if isinstance(data, str) and not Path(data).is_dir() and isinstance(resolved, str):
        values["data"] = resolved
    return values


def _unset_what_was_derived(values: dict) -> None:
    """In a run's settings, unset (None) what the run derived rather than chose, so that it is
    derived again from the settings in force: a protocol's file names, length penalty and
    normalisation (equal to that protocol's defaults), the learning rate of the model kind
    (``TrainConfig.__post_init__``), a micro-batch equal to the batch."""
    protocol = values.get("protocol", "ours")
    if protocol in PROTOCOLS:
        defaults = PROTOCOLS[protocol]
        for key in ("train_file", "length_penalty", "normalisation"):
            if key in values and values[key] == getattr(defaults, key):
                values[key] = None
        if "test_file" in values and isinstance(values.get("data"), str):
            if values["test_file"] == test_file_for(protocol, values["data"]):
                values["test_file"] = None
    if "lr" in values and values["lr"] == default_lr(values.get("model", "tiny")):
        values["lr"] = None
    if "micro_batch_size" in values and values["micro_batch_size"] == values.get("batch_size"):
        values["micro_batch_size"] = None


def _checked(where: str, key: str, value, hint, axes: bool):
    """``value`` if it has the type ``hint`` asks for (a list becomes a tuple for a tuple field;
    with ``axes``, a list of such values for any other field)."""
    if typing.get_origin(hint) is tuple:
        (element,) = typing.get_args(hint)[:1]
        if isinstance(value, list) and all(_is(v, element) for v in value):
            return tuple(value)
        raise ValueError(f"{where}: {key}: got {value!r}, expected a list of {element.__name__}")
    if axes and isinstance(value, list) and value and all(_is(v, hint) for v in value):
        return [_as_float(v, hint) for v in value]
    if _is(value, hint):
        return _as_float(value, hint)
    expected = " or ".join(_type_name(k) for k in _kinds(hint))
    several = " (one value: several are a sweep's axis)" if isinstance(value, list) else ""
    raise ValueError(f"{where}: {key}: got {value!r}, expected {expected}{several}")


def _as_float(value, hint):
    """An int for a float setting as a float (1 -> 1.0, as the command line parses it)."""
    if isinstance(value, int) and not isinstance(value, bool) and float in _kinds(hint):
        return float(value)
    return value


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

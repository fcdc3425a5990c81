"""Turn parsed spec data into plain JSON values, refusing what JSON cannot hold.

Python callers and HF PEFT's ``to_dict()`` hand over more than JSON: sets and tuples (``target_modules``), str
enums (``PeftType.LORA``), nested dataclasses, NumPy integers. These become lists (sets sorted, so a spec is the
same on every run), strings, mappings and ints. Refused with the JSON path: non-string keys, NaN and ±infinity,
integers outside msgspec's 64-bit range, strings over ``MAX_STRING``, nesting past ``MAX_DEPTH``, more than
``MAX_NODES`` values, and any other type (bytes, dates, objects).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
from collections.abc import Mapping

from peftdecl._json import JsonValue
from peftdecl.errors import SpecError
from peftdecl.spec.limits import MAX_DEPTH, MAX_INT, MAX_NODES, MAX_STRING, MIN_INT


class _FaultError(Exception):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


def plain_json(data: object, origin: str | None = None) -> JsonValue:
    """``data`` as plain JSON values (dict, list, str, int, float, bool, None), or a SpecError at the first fault."""
    counter = [0]
    try:
        return _plain(data, "$", 0, counter)
    except _FaultError as fault:
        raise SpecError([(fault.path, fault.message)], origin) from None


def _plain(value: object, path: str, depth: int, counter: list[int]) -> JsonValue:
    counter[0] += 1
    if counter[0] > MAX_NODES:
        raise _FaultError("$", f"more than {MAX_NODES} values in one spec")
    if depth > MAX_DEPTH:
        raise _FaultError(path, f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise _FaultError(path, f"string of {len(value)} characters; at most {MAX_STRING}")
        return str(value)
    if isinstance(value, numbers.Integral):
        value = int(value)
        if not MIN_INT <= value <= MAX_INT:
            raise _FaultError(path, f"integer of {value.bit_length()} bits is out of range (at most 64 bits)")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _FaultError(path, f"must be a finite number, got {value}")
        return float(value)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if isinstance(key, enum.Enum):
                key = key.value
            if not isinstance(key, str):
                raise _FaultError(
                    path, f"mapping keys must be strings, got {type(key).__name__} {_short(key)}"
                )
            if len(key) > MAX_STRING:
                raise _FaultError(path, f"key of {len(key)} characters; at most {MAX_STRING}")
            out[str(key)] = _plain(item, f"{path}.{key}", depth + 1, counter)
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{path}[{i}]", depth + 1, counter) for i, item in enumerate(value)]
    if isinstance(value, (set, frozenset)):
        items = [_plain(item, f"{path}[{i}]", depth + 1, counter) for i, item in enumerate(value)]
        if all(isinstance(item, str) for item in items):
            return sorted(items)
        return sorted(items, key=_order)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return _plain(fields, path, depth, counter)
    raise _FaultError(
        path,
        f"expected a JSON value (string, number, true/false, null, list or mapping), got {type(value).__name__}",
    )


def _order(item: object) -> tuple[str, str]:
    # sets from PEFT hold strings; mixed sets still get one deterministic order
    return (type(item).__name__, repr(item))


def _short(value: object) -> str:
    try:
        text = repr(value)
    except Exception:  # a repr that fails (or an int past the digit limit) must not hide the real problem
        return "?"
    return text if len(text) <= 40 else text[:37] + "..."

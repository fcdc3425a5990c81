"""``--set KEY=VALUE``: change a training file's parsed data before it is validated.

``KEY`` is a dotted path into the file (``training.max_steps``); ``VALUE`` is read as one YAML scalar or flow
collection (``5``, ``2.0e-4``, ``1e-4``, ``null``, ``true``, ``[hf, mlx-lm]``), with the same bounded reader as
the files. Missing intermediate mappings are created. A bad value is left to schema validation, which names the
field's JSON path; only a malformed override itself is refused here.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence

from peftdecl._json import JsonObject, JsonValue
from peftdecl.errors import SpecError, TrainConfigError
from peftdecl.spec.limits import MAX_STRING

MAX_OVERRIDES = 1000
"""``--set`` options at most (far above any real command line; bounds the work before validation)."""

EXPONENT_FLOAT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+")
"""Floats YAML 1.2 reads as numbers but PyYAML's YAML 1.1 resolver leaves as strings (``1e-4``: no dot)."""


def apply_overrides(data: Mapping[str, JsonValue], overrides: Sequence[str]) -> JsonObject:
    """A copy of ``data`` with each ``KEY=VALUE`` of ``overrides`` set, in order (a later one wins)."""
    if len(overrides) > MAX_OVERRIDES:
        raise TrainConfigError([("--set", f"{len(overrides)} overrides; at most {MAX_OVERRIDES}")])
    out: JsonObject = copy.deepcopy(dict(data))
    for text in overrides:
        keys, value = parse_override(text)
        _assign(out, keys, value, text)
    return out


def parse_override(text: str) -> tuple[list[str], JsonValue]:
    """``"training.max_steps=5"`` -> ``(["training", "max_steps"], 5)``; TrainConfigError when malformed."""
    where = f"--set {_preview(text)}"
    if len(text) > MAX_STRING:
        raise TrainConfigError([(where, f"longer than {MAX_STRING} characters")])
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep:
        raise TrainConfigError([(where, "expected KEY=VALUE, e.g. training.max_steps=5")])
    if not key:
        raise TrainConfigError([(where, "the key before '=' is empty")])
    keys = key.split(".")
    if any(not part.strip() for part in keys):
        raise TrainConfigError([(where, f"the key {key!r} has an empty part between dots")])
    return [part.strip() for part in keys], parse_value(raw, where)


def parse_value(raw: str, where: str) -> JsonValue:
    """One YAML value (``""`` is null, as in YAML); exponent floats without a dot are floats (YAML 1.2)."""
    from peftdecl.spec._yaml import load_yaml

    stripped = raw.strip()
    if EXPONENT_FLOAT.fullmatch(stripped):
        return float(stripped)
    try:
        return load_yaml(raw, None)
    except SpecError as exc:
        reason = "; ".join(message for _, message in exc.problems) or str(exc)
        raise TrainConfigError([(where, f"the value is not valid YAML: {reason}")]) from None


def _assign(data: JsonObject, keys: list[str], value: JsonValue, text: str) -> None:
    node: JsonObject = data
    for depth, part in enumerate(keys[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            through = ".".join(keys[: depth + 1])
            raise TrainConfigError(
                [
                    (
                        f"--set {_preview(text)}",
                        f"{through} is {_kind(child)}, not a mapping, so it has no field {keys[depth + 1]!r}",
                    )
                ]
            )
        node = child
    node[keys[-1]] = value


def _kind(value: JsonValue) -> str:
    if isinstance(value, bool):
        return "true or false"
    names = {str: "a string", int: "a number", float: "a number", list: "a list"}
    return names.get(type(value), type(value).__name__)


def _preview(text: str) -> str:
    return text if len(text) <= 80 else text[:60] + "..." + text[-12:]

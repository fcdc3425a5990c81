"""``load_spec``: read a spec from a file, text, dict or PEFT config; check it against its JSON Schema; decode it.

Validation happens in this order so every error is precise: bounded read (:mod:`~peftdecl.spec._read`) → plain
JSON values (:mod:`~peftdecl.spec._values`: sets sorted, NaN refused, ...) → ``peft_type`` (HF PEFT's upper-case
name) → unknown field names (with a "did you mean") → JSON Schema (every error with its JSON path; the schema also
states the cross-field rules) → whole floats in integer fields made ints → msgspec decode → the Python checks
(cross-field rules again, regex compilation). Every failure is a :class:`SpecError`.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
from collections.abc import Iterable, Mapping

import jsonschema
import msgspec

from peftdecl._json import JsonObject, JsonValue
from peftdecl.errors import SpecError
from peftdecl.spec._base import SpecBase, deferred_checks
from peftdecl.spec._read import read_source
from peftdecl.spec._values import plain_json

SpecSource = str | bytes | os.PathLike[str] | Mapping[str, JsonValue] | SpecBase


def load_spec(source: SpecSource | object) -> SpecBase:
    """Load and check an adapter spec from a path, JSON/YAML text, bytes, a dict, an existing spec, or an HF PEFT
    config object (``peft.LoraConfig(...)``: anything with PEFT's ``to_dict()`` and ``peft_type``).

    A path to a folder reads its ``adapter_config.json``. Raises :class:`SpecError` listing every problem found;
    no other exception escapes for any input (bounds in :mod:`peftdecl.spec.limits`).
    """
    if isinstance(source, SpecBase):
        # a Struct built in code skipped msgspec's type and bound checks; check it like any other mapping
        name = type(source).__name__
        try:
            built = msgspec.to_builtins(source)
        except (TypeError, ValueError, OverflowError) as exc:
            raise SpecError([("$", f"cannot read this spec's fields: {exc}")], name) from None
        return spec_from_dict(built, name)
    data, origin = read_source(source)
    return spec_from_dict(data, origin)


def spec_from_dict(data: object, origin: str | None = None) -> SpecBase:
    """Check and decode an already-parsed spec mapping."""
    data = plain_json(data, origin)
    if not isinstance(data, Mapping):
        raise SpecError([("$", f"expected a mapping of spec fields, got {_json_type(data)}")], origin)
    spec_types = _spec_types()
    peft_type = data.get("peft_type")
    if peft_type is None:
        raise SpecError([("$.peft_type", f"is required; one of {', '.join(spec_types)}")], origin)
    if not isinstance(peft_type, str) or peft_type not in spec_types:
        # HF PEFT's PeftType is upper case and PEFT refuses "lora"; so does peftdecl, with the fix in the message
        hint = _did_you_mean(peft_type.upper(), spec_types) if isinstance(peft_type, str) else ""
        raise SpecError(
            [
                (
                    "$.peft_type",
                    f"unknown adapter kind {_preview(peft_type)}{hint}; expected one of {', '.join(spec_types)}",
                )
            ],
            origin,
        )
    cls = spec_types[peft_type]
    data = _as_sets(data)
    problems = _unknown_fields(data, cls) + _schema_problems(data, cls)
    if problems:
        raise SpecError(problems, origin)
    from peftdecl.schema import struct_schema

    data = whole_floats_to_ints(data, struct_schema(cls))
    with deferred_checks():
        try:
            spec = msgspec.convert(data, cls)
        except msgspec.ValidationError as exc:
            raise SpecError([_msgspec_problem(str(exc))], origin) from None
    problems = spec.problems()
    if problems:
        raise SpecError(problems, origin)
    return spec


def _spec_types() -> dict[str, type[SpecBase]]:
    """peft_type -> Struct of every registered kind (read at call time: kinds can be registered at runtime)."""
    from peftdecl.kinds import spec_types

    return spec_types()


SET_FIELDS = ("target_modules", "exclude_modules", "feedforward_modules")
"""Fields HF PEFT turns into sets (``LoraConfig.__post_init__`` and friends): order and repeats mean nothing, and
a saved ``adapter_config.json`` lists them in arbitrary set order, so they are kept sorted and unique."""


def _as_sets(data: Mapping[str, JsonValue]) -> JsonObject:
    out = dict(data)
    for name in SET_FIELDS:
        value = out.get(name)
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            out[name] = sorted(set(value))
    return out


def whole_floats_to_ints(value: JsonValue, schema: JsonValue) -> JsonValue:
    """``8.0`` -> ``8`` wherever ``schema`` wants an integer (JSON Schema's "integer" accepts 8.0, msgspec does not;
    the value is the same number, so load_spec takes it as the integer, as the schema says)."""
    if not isinstance(schema, Mapping):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() and _wants_integer(schema) else value
    branches = [schema, *schema.get("anyOf", ()), *schema.get("allOf", ())]
    if isinstance(value, dict):
        for branch in branches:
            props = branch.get("properties")
            extra = branch.get("additionalProperties")
            if isinstance(props, Mapping) or isinstance(extra, Mapping):
                props = props or {}
                return {
                    k: whole_floats_to_ints(v, props.get(k, extra if isinstance(extra, Mapping) else None))
                    for k, v in value.items()
                }
        return value
    if isinstance(value, list):
        for branch in branches:
            if branch.get("type") == "array":
                prefix = branch.get("prefixItems", [])
                items = branch.get("items")
                return [
                    whole_floats_to_ints(v, prefix[i] if i < len(prefix) else items)
                    for i, v in enumerate(value)
                ]
    return value


def _wants_integer(schema: Mapping[str, JsonValue]) -> bool:
    """Whether ``schema`` takes integers and no other numbers: ``type: integer``, or an enum of integers (the
    training file's ``bits: 4.0`` is the enum's 4)."""
    branches = [schema, *schema.get("anyOf", ()), *schema.get("allOf", ())]
    kinds = {b.get("type") for b in branches if isinstance(b, Mapping)}
    if any(isinstance(b, Mapping) and _integer_enum(b.get("enum")) for b in branches):
        kinds.add("integer")
    return "integer" in kinds and "number" not in kinds


def _integer_enum(values: JsonValue) -> bool:
    return (
        isinstance(values, list)
        and bool(values)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    )


def _json_type(value: JsonValue) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "a number"}
    return "null" if value is None else names.get(type(value), "a number")


def _msgspec_problem(message: str) -> tuple[str, str]:
    # msgspec reports "Expected `int`, got `str` - at `$.r`"; split off its path
    text, sep, where = message.rpartition(" - at `")
    return (where.rstrip("`"), text) if sep else ("$", message)


def _unknown_fields(data: Mapping[str, JsonValue], cls: type[SpecBase]) -> list[tuple[str, str]]:
    known = {f.encode_name for f in msgspec.structs.fields(cls)} | {"peft_type"}
    problems = []
    for key in data:
        if key in known:
            continue
        owners = [
            t for t, other in _spec_types().items() if key in {f.name for f in msgspec.structs.fields(other)}
        ]
        if owners:
            message = f"unknown field for {cls.__struct_config__.tag}; it belongs to {', '.join(owners)}"
        else:
            message = f"unknown field{_did_you_mean(key, known)}"
        problems.append((f"$.{key}", message))
    return problems


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    if len(word) > 100:  # no field name is this long; difflib's cost grows with the length
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _schema_problems(data: Mapping[str, JsonValue], cls: type[SpecBase]) -> list[tuple[str, str]]:
    validator = _validator(cls)
    problems: dict[str, str] = {}
    for error in (narrowed for found in _errors(validator, data) for narrowed in _into_object(found)):
        if error.validator == "additionalProperties":
            continue  # reported with a suggestion by _unknown_fields
        path = list(error.absolute_path)
        message = describe_error(error)
        if error.validator == "required":
            name = _missing_name(error)
            props = error.schema.get("properties", {}) if isinstance(error.schema, Mapping) else {}
            prop = props.get(name, {}) if isinstance(props, Mapping) else {}
            message = prop.get("x-required-error") or prop.get("x-error") or "is required"
            path.append(name)
        problems.setdefault(json_path(path), message)  # the first (most basic) problem of a field
    return list(problems.items())


@functools.cache
def _validator(cls: type[SpecBase]) -> jsonschema.Draft202012Validator:
    # keyed by the Struct, not its peft_type: a kind registered again may bring a new Struct for the same name
    from peftdecl.schema import struct_schema

    return jsonschema.Draft202012Validator(struct_schema(cls))


def _errors(validator: jsonschema.Draft202012Validator, data: JsonValue) -> list[jsonschema.ValidationError]:
    try:
        return sorted(validator.iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path])
    except RecursionError:  # plain_json bounds nesting, so this is a safety net
        raise SpecError([("$", "nested too deeply to validate")]) from None


def _into_object(error: jsonschema.ValidationError) -> list[jsonschema.ValidationError]:
    """A mapping that fails an anyOf with exactly one object branch (a sub-config or null): that branch's own
    errors, so that the problem is reported at the nested field (``$.kasa_config.beta``)."""
    if error.validator != "anyOf" or not isinstance(error.instance, Mapping):
        return [error]
    branches = error.validator_value if isinstance(error.validator_value, list) else []
    objects = [i for i, b in enumerate(branches) if isinstance(b, Mapping) and b.get("type") == "object"]
    if len(objects) != 1:
        return [error]
    inner = [
        e for e in error.context or () if e.relative_schema_path and e.relative_schema_path[0] == objects[0]
    ]
    return sorted(inner, key=lambda e: [str(p) for p in e.absolute_path]) or [error]


def _missing_name(error: jsonschema.ValidationError) -> str:
    wanted = error.validator_value if isinstance(error.validator_value, list) else []
    instance = error.instance if isinstance(error.instance, Mapping) else {}
    for name in wanted:
        if name not in instance and error.message.startswith(repr(name)):
            return str(name)
    return next((str(n) for n in wanted if n not in instance), "?")


def json_path(parts: Iterable[str | int]) -> str:
    """``['target_modules', 1]`` -> ``$.target_modules[1]``."""
    path = "$"
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def describe_error(error: jsonschema.ValidationError) -> str:
    """One line: what was expected and what was found."""
    got = _preview(error.instance)
    kind = error.validator
    if isinstance(error.schema, Mapping) and "x-error" in error.schema:
        return str(error.schema["x-error"])
    if kind == "not" and isinstance(error.instance, float) and error.instance != error.instance:
        return "must be a finite number, got NaN"
    if kind in ("type", "anyOf", "oneOf", "enum", "const"):
        return f"expected {describe_schema(error.schema)}, got {got}"
    if kind in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        sign = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}[kind]
        return f"must be {sign} {error.validator_value}, got {got}"
    if kind == "required":
        return error.message
    return f"{error.message}"


def describe_schema(schema: JsonValue) -> str:
    """A short English description of what a (sub)schema accepts."""
    if not isinstance(schema, Mapping):
        return "any value"
    if "const" in schema:
        return json.dumps(schema["const"])
    if "enum" in schema:
        return "one of " + ", ".join(json.dumps(v) for v in schema["enum"])
    if schema.get("allOf"):
        return describe_schema(schema["allOf"][0])
    if "anyOf" in schema or "oneOf" in schema:
        options = [describe_schema(s) for s in schema.get("anyOf", schema.get("oneOf"))]
        return " or ".join(options)
    kind = schema.get("type")
    if kind == "array":
        items = schema.get("items")
        return f"a list of {_plural(describe_schema(items))}" if items else "a list"
    if kind == "object":
        values = schema.get("additionalProperties")
        if isinstance(values, Mapping):
            return f"a mapping of names to {_plural(describe_schema(values))}"
        return "a mapping"
    names = {
        "string": "a string",
        "integer": "an integer",
        "number": "a number",
        "boolean": "true or false",
        "null": "null",
    }
    text = names.get(kind, "any value") if isinstance(kind, str) else "any value"
    bounds = [
        f"{op} {schema[key]}"
        for key, op in (
            ("minimum", ">="),
            ("exclusiveMinimum", ">"),
            ("maximum", "<="),
            ("exclusiveMaximum", "<"),
        )
        if key in schema
    ]
    return f"{text} {' and '.join(bounds)}" if bounds else text


def _plural(text: str) -> str:
    for article in ("an ", "a "):
        if text.startswith(article):
            head, _, rest = text[len(article) :].partition(" ")
            return f"{head}s {rest}".strip()
    return text


def _preview(value: object) -> str:
    try:
        text = json.dumps(value, default=str)
    except (ValueError, TypeError, RecursionError):  # a huge int, NaN in a strange place, a cycle
        text = f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."

"""``load_spec``: read a spec from a file, text or dict; check it against its JSON Schema; decode it with msgspec.

Validation happens in this order so every error is precise: parse → ``peft_type`` → unknown field names (with a
"did you mean") → JSON Schema (every error with its JSON path) → msgspec decode → cross-field checks.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import msgspec

from peftdecl.errors import SpecError
from peftdecl.spec import SPEC_TYPES, SpecBase
from peftdecl.spec._base import deferred_checks

SpecSource = str | bytes | os.PathLike[str] | Mapping[str, Any] | SpecBase
_SPEC_SUFFIXES = (".json", ".yaml", ".yml")


def load_spec(source: SpecSource) -> SpecBase:
    """Load and check an adapter spec from a path, JSON/YAML text, bytes, a dict, or an existing spec.

    A path to a folder reads its ``adapter_config.json``. Raises :class:`SpecError` listing every problem found.
    """
    if isinstance(source, SpecBase):
        return source
    data, origin = _read_source(source)
    return spec_from_dict(data, origin)


def spec_from_dict(data: Any, origin: str | None = None) -> SpecBase:
    """Check and decode an already-parsed spec mapping."""
    if not isinstance(data, Mapping):
        raise SpecError([("$", f"expected a mapping of spec fields, got {type(data).__name__}")], origin)
    peft_type = data.get("peft_type")
    if peft_type is None:
        raise SpecError([("$.peft_type", f"is required; one of {', '.join(SPEC_TYPES)}")], origin)
    if not isinstance(peft_type, str) or peft_type.upper() not in SPEC_TYPES:
        hint = _did_you_mean(str(peft_type).upper(), SPEC_TYPES)
        raise SpecError(
            [
                (
                    "$.peft_type",
                    f"unknown adapter kind {peft_type!r}{hint}; expected one of {', '.join(SPEC_TYPES)}",
                )
            ],
            origin,
        )
    data = {**data, "peft_type": peft_type.upper()}
    cls = SPEC_TYPES[data["peft_type"]]
    problems = _unknown_fields(data, cls) + _schema_problems(data, cls)
    if problems:
        raise SpecError(problems, origin)
    with deferred_checks():
        try:
            spec = msgspec.convert(data, cls)
        except msgspec.ValidationError as exc:
            raise SpecError([_msgspec_problem(str(exc))], origin) from None
    problems = spec.problems()
    if problems:
        raise SpecError(problems, origin)
    return spec


def _msgspec_problem(message: str) -> tuple[str, str]:
    # msgspec reports "Expected `int`, got `str` - at `$.r`"; split off its path
    text, sep, where = message.rpartition(" - at `")
    return (where.rstrip("`"), text) if sep else ("$", message)


def _unknown_fields(data: Mapping[str, Any], cls: type[SpecBase]) -> list[tuple[str, str]]:
    known = {f.encode_name for f in msgspec.structs.fields(cls)} | {"peft_type"}
    problems = []
    for key in data:
        if key in known:
            continue
        owners = [
            t for t, other in SPEC_TYPES.items() if key in {f.name for f in msgspec.structs.fields(other)}
        ]
        if owners:
            message = f"unknown field for {cls.__struct_config__.tag}; it belongs to {', '.join(owners)}"
        else:
            message = f"unknown field{_did_you_mean(key, known)}"
        problems.append((f"$.{key}", message))
    return problems


def _did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _schema_problems(data: Mapping[str, Any], cls: type[SpecBase]) -> list[tuple[str, str]]:
    from peftdecl.schema import kind_schema

    validator = jsonschema.Draft202012Validator(kind_schema(cls.__struct_config__.tag))
    problems = []
    for error in sorted(validator.iter_errors(dict(data)), key=lambda e: list(e.absolute_path)):
        if error.validator == "additionalProperties":
            continue  # reported with a suggestion by _unknown_fields
        problems.append((json_path(error.absolute_path), describe_error(error)))
    return problems


def json_path(parts: Any) -> str:
    """``['target_modules', 1]`` -> ``$.target_modules[1]``."""
    path = "$"
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def describe_error(error: jsonschema.ValidationError) -> str:
    """One line: what was expected and what was found."""
    got = _preview(error.instance)
    kind = error.validator
    if kind in ("type", "anyOf", "oneOf", "enum", "const"):
        return f"expected {describe_schema(error.schema)}, got {got}"
    if kind in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        sign = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}[kind]
        return f"must be {sign} {error.validator_value}, got {got}"
    if kind == "required":
        return error.message
    return f"{error.message}"


def describe_schema(schema: Any) -> str:
    """A short English description of what a (sub)schema accepts."""
    if not isinstance(schema, Mapping):
        return "any value"
    if "const" in schema:
        return json.dumps(schema["const"])
    if "enum" in schema:
        return "one of " + ", ".join(json.dumps(v) for v in schema["enum"])
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


def _preview(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _read_source(source: Any) -> tuple[Any, str | None]:
    if isinstance(source, Mapping):
        return dict(source), None
    if isinstance(source, bytes):
        return _parse_text(source.decode("utf-8"), None, None), None
    if isinstance(source, os.PathLike) or (isinstance(source, str) and _looks_like_path(source)):
        path = Path(source)
        if path.is_dir():
            path = path / "adapter_config.json"
        if not path.is_file():
            raise SpecError([("$", "file not found")], str(path))
        return _parse_text(path.read_text(encoding="utf-8"), path.suffix.lower(), str(path)), str(path)
    if isinstance(source, str):
        return _parse_text(source, None, None), None
    raise SpecError([("$", f"cannot read a spec from a {type(source).__name__}")])


def _looks_like_path(text: str) -> bool:
    stripped = text.strip()
    if not stripped or stripped[0] in "{[" or "\n" in stripped:
        return False
    return stripped.lower().endswith(_SPEC_SUFFIXES) or Path(stripped).exists()


def _parse_text(text: str, suffix: str | None, origin: str | None) -> Any:
    if suffix in (".yaml", ".yml") or (suffix is None and not text.lstrip().startswith(("{", "["))):
        try:
            import yaml
        except ImportError:
            raise SpecError([("$", "YAML specs need PyYAML: pip install 'peftdecl[yaml]'")], origin) from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SpecError([("$", f"not valid YAML: {exc}")], origin) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(
            [("$", f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")], origin
        ) from None

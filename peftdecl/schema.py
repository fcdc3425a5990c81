"""JSON Schemas generated from the spec Structs; ``python -m peftdecl.schema --check`` fails when schemas/ is stale.

The checked-in files under ``schemas/`` are the published contract; validation at load time uses the same
schemas, generated in memory, so the two can never disagree once ``--check`` passes.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import msgspec

from peftdecl._json import JsonObject, JsonValue
from peftdecl.errors import PeftdeclError
from peftdecl.kinds import cached, spec_types
from peftdecl.spec import SpecBase
from peftdecl.spec.limits import MAX_FINITE, MAX_STRING
from peftdecl.spec.rules import NOT_EXPRESSIBLE, kind_rules, not_expressible

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_BASE_URL = "https://peftdecl.dev/schemas/0.1/"
UNION_FILE = "adapter.schema.json"


def schema_file_name(peft_type: str) -> str:
    """File name of one kind's schema, e.g. ``lora.schema.json``."""
    return f"{peft_type.lower()}.schema.json"


def kind_schema(peft_type: str) -> JsonObject:
    """The self-contained JSON Schema of one adapter kind (any registered ``peft_type``)."""
    types = spec_types()
    if peft_type not in types:
        raise KeyError(f"no adapter kind with peft_type {peft_type!r}; known: {', '.join(types)}")
    return struct_schema(types[peft_type])


@functools.cache
def struct_schema(cls: type[SpecBase]) -> JsonObject:
    """The self-contained JSON Schema of one spec Struct, generated from its fields and their metadata."""
    peft_type: str = cls.__struct_config__.tag  # type: ignore[assignment]
    generated = msgspec.json.schema(cls)
    defs = generated["$defs"]
    body = _inlined(defs.pop(cls.__name__), defs)
    defs = {}  # nested sub-configs (LoRA's kasa_config, ...) are inlined where used
    body["properties"]["peft_type"] = {
        "const": peft_type,
        "description": "The adapter kind (HF PEFT's name).",
    }
    body["properties"] = dict(sorted(body["properties"].items(), key=lambda kv: kv[0] != "peft_type"))
    body["title"] = f"{peft_type} adapter spec"
    body["description"] = (cls.__doc__ or "").strip().splitlines()[0] + _unstated(peft_type)
    unsupported = sorted(cls.UNSUPPORTED)
    if unsupported:
        body["x-unsupported"] = unsupported
    _apply_rules(body, cls, peft_type)
    schema = {"$schema": SCHEMA_DIALECT, "$id": SCHEMA_BASE_URL + schema_file_name(peft_type), **body}
    if defs:
        schema["$defs"] = defs
    return schema


def _inlined(schema: JsonValue, defs: JsonObject) -> JsonValue:
    """``schema`` with each ``{"$ref": "#/$defs/X"}`` replaced by X's schema (sub-config Structs never recurse), so
    that a kind's schema embeds in the union schema without a $defs of its own."""
    if isinstance(schema, list):
        return [_inlined(item, defs) for item in schema]
    if not isinstance(schema, dict):
        return schema
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        return _inlined(defs[ref.removeprefix("#/$defs/")], defs)
    return {key: _inlined(value, defs) for key, value in schema.items()}


def _unstated(peft_type: str) -> str:
    rules = [NOT_EXPRESSIBLE[name] for name in not_expressible(peft_type)]
    return " Also enforced by peftdecl, but not expressible in JSON Schema: " + "; ".join(rules) + "."


def _apply_rules(body: JsonObject, cls: type[SpecBase], peft_type: str) -> None:
    """Bound every value, pin unsupported fields to their default and add the cross-field rules (see
    :mod:`peftdecl.spec.rules`), so the schema accepts exactly what ``load_spec`` accepts."""
    props: JsonObject = body["properties"]
    rules, required, overrides = kind_rules(peft_type)
    for name, override in overrides.items():
        kept = {k: props[name][k] for k in ("description", "default") if k in props[name]}
        props[name] = {**kept, **override}
    for name, prop in props.items():
        if name != "peft_type":
            props[name] = harden(prop)
    for name, accepted in cls.UNSUPPORTED.items():
        prop = props[name]
        kept = {k: prop.pop(k) for k in ("description", "default") if k in prop}
        pinned = {
            "const": accepted,
            "x-error": f"not supported by peftdecl; only the default {_json(accepted)} is accepted",
        }
        props[name] = {**kept, "allOf": [prop, pinned]}
    if required:
        body["required"] = sorted({*body.get("required", ()), *required})
    if rules:
        body["allOf"] = rules


_NAN_GUARD = {"not": {"type": "number", "minimum": 0, "exclusiveMaximum": 0}}
"""Fails only for NaN: no finite number is both >= 0 and < 0, but every comparison with NaN is false, so NaN
passes both bounds and the ``not`` refuses it (JSON itself has no NaN; Python's json and YAML's .nan do)."""


def harden(schema: JsonValue) -> JsonValue:
    """A copy of ``schema`` where every number is finite and every string and key at most MAX_STRING long."""
    if isinstance(schema, list):
        return [harden(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {
        key: harden(value) if key not in ("const", "enum", "default") else value
        for key, value in schema.items()
    }
    kind = out.get("type")
    if kind == "number":
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = -MAX_FINITE
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = MAX_FINITE
        out.update(_NAN_GUARD)
    elif kind == "string":
        out.setdefault("maxLength", MAX_STRING)
    elif kind == "object":
        out.setdefault("propertyNames", {"maxLength": MAX_STRING})
    return out


def _json(value: object) -> str:
    return json.dumps(value)


def union_schema() -> JsonObject:
    """A schema accepting any registered adapter kind, dispatched on ``peft_type`` (cached by registry
    version)."""
    return cached("union_schema", lambda: _union_schema(spec_types()))


def _union_schema(types: dict[str, type[SpecBase]]) -> JsonObject:
    defs = {peft_type: _without_meta(struct_schema(cls)) for peft_type, cls in types.items()}
    branches = [
        {
            "if": {"properties": {"peft_type": {"const": t}}, "required": ["peft_type"]},
            "then": {"$ref": f"#/$defs/{t}"},
        }
        for t in types
    ]
    return {
        "$schema": SCHEMA_DIALECT,
        "$id": SCHEMA_BASE_URL + UNION_FILE,
        "title": "peftdecl adapter spec",
        "description": "Any adapter spec; peft_type selects the kind.",
        "type": "object",
        "required": ["peft_type"],
        "properties": {"peft_type": {"enum": list(types)}},
        "allOf": branches,
        "$defs": defs,
    }


def _without_meta(schema: JsonObject) -> JsonObject:
    body = {k: v for k, v in schema.items() if k not in ("$schema", "$id")}
    # nested $defs of a kind are rare (none today); refuse rather than mis-resolve references
    if "$defs" in body:
        raise RuntimeError("kind schemas with $defs cannot be embedded in the union schema")
    return body


def builtin_spec_types() -> dict[str, type[SpecBase]]:
    """peft_type -> Struct of the built-in kinds only: the published contract under ``schemas/``."""
    from peftdecl.kinds.builtin import BUILTIN_KINDS

    found: dict[str, type[SpecBase]] = {}
    for decl in BUILTIN_KINDS:
        found.setdefault(decl.peft_type, decl.spec_class)
    return found


def render_all(registered: bool = False) -> dict[str, str]:
    """File name -> file text for every schema file: of the built-in kinds, or with ``registered`` of every kind
    registered in this process (entry-point plugins included), and the training file's."""
    types = spec_types() if registered else builtin_spec_types()
    files = {schema_file_name(t): struct_schema(cls) for t, cls in types.items()}
    files[UNION_FILE] = _union_schema(types)
    from peftdecl.train.config import SCHEMA_FILE, train_schema

    files[SCHEMA_FILE] = train_schema()  # the training file's, whose inline adapter refers to UNION_FILE
    from peftdecl.recipe import RECIPE_SCHEMA_FILE, recipe_schema

    files[RECIPE_SCHEMA_FILE] = recipe_schema()  # peftdecl combine's merge recipe
    return {name: json.dumps(schema, indent=2, ensure_ascii=False) + "\n" for name, schema in files.items()}


def default_dir() -> Path:
    """The repository's ``schemas/`` folder."""
    return Path(__file__).resolve().parent.parent / "schemas"


def write(out_dir: Path, registered: bool = False) -> list[Path]:
    """Write every schema file of :func:`render_all` into ``out_dir`` (atomically, one file at a time)."""
    from peftdecl.formats.atomic import atomic_write_text

    written = []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, text in render_all(registered).items():
            atomic_write_text(out_dir / name, text)
            written.append(out_dir / name)
    except OSError as exc:  # under a file, on a file, read-only, ...: the folder is the user's input
        reason = exc.strerror or str(exc)
        raise PeftdeclError(f"{out_dir}: cannot write the schemas there: {reason}") from None
    return written


def stale_files(schema_dir: Path) -> list[str]:
    """Names of schema files that are missing, different, or no longer generated."""
    expected = render_all()
    problems = [name for name, text in expected.items() if _read(schema_dir / name) != text]
    if schema_dir.is_dir():
        problems += [p.name for p in schema_dir.glob("*.schema.json") if p.name not in expected]
    return sorted(problems)


def _read(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.is_file() else None


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m peftdecl.schema`` and ``peftdecl schema``."""
    parser = argparse.ArgumentParser(
        prog="peftdecl schema", description="Generate or check the JSON Schemas."
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="folder to write (default: the repo's schemas/)"
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if the folder is stale")
    parser.add_argument(
        "--registered",
        action="store_true",
        help="write every kind registered in this process (plugins included), not only the built-in ones",
    )
    args = parser.parse_args(argv)
    target = args.out or default_dir()
    if args.check:
        stale = stale_files(target)
        if stale:
            print(f"schemas in {target} are stale: {', '.join(stale)}", file=sys.stderr)
            print("regenerate with: python -m peftdecl.schema", file=sys.stderr)
            return 1
        print(f"schemas in {target} are up to date ({len(render_all())} files)")
        return 0
    try:
        written = write(target, args.registered)
    except PeftdeclError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

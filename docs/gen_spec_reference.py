"""Generate docs/spec-reference.md from the JSON Schemas in schemas/ (deterministic: same input, same bytes).

Run as a script (``python docs/gen_spec_reference.py [--check]``) or as a mkdocs hook: mkdocs.yml lists this
file under ``hooks:``, so ``mkdocs build`` regenerates the page before it collects the docs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import _page
from _page import write_if_changed

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_DIR = ROOT / "schemas"
OUTPUT = ROOT / "docs" / "spec-reference.md"
UNION_FILE = "adapter.schema.json"
MAX_STRING = 65_536  # every string's bound (peftdecl.spec.limits), stated once in the page's introduction

_BOUNDS = (
    ("minimum", "≥"),
    ("exclusiveMinimum", ">"),
    ("maximum", "≤"),
    ("exclusiveMaximum", "<"),
    ("minItems", "items ≥"),
    ("maxItems", "items ≤"),
)


def type_of(schema: Any) -> str:
    """A short type expression for a (sub)schema, e.g. ``int or list[int] or null``."""
    if not isinstance(schema, dict) or not schema:
        return "any"
    if "const" in schema:
        return json.dumps(schema["const"])
    if "enum" in schema:
        return " or ".join(json.dumps(v) for v in schema["enum"])
    if "anyOf" in schema:
        return " or ".join(dict.fromkeys(type_of(s) for s in schema["anyOf"]))
    if schema.get("allOf"):  # an unsupported field: its type, then the pinned default
        return type_of(schema["allOf"][0])
    kind = schema.get("type")
    if kind == "array":
        if "prefixItems" in schema:
            return "[" + ", ".join(type_of(s) for s in schema["prefixItems"]) + "]"
        return f"list[{type_of(schema['items'])}]" if "items" in schema else "list"
    if kind == "object":
        values = schema.get("additionalProperties")
        return f"map[str, {type_of(values)}]" if isinstance(values, dict) else "object"
    names = {"integer": "int", "number": "float", "string": "str", "boolean": "bool", "null": "null"}
    return names.get(kind, "any") if isinstance(kind, str) else "any"


def constraints_of(schema: Any) -> list[str]:
    """Numeric and length bounds of a schema and of its ``anyOf`` branches, e.g. ``≥ 1``."""
    if not isinstance(schema, dict):
        return []
    found = [
        f"{sign} {json.dumps(schema[key])}"
        for key, sign in _BOUNDS
        if key in schema and abs(schema[key]) != sys.float_info.max  # "finite" is said once, below
    ]
    if schema.get("type") == "number":
        found.append("finite")
    if "maxLength" in schema and schema.get("maxLength") != MAX_STRING:
        found.append(f"length ≤ {schema['maxLength']}")
    for branch in schema.get("anyOf", ()):
        found.extend(c for c in constraints_of(branch) if c not in found)
    return found


def cell(text: str) -> str:
    """Escape text for a Markdown table cell."""
    for char in "\\`*_[]|":
        text = text.replace(char, "\\" + char)
    return text.replace("<", "&lt;").replace("\n", " ")


def code(value: str) -> str:
    return "`" + value.replace("|", "\\|") + "`"


def sub_config_of(prop: Any) -> dict[str, Any] | None:
    """The object schema of a nested sub-config field (LoRA's ``kasa_config``: an object or null), else None."""
    branches = [prop, *prop.get("anyOf", ())] if isinstance(prop, dict) else []
    found = [b for b in branches if isinstance(b, dict) and b.get("type") == "object" and b.get("properties")]
    return found[0] if len(found) == 1 else None


def kind_section(schema: dict[str, Any]) -> str:
    """One adapter kind: heading, description, field table, unsupported fields."""
    props: dict[str, Any] = schema["properties"]
    peft_type = props["peft_type"]["const"]
    required = set(schema.get("required", ()))
    lines = [
        f"## {peft_type}",
        "",
        cell(schema.get("description", "")),
        "",
        f"Schema: `schemas/{peft_type.lower()}.schema.json`",
        "",
        "| Field | Type | Default | Description | Constraints |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, prop in props.items():
        default = code(json.dumps(prop["default"])) if "default" in prop else ""
        if name in required:
            default = "required"
        bounds = ", ".join(constraints_of(prop))
        sub_config = sub_config_of(prop)
        description = prop.get("description") or (sub_config or {}).get("description", "")
        lines.append(
            f"| {code(name)} | {code(type_of(prop))} | {default} | {cell(description)} | {cell(bounds)} |"
        )
        # a sub-config's fields, one row each
        for sub_name, sub_prop in (sub_config or {}).get("properties", {}).items():
            sub_default = code(json.dumps(sub_prop["default"])) if "default" in sub_prop else ""
            lines.append(
                f"| {code(f'{name}.{sub_name}')} | {code(type_of(sub_prop))} | {sub_default} "
                f"| {cell(sub_prop.get('description', ''))} | {cell(', '.join(constraints_of(sub_prop)))} |"
            )
    unsupported = schema.get("x-unsupported", [])
    lines.append("")
    if unsupported:
        lines.append("Accepted only at their default value (not implemented by peftdecl):")
        lines.append("")
        for name in unsupported:
            default = props.get(name, {}).get("default")
            lines.append(f"- {code(name)} = {code(json.dumps(default))}")
    else:
        lines.append("Every field is supported.")
    return "\n".join(lines) + "\n"


def kind_order(schema_dir: Path) -> list[str]:
    """Kinds in the union schema's order (HF PEFT's), else alphabetical."""
    union = schema_dir / UNION_FILE
    if union.is_file():
        return json.loads(union.read_text(encoding="utf-8"))["properties"]["peft_type"]["enum"]
    files = sorted(p.name for p in schema_dir.glob("*.schema.json") if p.name != UNION_FILE)
    return [name.removesuffix(".schema.json").upper() for name in files]


def render(schema_dir: Path = SCHEMA_DIR) -> str:
    """The whole page."""
    kinds = kind_order(schema_dir)
    if not kinds:
        raise SystemExit(f"no schemas in {schema_dir}; run: python -m peftdecl.schema")
    parts = [
        "# Spec reference",
        "",
        "<!-- Generated by docs/gen_spec_reference.py from schemas/*.schema.json; do not edit. -->",
        "",
        "Every field of every adapter kind, read from the published JSON Schemas. Field names and defaults",
        "are HF PEFT's. See [Writing specs](specs.md) for how specs are validated. Every string is at most",
        f"{MAX_STRING:,} characters; every number is finite (NaN and infinity are refused).",
        "",
        "Kinds: " + ", ".join(f"[{k}](#{k.lower()})" for k in kinds) + ".",
        "",
    ]
    for peft_type in kinds:
        path = schema_dir / f"{peft_type.lower()}.schema.json"
        parts.append(kind_section(json.loads(path.read_text(encoding="utf-8"))))
    return "\n".join(parts)


def write(output: Path = OUTPUT, schema_dir: Path = SCHEMA_DIR) -> bool:
    """Write the page if its text changed; True when it was written."""
    return write_if_changed(output, render(schema_dir))


def on_pre_build(config: Any) -> None:
    """mkdocs hook: regenerate the page before mkdocs collects the docs."""
    write()


def main(argv: list[str] | None = None) -> int:
    return _page.main(__doc__.splitlines()[0], OUTPUT, lambda current: render(), argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""Hypothesis strategies and settings shared by the spec fuzz and schema-agreement tests.

CI runs a small, derandomised number of examples; ``PEFTDECL_FUZZ_EXAMPLES=10000`` (any count) runs that many per
entry point, randomised, e.g. ``PEFTDECL_FUZZ_EXAMPLES=10000 pytest tests/test_spec_fuzz.py``.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

from hypothesis import strategies as st

from peftdecl.schema import kind_schema
from peftdecl.spec import SPEC_TYPES

BASES: dict[str, dict[str, Any]] = {
    "LORA": {"peft_type": "LORA", "target_modules": ["q"]},
    "ADALORA": {"peft_type": "ADALORA", "target_modules": ["q"], "total_step": 100},
    "IA3": {"peft_type": "IA3", "target_modules": ["q", "f"], "feedforward_modules": ["f"]},
    "LOHA": {"peft_type": "LOHA", "target_modules": ["q"]},
    "LOKR": {"peft_type": "LOKR", "target_modules": ["q"]},
    "OFT": {"peft_type": "OFT", "target_modules": ["q"], "r": 0, "oft_block_size": 2},
    "BOFT": {"peft_type": "BOFT", "target_modules": ["q"], "boft_block_size": 2},
    "VERA": {"peft_type": "VERA", "target_modules": ["q"], "r": 2},
    "PREFIX_TUNING": {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 2},
    "PROMPT_TUNING": {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2},
    "TRAINABLE_TOKENS": {"peft_type": "TRAINABLE_TOKENS", "target_modules": ["q"], "token_indices": [0, 1]},
}
"""A valid spec of each kind to mutate."""

COMMON_VALUES: list[Any] = [
    None, True, False, 0, 1, -1, 2, 4, 8, 8.0, 8.5, 0.5, 0.0, -0.0, 1.0, 0.99, 1e-9, 1e308, -1e308,
    math.nan, math.inf, -math.inf, 2**31, 2**53, 2**63, 2**64, -(2**63) - 1, 10**30,
    "", "q", "f", "x.q", "q.*", "(", "(a|aa)+c", "all-linear", "gaussian", "pissa", "eva", "TEXT", "RANDOM",
    "none", "all", "lycoris", "zero", "layers", "CAUSAL_LM", "SEQ_CLS", "lora", "LORA", "x" * 70_000,
    [], ["q"], ["f"], ["q", "f"], ["q", 1], [0], [0, 1], [0.0, 1.0], [-1], [True], [[0, 2]], [[0, 2, 4]],
    ["("], ["layers", "h"], {}, {"q": 2}, {"q": 2.0}, {"q": 2.5}, {"q": "x"}, {"q": math.nan}, {"(": 2},
    {"q": [True, False]}, {"q": []}, {"base_model_class": "X", "parent_library": "y"}, {"a": 1}, {"a": None},
]  # fmt: skip
"""Values tried in any field: wrong types, boundaries, whole floats, NaN/inf, bad regexes, rule triggers."""


def _numbers_in(schema: Any, found: set[Any]) -> None:
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum") and isinstance(
                value, int
            ):
                found.update({value - 1, value, value + 1})
            elif key in ("const", "default") and not isinstance(value, (dict, list)):
                found.add(value)
            elif key == "enum":
                found.update(v for v in value if not isinstance(v, (dict, list)))
            else:
                _numbers_in(value, found)
    elif isinstance(schema, list):
        for item in schema:
            _numbers_in(item, found)


def field_values(peft_type: str) -> dict[str, list[Any]]:
    """Field name -> the values of its own schema: bounds ±1, constants, enum members and the default."""
    props = kind_schema(peft_type)["properties"]
    out = {}
    for name, prop in props.items():
        extra: set[Any] = set()
        _numbers_in(prop, extra)
        out[name] = sorted(extra, key=repr) or [None]
    return out


FIELD_VALUES = {t: field_values(t) for t in SPEC_TYPES}
ALL_FIELDS = sorted({name for values in FIELD_VALUES.values() for name in values})


@st.composite
def mutated_specs(draw: st.DrawFn) -> dict[str, Any]:
    """A valid spec of a random kind with 0-5 mutations: set a field (its own or another kind's), delete one, add an
    unknown field, or change peft_type."""
    peft_type = draw(st.sampled_from(sorted(SPEC_TYPES)))
    data = copy.deepcopy(BASES[peft_type])
    values = FIELD_VALUES[peft_type]
    for _ in range(draw(st.integers(0, 5))):
        action = draw(
            st.sampled_from(["set", "set", "set", "set", "other", "delete", "unknown", "peft_type"])
        )
        if action == "set":
            name = draw(st.sampled_from(sorted(values)))
            # half the time a value of the field's own schema (mostly valid), else any value of the pool
            pool = values[name] if draw(st.booleans()) else COMMON_VALUES
            data[name] = copy.deepcopy(draw(st.sampled_from(pool)))
        elif action == "other":
            data[draw(st.sampled_from(ALL_FIELDS))] = copy.deepcopy(draw(st.sampled_from(COMMON_VALUES)))
        elif action == "delete" and data:
            data.pop(draw(st.sampled_from(sorted(data))))
        elif action == "unknown":
            data[draw(st.sampled_from(["lora_dropot", "rr", "Target_modules", ""]))] = 1
        else:
            data["peft_type"] = draw(
                st.sampled_from(["lora", "Lora", "LORAX", "", 3, None, *sorted(SPEC_TYPES)])
            )
    return data


def json_text(data: Any) -> str:
    """Python's json text of ``data`` (NaN/Infinity written as the non-JSON literals Python accepts)."""
    return json.dumps(data)


def yaml_text(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


_YAML_SNIPPETS = [
    "&a [*a]", "a: &a {b: *a}", "!!python/object:os.system {}", "!!binary aGk=", "!!set {a, b}", "2024-01-01",
    "!!timestamp 2001-12-14", "!custom x", "? [a]\n: 1", "1: 2", "*undefined", "{a: 1", "- a\nb: c", "\x00",
    "\ufeff", "\t", ".nan", "-.inf", "0x1F", "1_000", "0o17", "~", "<<: {a: 1}", "--- a\n--- b", "%YAML 1.1\n---\na",
    "[" * 40 + "]" * 40, "[" * 200 + "]" * 200, "9" * 5000, "'unterminated", '"\\x"', ":", "- - - -",
]  # fmt: skip


@st.composite
def spec_texts(draw: st.DrawFn) -> str:
    """Spec text: a mutated spec as JSON or YAML, possibly spliced with YAML/JSON hazards."""
    data = draw(mutated_specs())
    text = json_text(data) if draw(st.booleans()) else yaml_text(data)
    how = draw(st.sampled_from(["as is", "as is", "append", "replace", "slice", "snippet"]))
    snippet = draw(st.sampled_from(_YAML_SNIPPETS))
    if how == "append":
        text += "\n" + draw(st.sampled_from(["x", "peft_type"])) + ": " + snippet + "\n"
    elif how == "replace":
        text = snippet
    elif how == "slice":
        cut = draw(st.integers(0, max(len(text) - 1, 0)))
        text = text[:cut] + draw(st.text(max_size=8)) + text[cut + 1 :]
    elif how == "snippet":
        text = "peft_type: LORA\nrevision: " + snippet + "\n"
    return text


@st.composite
def spec_bytes(draw: st.DrawFn) -> bytes:
    """Spec bytes: UTF-8 (with or without BOM), UTF-16, or with invalid bytes spliced in."""
    raw = draw(spec_texts()).encode("utf-8", "surrogatepass")
    how = draw(st.sampled_from(["utf8", "bom", "utf16", "splice", "random"]))
    if how == "bom":
        return b"\xef\xbb\xbf" + raw
    if how == "utf16":
        return raw.decode("utf-8", "replace").encode("utf-16")
    if how == "splice":
        cut = draw(st.integers(0, len(raw)))
        return (
            raw[:cut]
            + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\x80", b"\xed\xa0\x80", b"\x00"]))
            + raw[cut:]
        )
    if how == "random":
        return draw(st.binary(max_size=64))
    return raw

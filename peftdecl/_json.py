"""Names for decoded JSON, the one kind of value in the core that is genuinely of any type.

A spec, an ``adapter_config.json`` or a JSON Schema is read into plain Python values (dict, list, str, int, float,
bool, None) whose shape is checked by validation (JSON Schema, msgspec), not by the type checker; these aliases say
so once instead of leaving every signature that passes such a value along untyped.
"""

from __future__ import annotations

from typing import Any, TypeAlias

JsonValue: TypeAlias = Any
"""A decoded JSON (or JSON-compatible YAML) value: a dict, list, str, int, float, bool or None, nested freely."""

JsonObject: TypeAlias = dict[str, Any]
"""A decoded JSON object: string keys, values of any JSON type (a config, a schema, a spec's raw data)."""

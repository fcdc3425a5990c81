"""Reading a spec's raw data from a path, text, bytes, a mapping or a PEFT config object, within hard bounds.

Every failure here is a :class:`SpecError` naming the source: undecodable bytes, oversized or non-regular files,
JSON's ``NaN``/``Infinity`` (not JSON values), YAML tags other than the JSON-compatible core ones, YAML aliases
that expand past :data:`~peftdecl.spec.limits.MAX_NODES` or refer to themselves, and nesting past
:data:`~peftdecl.spec.limits.MAX_DEPTH`.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn

from peftdecl._json import JsonValue
from peftdecl.errors import SpecError
from peftdecl.spec.limits import MAX_DEPTH, MAX_DOCUMENT_BYTES

_SPEC_SUFFIXES = (".json", ".yaml", ".yml")


def read_source(source: object) -> tuple[JsonValue, str | None]:
    """``(parsed data, origin)`` of any source :func:`~peftdecl.load_spec` accepts; origin names the file or object."""
    if isinstance(source, Mapping):
        return source, None
    if isinstance(source, (bytes, bytearray, memoryview)):
        raw = bytes(source)
        return parse_text(_decode(raw, None), None, None), None
    if isinstance(source, os.PathLike) or (isinstance(source, str) and _looks_like_path(source)):
        return _read_path(source)
    if isinstance(source, str):
        if len(source) > MAX_DOCUMENT_BYTES:
            raise SpecError([("$", f"spec text longer than {MAX_DOCUMENT_BYTES} characters")])
        return parse_text(source, None, None), None
    to_dict = getattr(source, "to_dict", None)
    if callable(to_dict) and hasattr(source, "peft_type"):
        # an HF PEFT config object (LoraConfig(...), ...); duck-typed so the core never imports peft
        origin = type(source).__name__
        try:
            return to_dict(), origin
        except Exception as exc:  # third-party code: report whatever it raised as this source's fault
            raise SpecError([("$", f"to_dict() failed: {type(exc).__name__}: {exc}")], origin) from None
    raise SpecError([("$", f"cannot read a spec from a {type(source).__name__}")])


def _read_path(source: str | os.PathLike[str]) -> tuple[JsonValue, str]:
    path: str | os.PathLike[str] = source
    try:
        path = Path(source)
        if path.is_dir():
            path = path / "adapter_config.json"
        info = path.stat()
    except FileNotFoundError:
        raise SpecError([("$", "file not found")], _show_path(path)) from None
    except (OSError, ValueError) as exc:  # name too long, NUL byte, permission, loop...
        raise SpecError([("$", f"cannot read: {_os_reason(exc)}")], _show_path(path)) from None
    origin = _show_path(path)
    if not stat.S_ISREG(info.st_mode):
        raise SpecError([("$", "not a regular file")], origin)
    if info.st_size > MAX_DOCUMENT_BYTES:
        raise SpecError(
            [("$", f"file is {info.st_size} bytes; a spec is at most {MAX_DOCUMENT_BYTES}")], origin
        )
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as exc:
        raise SpecError([("$", f"cannot read: {_os_reason(exc)}")], origin) from None
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise SpecError([("$", f"file grew past {MAX_DOCUMENT_BYTES} bytes while being read")], origin)
    return parse_text(_decode(raw, origin), path.suffix.lower(), origin), origin


def _show_path(source: object) -> str:
    text = os.fspath(source) if isinstance(source, (str, os.PathLike)) else str(source)
    text = str(text).replace("\x00", "\\x00")
    return text if len(text) <= 200 else text[:120] + "..." + text[-40:]


def _os_reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)[:200]


def _decode(raw: bytes, origin: str | None) -> str:
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise SpecError([("$", f"spec is {len(raw)} bytes; at most {MAX_DOCUMENT_BYTES}")], origin)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SpecError([("$", f"not UTF-8 text: invalid byte at offset {exc.start}")], origin) from None


def _looks_like_path(text: str) -> bool:
    stripped = text.strip()
    if not stripped or stripped[0] in "{[" or "\n" in stripped or len(stripped) > 4096:
        return False
    if stripped.lower().endswith(_SPEC_SUFFIXES):
        return True
    try:
        return Path(stripped).exists()
    except (OSError, ValueError):  # too long for the file system, or a NUL byte: not an existing path
        return False


def parse_text(text: str, suffix: str | None, origin: str | None) -> JsonValue:
    """JSON or YAML text -> data. YAML unless the suffix is .json or the text starts like a JSON document."""
    if suffix in (".yaml", ".yml") or (suffix != ".json" and not text.lstrip().startswith(("{", "["))):
        from peftdecl.spec._yaml import load_yaml

        return load_yaml(text, origin)
    return _load_json(text, origin)


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON value (numbers must be finite)")


def _load_json(text: str, origin: str | None) -> JsonValue:
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise SpecError(
            [("$", f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")], origin
        ) from None
    except RecursionError:
        raise SpecError([("$", f"not a valid spec: nested deeper than {MAX_DEPTH} levels")], origin) from None
    except ValueError as exc:  # a refused constant, or an integer past Python's 4300-digit conversion limit
        raise SpecError([("$", f"not valid JSON: {str(exc)[:200]}")], origin) from None

"""Adapter names: checked before one becomes a path component of a saved folder.

A saved folder holds the default adapter itself and every other adapter ``X`` in the sub-folder ``X``, and
``load_adapter(folder, name=X)`` reads ``folder/X``; so a name must be exactly one ordinary path component.
"""

from __future__ import annotations

import unicodedata

from peftdecl.errors import PeftdeclError

MAX_NAME_BYTES = 255
"""The longest name in UTF-8 bytes (the usual file-name limit of Linux and macOS file systems)."""


def check_adapter_name(name: object) -> str:
    """Return ``name`` if it can name an adapter and its sub-folder, else raise :class:`PeftdeclError`.

    Rules: a non-empty ``str``; not ``.`` or ``..``; no ``/`` or ``\\``; no NUL or other control character; at
    most 255 bytes in UTF-8; not starting with ``.`` (hidden siblings such as ``.x.peftdecl-staging-…`` are
    peftdecl's own save machinery, and hidden folders are never adapters)."""
    if not isinstance(name, str):
        raise PeftdeclError(f"adapter name {name!r}: expected a string, got {type(name).__name__}")
    problem = _problem(name)
    if problem:
        raise PeftdeclError(f"adapter name {name!r}: {problem}")
    return name


def _problem(name: str) -> str | None:
    if not name:
        return "must not be empty"
    if name in (".", ".."):
        return "must not be '.' or '..' (names are sub-folders of the saved folder)"
    if "/" in name or "\\" in name:
        return "must be one path component (no '/' or '\\')"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return "must not contain NUL or other control characters"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "must be valid Unicode (it holds a lone surrogate)"
    if size > MAX_NAME_BYTES:
        return f"is {size} bytes in UTF-8; at most {MAX_NAME_BYTES} are allowed"
    if name.startswith("."):
        return "must not start with '.' (hidden names are reserved for peftdecl's staging folders)"
    return None

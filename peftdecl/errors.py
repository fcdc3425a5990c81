"""Exceptions raised by peftdecl; each message names the field, key or file at fault."""

from __future__ import annotations

from collections.abc import Iterable


class PeftdeclError(Exception):
    """Base class of every error peftdecl raises on purpose."""


class SpecError(PeftdeclError, ValueError):
    """An adapter spec is invalid. ``problems`` holds ``(json_path, message)`` pairs, one per fault."""

    def __init__(self, problems: Iterable[tuple[str, str]], source: str | None = None) -> None:
        self.problems: tuple[tuple[str, str], ...] = tuple(problems)
        self.source = source
        prefix = f"{source}: " if source else ""
        lines = [f"{prefix}{path}: {message}" for path, message in self.problems]
        super().__init__("\n".join(lines) if lines else f"{prefix}invalid spec")


class TargetError(PeftdeclError, ValueError):
    """The spec's targeting rules select no layer, or select a layer the adapter kind cannot wrap."""


class AdapterFileError(PeftdeclError, ValueError):
    """An adapter file is missing, corrupt, or disagrees with its config."""


class BackendError(PeftdeclError, RuntimeError):
    """No backend can run the request, or a backend lacks a capability."""


class TrainConfigError(SpecError):
    """A training file (or a ``--set`` override) is invalid; ``problems`` holds ``(json_path, message)`` pairs."""


class DataError(PeftdeclError, ValueError):
    """A training or evaluation data file is missing or holds a line of the wrong shape (the message names the
    file and the line number)."""

"""The regular expressions a spec carries, checked when the spec loads and matched under a time limit.

HF PEFT reads these fields as Python regexes: a string ``target_modules`` / ``exclude_modules`` (full match), the
keys of ``rank_pattern`` / ``alpha_pattern`` (inside ``(.*\\.)?(KEY)$``), ``layers_pattern`` (inside
``(?:^|.*?\\.)PATTERN\\.(\\d+)\\.``) and ``modules_to_save`` entries (inside ``(^|.*\\.)ENTRY($|\\..*)``). Each is
compiled at load time with :mod:`re` (PEFT's engine, so a spec PEFT cannot read is refused); the ``regex``
package matches them here with a ``timeout``: a catastrophic pattern such as ``(a+)+$`` fails in
``REGEX_TIMEOUT_S`` seconds with a TargetError instead of hanging.
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING, Literal

import regex

from peftdecl.errors import TargetError

if TYPE_CHECKING:
    from peftdecl.spec._base import SpecBase

REGEX_TIMEOUT_S = 0.25
"""Seconds one match may take; module names are short, so a real pattern needs microseconds."""
MAX_PATTERN_LENGTH = 4096
"""Longest pattern accepted (also bounds the compile time)."""


def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` cannot be used as a module-name regex, or None if it can."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        return f"pattern of {len(pattern)} characters; at most {MAX_PATTERN_LENGTH}"
    try:
        re.compile(pattern)  # PEFT's engine; the regex package compiles it (cached) when it first matches
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        return f"is not a valid regular expression: {exc}"
    return None


@functools.lru_cache(maxsize=512)
def _compiled(pattern: str) -> regex.Pattern[str]:
    return regex.compile(pattern, flags=regex.VERSION0)


def _run(how: Literal["fullmatch", "match"], pattern: str, text: str, field: str) -> regex.Match[str] | None:
    try:
        compiled = _compiled(pattern)
    except (regex.error, RecursionError, OverflowError, ValueError) as exc:
        raise TargetError(f"{field}: {pattern[:80]!r} is not a valid regular expression: {exc}") from None
    try:
        run = compiled.fullmatch if how == "fullmatch" else compiled.match
        return run(text, timeout=REGEX_TIMEOUT_S)
    except TimeoutError:
        raise TargetError(
            f"{field}: the regular expression {pattern[:80]!r} took over {REGEX_TIMEOUT_S} s on the module name "
            f"{text[:80]!r} (catastrophic backtracking?); simplify it or use a list of names"
        ) from None


def fullmatch(pattern: str, text: str, field: str) -> bool:
    """``re.fullmatch(pattern, text)`` under the time limit; ``field`` names the spec field in errors."""
    return _run("fullmatch", pattern, text, field) is not None


def match(pattern: str, text: str, field: str) -> regex.Match[str] | None:
    """``re.match(pattern, text)`` under the time limit (the match object, or None)."""
    return _run("match", pattern, text, field)


def pattern_key_regex(key: str) -> str:
    """The regex HF PEFT builds from a ``rank_pattern`` / ``alpha_pattern`` key."""
    return rf"(.*\.)?({key})$"


def layers_pattern_regex(pattern: str) -> str:
    """The regex HF PEFT builds from one ``layers_pattern`` entry."""
    return rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\."


def module_to_save_regex(entry: str) -> str:
    """The regex HF PEFT builds from one ``modules_to_save`` entry."""
    return rf"(^|.*\.){entry}($|\..*)"


def spec_pattern_problems(spec: SpecBase) -> list[tuple[str, str]]:
    """Every regex-valued field of ``spec`` that does not compile, as ``(json_path, message)`` pairs."""
    found = []
    for field in ("target_modules", "exclude_modules"):
        value = getattr(spec, field, None)
        if isinstance(value, str):
            problem = pattern_problem(value)
            if problem:
                found.append((f"$.{field}", problem))
    for field in ("rank_pattern", "alpha_pattern"):
        value = getattr(spec, field, None)
        if field == "rank_pattern" and spec.peft_type == "ADALORA":
            continue  # AdaLoRA's rank_pattern holds rank masks keyed by exact module names, not patterns
        if isinstance(value, dict):
            for key in value:
                problem = pattern_problem(pattern_key_regex(key))
                if problem:
                    found.append((f"$.{field}.{key}", f"key {problem}"))
    layers_pattern = getattr(spec, "layers_pattern", None)
    entries = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or ())
    for i, entry in enumerate(entries):
        problem = pattern_problem(layers_pattern_regex(entry))
        if problem:
            where = "$.layers_pattern" if isinstance(layers_pattern, str) else f"$.layers_pattern[{i}]"
            found.append((where, problem))
    for i, entry in enumerate(getattr(spec, "modules_to_save", None) or ()):
        problem = pattern_problem(module_to_save_regex(entry))
        if problem:
            found.append((f"$.modules_to_save[{i}]", problem))
    return found

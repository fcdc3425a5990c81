"""Shared hypothesis settings for the fuzz suites (corrupted folders, mutated specs).

CI runs a bounded number of examples per test; a long run raises it with an environment variable:

    PEFTDECL_FUZZ_EXAMPLES=10000 .venv/bin/pytest -q -p no:cacheprovider tests/test_fuzz_folders.py

PEFTDECL_FUZZ_DEADLINE_MS sets hypothesis' per-example deadline (default 5000 ms; hypothesis reports an example
slower than this as a failure, which is how a hang or a near-hang shows up as a test failure).
"""

from __future__ import annotations

import os
from datetime import timedelta

from hypothesis import HealthCheck, settings

DEFAULT_EXAMPLES = 50
DEFAULT_DEADLINE_MS = 5000


def long_run_examples() -> int:
    """PEFTDECL_FUZZ_EXAMPLES when set (a positive integer): the examples of a long run; 0 when unset (CI)."""
    raw = os.environ.get("PEFTDECL_FUZZ_EXAMPLES", "").strip()
    if not raw:
        return 0
    try:
        value = int(raw)
    except ValueError as exc:
        raise ValueError(f"PEFTDECL_FUZZ_EXAMPLES must be a positive integer, got {raw!r}") from exc
    if value < 1:
        raise ValueError(f"PEFTDECL_FUZZ_EXAMPLES must be a positive integer, got {raw!r}")
    return value


FUZZ_EXAMPLES = long_run_examples()
"""Examples per fuzz test in a long run (0: CI's bounded, derandomised count)."""


def fuzz_deadline() -> timedelta:
    """Per-example deadline: PEFTDECL_FUZZ_DEADLINE_MS when set, else DEFAULT_DEADLINE_MS."""
    raw = os.environ.get("PEFTDECL_FUZZ_DEADLINE_MS", "").strip()
    return timedelta(milliseconds=int(raw) if raw else DEFAULT_DEADLINE_MS)


def fuzz_settings(ci_examples: int = DEFAULT_EXAMPLES, **overrides: object) -> settings:
    """A hypothesis settings object for a fuzz test: ``ci_examples`` derandomised examples in CI (the same inputs
    every run), ``PEFTDECL_FUZZ_EXAMPLES`` random ones in a long run; a per-example deadline; no example database
    (CI leaves no files behind; a failure prints its reproduction blob); and the health checks that slow
    file-building strategies would trip turned off. Keyword overrides win."""
    options: dict[str, object] = {
        "max_examples": FUZZ_EXAMPLES or ci_examples,
        "deadline": fuzz_deadline(),
        "database": None,
        "derandomize": not FUZZ_EXAMPLES,
        "print_blob": True,
        "suppress_health_check": [
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
            HealthCheck.filter_too_much,
        ],
    }
    options.update(overrides)
    return settings(**options)  # type: ignore[arg-type]

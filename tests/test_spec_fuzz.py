"""Fuzzing the spec entry points (issue 10 items 10-12): ``load_spec`` on dicts, JSON text, YAML text, bytes and
paths; ``peftdecl validate`` through ``peftdecl.cli.main``; and ``peftdecl.attach`` on a tiny NumPy model. Every
outcome is a result or a PeftdeclError, never another exception, and each case finishes within the deadline.

CI runs a few hundred derandomised cases per entry point. The long run, ≥ 10,000 per entry point::

    PEFTDECL_FUZZ_EXAMPLES=10000 PEFTDECL_FUZZ_REPORT=fuzz.json pytest -p no:cacheprovider tests/test_spec_fuzz.py

``PEFTDECL_FUZZ_REPORT`` (a JSON file) receives per entry point: inputs tried, results, clean errors, other
exceptions, cases over the 2 s hang bound, the worst time per input, and the worst peak of Python allocations
per input (tracemalloc, on every 10th input).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import peftdecl
from peftdecl.cli import REPORT_HINT
from peftdecl.cli import main as cli_main
from peftdecl.errors import PeftdeclError
from tests.fuzz_settings import FUZZ_EXAMPLES, fuzz_settings
from tests.spec_strategies import (
    json_text,
    mutated_specs,
    spec_bytes,
    spec_texts,
    yaml_text,
)

HANG_S = 2.0
"""A case slower than this counts as a hang (the hypothesis deadline fails the test well before minutes)."""
MEMORY_EVERY = 10 if FUZZ_EXAMPLES else 0
"""Long runs trace Python allocations (tracemalloc) on every 10th case; traced cases run several times slower, so
their time is not counted towards worst time or hangs."""
DEADLINE_MS = int(HANG_S * 1000) * (4 if FUZZ_EXAMPLES else 1)
STATS: dict[str, dict[str, Any]] = {}


def _stats(entry: str) -> dict[str, Any]:
    keys = ("inputs", "results", "clean_errors", "other_exceptions", "hangs")
    return STATS.setdefault(entry, {**dict.fromkeys(keys, 0), "worst_s": 0.0, "worst_peak_bytes": 0})


def run_case(entry: str, call: Callable[[], Any]) -> Any:
    """Run one case, count its outcome; any exception but a PeftdeclError propagates and fails the test."""
    stats = _stats(entry)
    stats["inputs"] += 1
    traced = bool(MEMORY_EVERY) and stats["inputs"] % MEMORY_EVERY == 0
    if traced:
        tracemalloc.start()
    start = time.perf_counter()
    try:
        result = call()
    except PeftdeclError:
        stats["clean_errors"] += 1
        return None
    except BaseException:
        stats["other_exceptions"] += 1
        raise
    else:
        stats["results"] += 1
        return result
    finally:
        elapsed = time.perf_counter() - start
        if not traced:
            stats["worst_s"] = max(stats["worst_s"], elapsed)
            stats["hangs"] += elapsed > HANG_S
        else:
            stats["memory_traced"] = stats.get("memory_traced", 0) + 1
            stats["worst_peak_bytes"] = max(stats["worst_peak_bytes"], tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()


@pytest.fixture(autouse=True)
def _report() -> Iterator[None]:
    yield  # written after every test, so a long run that is stopped keeps what it measured
    target = os.environ.get("PEFTDECL_FUZZ_REPORT")
    if target:
        previous = json.loads(Path(target).read_text()) if Path(target).is_file() else {}
        Path(target).write_text(json.dumps({**previous, **STATS}, indent=2, sort_keys=True))


CI = 150
LOAD = fuzz_settings(CI, deadline=DEADLINE_MS)


@LOAD
@given(mutated_specs())
def test_load_spec_dicts(data) -> None:
    run_case("load_spec(dict)", lambda: peftdecl.load_spec(data))


@LOAD
@given(st.one_of(spec_texts(), mutated_specs().map(json_text), mutated_specs().map(yaml_text)))
def test_load_spec_text(text) -> None:
    run_case("load_spec(str)", lambda: peftdecl.load_spec(text))


@LOAD
@given(spec_bytes())
def test_load_spec_bytes(raw) -> None:
    run_case("load_spec(bytes)", lambda: peftdecl.load_spec(raw))


_ODD_PATHS = [
    "a" * 255, "a" * 256, "a" * 300 + ".json", "x\x00y", "x\x00y.yaml", "/dev/null", "/dev/zero", "/", ".", "",
    "missing.yaml", "missing/", "a/" * 2000 + "b.json", "~/spec.yaml", "/proc/self/status", "\udcff.json",
]  # fmt: skip


@st.composite
def spec_paths(draw: st.DrawFn) -> tuple[str, bytes | None, str]:
    """(how to name it, file content or None for no file, suffix)."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.sampled_from(_ODD_PATHS)), None, ""
    raw = draw(spec_bytes())
    suffix = draw(st.sampled_from([".json", ".yaml", ".yml", "", ".txt", "/adapter_config.json"]))
    return "file", raw, suffix


def _materialise(folder: Path, how: str, raw: bytes | None, suffix: str) -> str:
    if raw is None:
        return how
    path = folder / ("spec" + suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    return str(path.parent if suffix == "/adapter_config.json" else path)


@LOAD
@given(case=spec_paths(), as_path=st.booleans())
def test_load_spec_paths(case, as_path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        name = _materialise(Path(tmp), *case)
        source: Any = Path(name) if as_path and "\x00" not in name else name
        run_case("load_spec(path)", lambda: peftdecl.load_spec(source))


@fuzz_settings(CI, deadline=DEADLINE_MS)
@given(
    raw=st.one_of(spec_bytes(), mutated_specs().map(lambda d: json_text(d).encode())),
    suffix=st.sampled_from([".json", ".yaml", ""]),
)
def test_cli_validate(raw, suffix) -> None:
    out, err = io.StringIO(), io.StringIO()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"spec{suffix}"
        path.write_bytes(raw)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = run_case("peftdecl validate", lambda: cli_main(["validate", str(path)]))
    printed, errors = out.getvalue(), err.getvalue()
    assert code in (0, 1), (code, printed, errors)
    assert REPORT_HINT not in printed + errors and "Traceback" not in printed + errors
    lines = printed.splitlines()
    assert lines and all(line.startswith(str(path) + ": ") for line in lines), printed
    assert (code == 0) == (len(lines) == 1 and ": ok (" in lines[0])


TINY_STATE = {
    f"model.layers.{i}.{name}.weight": np.random.default_rng(i).normal(size=(4, 4))
    for i in range(2)
    for name in ("q", "f")
}


@fuzz_settings(60, deadline=DEADLINE_MS * 2)
@given(data=mutated_specs(), seed=st.integers(0, 3))
def test_attach_tiny_numpy_model(data, seed) -> None:
    model = run_case("attach(numpy)", lambda: peftdecl.attach(TINY_STATE, data, backend="numpy", seed=seed))
    if model is not None:
        out = run_case("attach(numpy) forward", lambda: model("model.layers.0.q", np.ones((2, 4))))
        assert out is None or np.all(np.isfinite(out))

"""The asv suite (asv_benches/) imports without heavy packages and every benchmark's setup and body run once.

asv imports every module of the suite to discover benchmarks, also in environments without torch or MLX, so
the import check runs in a fresh interpreter with the standard library's importlib and asserts that no heavy
package was imported. The run check calls what asv would (``setup_cache``, ``setup``, each ``time_``/``track_``/
``peakmem_`` method) in this process, with PEFTDECL_ASV_SMOKE=1 (tiny shapes, one timing round: the numbers mean
nothing here): every parameter combination of the peer modules (bench_peers_*, which read that switch), the first
combination of the others (full-size shapes: one is enough to show they run). A benchmark may skip only because a
package is not installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import itertools
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import selected_backends

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "asv_benches"
MODULES = sorted(p.stem for p in SUITE.glob("*.py") if p.stem != "__init__")
HEAVY = ("torch", "mlx", "mlx_lm", "peft", "transformers", "accelerate", "bitsandbytes", "cupy")
PREFIXES = ("time_", "track_", "peakmem_", "mem_", "timeraw_")
BACKEND = {"bench_mlx": "mlx", "bench_peers_mlx": "mlx", "bench_torch": "torch"}
"""The backend a module's benchmarks need (PEFTDECL_TEST_BACKENDS); the peer modules not named here use torch,
the rest only NumPy."""


def test_suite_imports_nothing_heavy() -> None:
    script = (
        "import importlib, sys\n"
        f"for name in {MODULES!r}:\n"
        "    importlib.import_module('asv_benches.' + name)\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"imported at module level: {done.stdout}"


BLOCKED_SETUP = """
import importlib, importlib.abc, inspect, itertools, os, sys, tempfile, traceback
HEAVY = {heavy!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            raise ModuleNotFoundError(f"No module named {{name!r}}")
sys.meta_path.insert(0, Block())
os.environ["PEFTDECL_ASV_SMOKE"] = "1"
os.chdir(tempfile.mkdtemp())
for module, name in {classes!r}:
    cls = getattr(importlib.import_module("asv_benches." + module), name)
    params = getattr(cls, "params", None) or [[]]
    params = params if isinstance(params[0], (list, tuple)) else [params]
    try:
        cache = (cls().setup_cache(),) if hasattr(cls, "setup_cache") else ()
        for combo in itertools.product(*params):
            if hasattr(cls, "setup"):
                try:
                    cls().setup(*cache, *combo)
                except NotImplementedError as exc:
                    assert "is not installed" in str(exc), exc
    except Exception:
        print(module, name, traceback.format_exc(limit=-2).splitlines()[-1])
"""


def test_setup_without_the_peers_installed_is_a_skip() -> None:
    """With torch, MLX, PEFT, ... absent (the CI bench job installs only the bench extra), every peer benchmark's
    setup raises the NotImplementedError asv shows as a skip, never an ImportError that asv counts as a failure."""
    classes = [(m, n) for m, n in benchmark_classes() if m.startswith("bench_peers")]
    script = BLOCKED_SETUP.format(heavy=HEAVY, classes=classes)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "", f"failed instead of skipping:\n{done.stdout}"


def benchmark_classes() -> Iterator[tuple[str, str]]:
    """(module, class) of every benchmark class asv would find (a class defined there with a benchmark method)."""
    sys.path.insert(0, str(ROOT))
    try:
        for module in MODULES:
            loaded = importlib.import_module(f"asv_benches.{module}")
            for name, cls in inspect.getmembers(loaded, inspect.isclass):
                if cls.__module__ == loaded.__name__ and any(m.startswith(PREFIXES) for m in vars(cls)):
                    yield module, name
    finally:
        sys.path.remove(str(ROOT))


def _combinations(cls: type, every: bool) -> list[tuple[Any, ...]]:
    params = getattr(cls, "params", None)
    if not params:
        return [()]
    if not isinstance(params[0], (list, tuple)):
        params = [params]
    combinations = list(itertools.product(*params))
    return combinations if every else combinations[:1]


def _missing_package(exc: NotImplementedError) -> bool:
    """True when the skip names a package that is indeed absent (the only acceptable reason here)."""
    if "is not installed" not in str(exc):
        return False
    return any(importlib.util.find_spec(name) is None for name in HEAVY)


def _backend(module: str) -> str:
    if module in BACKEND:
        return BACKEND[module]
    return "torch" if module.startswith("bench_peers") else "numpy"


@pytest.mark.parametrize(("module", "name"), list(benchmark_classes()))
def test_benchmark_runs_once(module: str, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if _backend(module) not in selected_backends():
        pytest.skip(f"PEFTDECL_TEST_BACKENDS leaves {_backend(module)} out")
    monkeypatch.setenv("PEFTDECL_ASV_SMOKE", "1")
    monkeypatch.chdir(tmp_path)  # setup_cache writes its files into the working directory, as under asv
    monkeypatch.syspath_prepend(str(ROOT))
    peers = importlib.reload(importlib.import_module("asv_benches._peers"))  # reads PEFTDECL_ASV_SMOKE
    assert peers.SMOKE
    cls = getattr(importlib.reload(importlib.import_module(f"asv_benches.{module}")), name)
    methods = [m for m, _ in inspect.getmembers(cls, inspect.isfunction) if m.startswith(PREFIXES)]
    cache = (cls().setup_cache(),) if hasattr(cls, "setup_cache") else ()
    skipped, ran = [], 0
    for combo in _combinations(cls, every=module.startswith("bench_peers")):
        bench = cls()
        try:
            if hasattr(bench, "setup"):
                bench.setup(*cache, *combo)
        except NotImplementedError as exc:
            assert _missing_package(exc), f"{name}{combo} skipped without a missing package: {exc}"
            skipped.append(str(exc))
            continue
        for method in methods:
            value = getattr(bench, method)(*cache, *combo)
            ran += 1
            if method.startswith("track_"):  # ratios, rates, counts: positive, finite numbers
                assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (
                    method,
                    combo,
                    value,
                )
    if not ran:
        pytest.skip(f"every combination skipped: {sorted(set(skipped))}")

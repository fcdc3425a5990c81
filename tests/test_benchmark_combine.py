"""The combination and hot-swap comparison scripts run end to end at toy sizes (their timings mean nothing here).

Both scripts compare their results with PEFT's: compare_combine.py the combined adapter (relative error of B A or
of the factors), compare_hotswap.py the compiled logits after each swap against PEFT's eager model freshly loaded
from the swapped folder, and both sides' recompilation counts.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "benchmarks"

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")


def run(script: str, *args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.splitlines()


@pytest.mark.peft
def test_combine_comparison_agrees_with_peft() -> None:
    out = run(
        "compare_combine.py",
        *("--layers", "2", "--hidden", "64", "--rank", "4", "--rounds", "1", "--threads", "1"),
        *("--types", "svd", "cat", "linear", "--backends", "numpy"),
    )
    rows = {line.split("|")[0].strip(): line.split("|") for line in out if line.count("|") >= 3}
    assert {"svd", "cat", "linear"} <= set(rows)
    for kind in ("svd", "cat", "linear"):
        error = float(rows[kind][2].split()[-1])
        assert error <= 1e-5, kind  # PEFT in float32, peftdecl in float64: float32 rounding apart


@pytest.mark.peft
def test_hotswap_comparison_swaps_without_recompiling() -> None:
    out = run(
        "compare_hotswap.py",
        *("--layers", "1", "--hidden", "64", "--tokens", "8", "--swaps", "2", "--forwards", "1"),
        *("--threads", "1", "--compile-backend", "eager"),
    )
    rows = {line.split("|")[0].strip(): line.split("|") for line in out if line.count("|") >= 6}
    assert {"PEFT", "peftdecl"} <= set(rows)
    for side in ("PEFT", "peftdecl"):
        assert int(rows[side][5]) == 0, side  # recompilations after the first compile
        assert float(rows[side][6]) <= 1e-4, side  # float32 logits against PEFT's fresh eager load

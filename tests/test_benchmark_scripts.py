"""The comparison scripts run end to end at toy sizes (their numbers mean nothing here; the scripts must not rot).

Each script checks, before timing, that peftdecl and its peer compute the same outputs and gradients, and exits
non-zero when they disagree, so a passing run is also an agreement check at these shapes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "benchmarks"
TOY = ["--dim", "32", "--tokens", "16", "--rounds", "1", "--block", "1", "--trials", "1"]


def run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.peft
def test_torch_comparison_runs_and_agrees_with_peft() -> None:
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    out = run("compare_torch_peft.py", "--kinds", "lora", "dora", "--in-process", *TOY)
    rows = {line.split("|")[0].strip(): line for line in out.splitlines() if "rel err" in line}
    assert set(rows) == {"lora", "dora"}
    for line in rows.values():  # ours and PEFT hold the same adapter file: float32 rounding apart
        assert float(line.split("ours vs PEFT rel err ")[1].split(")")[0].split(";")[0]) <= 1e-5


def test_mlx_comparison_runs() -> None:
    pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    out = run("compare_mlx_lm.py", *TOY)
    assert "peftdecl lora" in out and "peftdecl dora" in out

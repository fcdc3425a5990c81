"""benchmarks/compare_train.py runs end to end in its --quick mode (toy sizes; the numbers mean nothing here, the
script must not rot): every side trains in its own process and reports a rate, memory, and the loop's overhead."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import selected_backends

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "compare_train.py"


def run_quick(framework: str, out: Path) -> str:
    if framework not in selected_backends():
        pytest.skip(f"PEFTDECL_TEST_BACKENDS leaves {framework} out")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--frameworks", framework, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def check_report(framework: str, peer: str, out: Path, stdout: str) -> None:
    rows = {line.split()[1]: line for line in stdout.splitlines() if line.startswith(framework + " ")}
    assert {"peftdecl", peer.split()[0]} <= set(rows), stdout
    assert f"{framework}: ours/peer tokens/s" in stdout and f"{framework}: loop overhead" in stdout
    data = json.loads((out / "compare_train.json").read_text())
    sides = {run["side"]: run["result"] for run in data["runs"]}
    assert len(sides) == 2
    for result in sides.values():  # every side timed the same window of the same tokens
        assert result["tokens_per_second"] > 0 and result["peak_rss_mib"] > 0
        assert result["tokens"] == next(iter(sides.values()))["tokens"]
    assert (out / "compare_train.txt").read_text().startswith("# python benchmarks/compare_train.py")


@pytest.mark.peft
def test_quick_torch_pair(tmp_path: Path) -> None:
    for name in ("torch", "transformers", "peft"):
        pytest.importorskip(name)
    check_report("torch", "PEFT + Trainer", tmp_path, run_quick("torch", tmp_path))


def test_quick_mlx_pair(tmp_path: Path) -> None:
    pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    check_report("mlx", "mlx_lm.lora", tmp_path, run_quick("mlx", tmp_path))

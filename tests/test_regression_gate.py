"""The asv regression gate fires on a deliberately slowed benchmark and stays quiet on unchanged code.

The real gate (CI's bench job) runs ``asv continuous`` on two commits in asv's virtualenvs, which takes minutes;
here the gate's same-commit mode times this working tree in this Python with ``asv run --environment existing``:
one baseline, then a candidate without the switch and one with PEFTDECL_BENCH_SLOWDOWN=3 (the NumPy LoRA
benchmark repeats its call three times). About 30 s; skipped where asv (the ``bench`` extra) or git is missing.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "regression_gate.py"
LORA = "bench_numpy_lora.LoraLinearGate.track_lora_over_base"


def load_gate() -> ModuleType:
    spec = importlib.util.spec_from_file_location("regression_gate", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_regressions_compares_each_ratio_with_the_factor() -> None:
    gate = load_gate()
    base = {"a": 1.0, "b": 2.0, "c": 3.0}
    cand = {"a": 1.49, "b": 3.2}  # a within 1.5x, b 1.6x slower, c missing (failed in the candidate)
    assert gate.regressions(base, cand, 1.5) == {"b": pytest.approx(1.6), "c": float("inf")}
    assert gate.regressions(base, base, 1.5) == {}


def test_exit_status_follows_the_verdict(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    gate = load_gate()
    timings = {1: {LORA: 0.010}, 3: {LORA: 0.030}}
    monkeypatch.setattr(gate, "time_existing", lambda work, slowdown=1, pin_threads=True: timings[slowdown])
    assert gate.main(["same-commit"]) == 0
    assert gate.main(["same-commit", "--slowdown", "3"]) == 1
    assert "REGRESSED" in capsys.readouterr().out


def test_gate_fires_on_the_slowdown_switch_only(tmp_path: Path) -> None:
    pytest.importorskip("asv", reason="the regression gate needs asv (pip install -e '.[bench]')")
    if shutil.which("git") is None or not (SCRIPT.parent.parent / ".git").exists():
        pytest.skip("the gate reads the commit of a git checkout")
    gate = load_gate()
    base = gate.time_existing(tmp_path / "base")
    same = gate.time_existing(tmp_path / "same")
    slowed = gate.time_existing(tmp_path / "slowed", slowdown=3)
    plan = "bench_plan.CompilePlanGate.track_"
    assert set(base) == {LORA, f"{plan}compile_plan_over_python", f"{plan}load_spec_over_python"}
    # unchanged code: every ratio within the gate's factor (measured noise up to 1.47, asv_noise.json)
    assert gate.regressions(base, same, gate.FACTOR) == {}
    # three calls instead of one: the LoRA benchmark alone regresses, by 3x give or take that noise
    slower = gate.regressions(base, slowed, gate.FACTOR)
    assert set(slower) == {LORA}
    assert 3 / 1.5 < slower[LORA] < 3 * 1.5

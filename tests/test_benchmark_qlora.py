"""benchmarks/compare_qlora.py and benchmarks/quant_accuracy.py run end to end at tiny sizes (their timings mean
nothing here; the scripts must not rot), and what they report can be checked: sides over the same base give the
same first-step loss (the adapters start as the identity), and the codec errors respect the bounds that follow
from each scheme's arithmetic."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import selected_backends

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_tiny(sides: list[str], tmp_path: Path) -> dict:
    command = [sys.executable, str(BENCHMARKS / "compare_qlora.py"), "--size", "tiny", "--steps", "1"]
    command += ["--sides", *sides, "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (
        (tmp_path / "out" / "compare_qlora.md").read_text().startswith("# python benchmarks/compare_qlora.py")
    )
    data: dict = json.loads((tmp_path / "out" / "compare_qlora.json").read_text())
    assert set(data["summary"]) == set(sides)
    for side in sides:
        found = data["summary"][side]
        assert found["median_step_seconds"] > 0 and found["trials"] == 1
        if (
            sys.platform == "linux"
        ):  # VmHWM was reset before the steps: the peak is at least what was resident
            assert found["peak_rss_mib"] >= found["resident_before_step_mib"] > found["baseline_rss_mib"] > 0
    return data


@pytest.mark.peft
def test_tiny_torch_sides(tmp_path: Path) -> None:
    if "torch" not in selected_backends():
        pytest.skip("PEFTDECL_TEST_BACKENDS leaves torch out")
    for name in ("torch", "transformers", "peft", "bitsandbytes"):
        pytest.importorskip(name)
    data = run_tiny(["ours-nf4", "peft-nf4", "ours-float32"], tmp_path)
    summary, ratios = data["summary"], data["ratios"]
    # PEFT + bitsandbytes is the independent side: same 4-bit layers, identity adapters before the first update
    assert ratios["first loss ours-nf4 vs peft-nf4 (relative)"] <= 1e-5  # float32 rounding only
    # both sides train the same LoRA: r · (in + out) on q, o (64→64), k, v (64→32), gate, up, down (64↔128), 2 layers
    expected = 2 * 16 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))
    assert summary["ours-nf4"]["trainable"] == summary["peft-nf4"]["trainable"] == expected
    # the 4-bit base stores its projections in half a byte per weight plus block scales
    assert summary["ours-nf4"]["base_bytes"] < summary["ours-float32"]["base_bytes"]
    assert "memory ours-nf4 / peft-nf4 (peak RSS)" in ratios and "step time ours-nf4 / peft-nf4" in ratios


def test_tiny_mlx_sides(tmp_path: Path) -> None:
    if "mlx" not in selected_backends():
        pytest.skip("PEFTDECL_TEST_BACKENDS leaves mlx out")
    pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    data = run_tiny(["ours-affine4", "mlx_lm-affine4"], tmp_path)
    # mlx-lm's own LoRA over the same nn.quantize'd model is the independent side
    assert data["ratios"]["first loss ours-affine4 vs mlx_lm-affine4 (relative)"] <= 1e-5  # float32 rounding
    summary = data["summary"]
    assert summary["ours-affine4"]["trainable"] == summary["mlx_lm-affine4"]["trainable"]
    assert "MLX step time ours-affine4 / mlx_lm-affine4" in data["ratios"]


def _accuracy_module() -> object:
    spec = importlib.util.spec_from_file_location("quant_accuracy", BENCHMARKS / "quant_accuracy.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quant_accuracy_bounds_and_storage(tmp_path: Path) -> None:
    accuracy = _accuracy_module()
    rows, cols = 32, 256
    results = accuracy.measure(rows, cols)  # type: ignore[attr-defined]
    tests = accuracy.weights(rows, cols)  # type: ignore[attr-defined]
    nf4 = results["NF4 block 64"]
    # storage from the scheme: 4-bit codes + a float32 absmax per 64; double quant: an 8-bit code per 64 and a
    # float32 scale per 256 blocks plus the float32 mean
    assert nf4["bits_per_weight"] == pytest.approx(4 + 32 / 64)
    blocks = rows * cols // 64
    double = (4 * rows * cols + 8 * blocks + 32 * -(-blocks // 256) + 32) / (rows * cols)
    assert results["NF4 block 64, double quant"]["bits_per_weight"] == pytest.approx(double)
    assert results["int8 row-wise (LLM.int8 weight)"]["bits_per_weight"] == pytest.approx(8 + 32 / cols)
    assert results["MLX affine 4-bit, group 64"]["bits_per_weight"] == pytest.approx(4 + 64 / 64)
    for label, w in tests.items():
        # int8: round to nearest of step SCB/127 per row, so |error| ≤ max|row| / 254 (+ float32 rounding)
        assert results["int8 row-wise (LLM.int8 weight)"][label]["max_abs"] <= np.abs(w).max() / 254 * (
            1 + 1e-5
        )
        # NF4: within a block the error is at most half the largest gap of the table (−1 → −0.696) × absmax
        half_gap = (1.0 - 0.6961928009986877) / 2
        assert nf4[label]["max_abs"] <= half_gap * np.abs(w).max() * (1 + 1e-5)
        # affine 8-bit, group 32: step s0 = (max − min) / 255; MLX stores the larger edge exactly and rounds the
        # step to edge / k (k an integer, |k − edge/s0| ≤ 1/2), which can leave up to one more s0 at the far end
        groups = w.reshape(rows, cols // 32, 32)
        step = (groups.max(axis=-1) - groups.min(axis=-1)).max() / 255
        assert results["MLX affine 8-bit, group 32"][label]["max_abs"] <= 1.5 * step * (1 + 1e-3)
        # more bits, less error (relative Frobenius), on every weight
        assert (
            results["MLX affine 8-bit, group 64"][label]["relative_frobenius"]
            < results["MLX affine 4-bit, group 64"][label]["relative_frobenius"]
        )
    lines = accuracy.markdown(results, rows, cols)  # type: ignore[attr-defined]
    assert sum(line.startswith("| NF4 block 64 |") for line in lines) == 2

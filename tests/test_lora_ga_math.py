"""LoRA-GA's factors without a framework, against NumPy's exact SVD of the gradient."""

from __future__ import annotations

import numpy as np
import pytest

from peftdecl.inits.lora_ga import lora_ga_factors
from peftdecl.spec.data_inits import LoraGAConfig
from tests.conftest import rel_err


@pytest.mark.parametrize("direction", ["ArBr", "A2rBr", "ArB2r"])
def test_factors_are_the_gradients_singular_pairs(direction: str) -> None:
    """A gradient of rank 6 ≤ q = 8: the randomised SVD is exact, so A's rows and B's columns are the exact
    singular pairs the direction names (each up to its sign), B scaled by out^(1/4)/√gamma."""
    rng = np.random.default_rng(0)
    gradient = rng.standard_normal((20, 6)) @ np.diag([9.0, 7, 5, 3, 2, 1]) @ rng.standard_normal((6, 14))
    r = 2
    a, b = lora_ga_factors(gradient, np.eye(20, 14), r, 1.0, LoraGAConfig(direction=direction), rng)  # type: ignore[arg-type]
    u, s, vt = np.linalg.svd(gradient)
    a_rows, b_cols = {"ArBr": ([1, 3], [0, 2]), "A2rBr": ([2, 3], [0, 1]), "ArB2r": ([0, 1], [2, 3])}[
        direction
    ]
    expected_a = vt[a_rows]
    expected_b = u[:, b_cols] * s[b_cols] * 20**0.25 / 16**0.5
    a = a * np.sign(np.sum(a * expected_a, axis=1))[:, None]
    b = b * np.sign(np.sum(b * expected_b, axis=0))[None, :]
    assert rel_err(a, expected_a) <= 1e-10  # float64 QR/SVD rounding on a well-separated spectrum
    assert rel_err(b, expected_b) <= 1e-10


def test_gd_scale_divides_by_s_and_weight_svd_uses_the_top_singular_value() -> None:
    rng = np.random.default_rng(1)
    gradient = rng.standard_normal((12, 4)) @ rng.standard_normal((4, 10))
    weight = rng.standard_normal((12, 2)) @ rng.standard_normal((2, 10))  # rank 2 ≤ q = r: σ₁ exact
    unit = lora_ga_factors(gradient, weight, 2, 2.0, LoraGAConfig(scale="unit"), np.random.default_rng(5))
    gd = lora_ga_factors(gradient, weight, 2, 2.0, LoraGAConfig(scale="gd_scale"), np.random.default_rng(5))
    ws = lora_ga_factors(gradient, weight, 2, 2.0, LoraGAConfig(scale="weight_svd"), np.random.default_rng(5))
    assert rel_err(gd[0], unit[0] / 2.0) <= 1e-15 and rel_err(gd[1], unit[1] / 2.0) <= 1e-15
    s_b0 = np.linalg.norm(unit[1][:, 0])  # B's first column is u·S_B[0], |u| = 1
    top = np.linalg.svd(weight, compute_uv=False)[0]
    assert rel_err(ws[1], unit[1] * top / s_b0) <= 1e-10

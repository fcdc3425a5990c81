"""Checks the NumPy reference's per-kind tests share: merged weights against the adapted forward, finite-difference
gradients after unmerging, and a second adapter on module ``m`` (tests/layer_cases.py builds the models).

Tolerances: the adapted output equals the dense merged product to rtol 1e-10 / atol 1e-12 (float64 round-off of
two orders of summation) unless a test gives its own relative bound; gradients use tests/gradcheck.py's FD_TOL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from hypothesis import strategies as st

import peftdecl
from tests.conftest import rel_err
from tests.layer_cases import adapter_deltas, check_unmerged_gradients, dense_merged_output

SEEDS = st.integers(0, 2**16)

GradientCheck = Callable[[peftdecl.AdaptedModel, np.ndarray, int], None]


def sizes(**ranges: tuple[int, int]) -> dict[str, st.SearchStrategy[int]]:
    """Hypothesis keyword strategies: ``name=(low, high)`` draws an integer in [low, high]."""
    return {name: st.integers(low, high) for name, (low, high) in ranges.items()}


def assert_dense_merge_and_gradients(
    model: peftdecl.AdaptedModel,
    x: np.ndarray,
    seed: int,
    tol: float | None = None,
    gradients: GradientCheck = check_unmerged_gradients,
) -> None:
    """Linear module ``m``: y = x Wᵀ + b with the merged W and b (elementwise rtol 1e-10 / atol 1e-12, or relative
    error ≤ ``tol`` when given); then ``gradients`` (default: unmerge, train, finite differences)."""
    adapted = model("m", x)
    dense = dense_merged_output(model, x)
    if tol is None:
        np.testing.assert_allclose(adapted, dense, rtol=1e-10, atol=1e-12)
    else:
        assert rel_err(dense, adapted) <= tol
    gradients(model, x, seed)


def assert_merge_and_gradients(
    model: peftdecl.AdaptedModel,
    x: np.ndarray,
    seed: int,
    tol: float,
    gradients: GradientCheck = check_unmerged_gradients,
) -> None:
    """Any layer type of module ``m``: its output after merge() within ``tol`` (relative) of the adapted output;
    then ``gradients`` (default: unmerge, train, finite differences)."""
    adapted = model("m", x)
    model.merge()
    assert rel_err(model("m", x), adapted) <= tol
    gradients(model, x, seed)


def add_second_adapter(
    model: peftdecl.AdaptedModel, x: np.ndarray, **spec: Any
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Adds adapter "b" (``spec`` on module ``m``, seed 9); returns the base output and each adapter's change to
    it alone (tests/layer_cases.adapter_deltas)."""
    model.add_adapter("b", {"target_modules": ["m"], **spec}, seed=9)
    return adapter_deltas(model, x)


def assert_active_pair_sums(
    model: peftdecl.AdaptedModel, x: np.ndarray, base: np.ndarray, deltas: dict[str, np.ndarray]
) -> None:
    """With "default" and "b" both active, the output is the base plus both changes (rtol 1e-12)."""
    model.set_adapter(["default", "b"])
    np.testing.assert_allclose(model("m", x), base + deltas["default"] + deltas["b"], rtol=1e-12)

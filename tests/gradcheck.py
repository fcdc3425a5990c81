"""Finite-difference checks of the NumPy reference's explicit gradients (float64 central differences)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from peftdecl.backend import ADAPTER_KEY_SEPARATOR

FD_EPS = 1e-6
FD_TOL = 1e-6  # relative error of a directional derivative, float64 central differences


def central_difference(loss: Callable[[], float], value: np.ndarray, direction: np.ndarray) -> float:
    """(loss at value + ε·direction − loss at value − ε·direction) / 2ε, with ε = FD_EPS: ``value`` is shifted
    in place and restored."""
    original = value.copy()
    value[...] = original + FD_EPS * direction
    plus = loss()
    value[...] = original - FD_EPS * direction
    minus = loss()
    value[...] = original
    return (plus - minus) / (2 * FD_EPS)


def _loss(model: Any, module: str, x: np.ndarray, weights: np.ndarray, state: dict[str, np.ndarray]) -> float:
    model.engine.set_rng_state(state)  # the same dropout masks at every evaluation
    return float(np.sum(model(module, x) * weights))


def check_gradients(
    model: Any, module: str, x: np.ndarray, seed: int = 0, check_input: bool = True
) -> list[str]:
    """Compare every trainable tensor's (and the input's) gradient with a central difference along a random
    direction. Returns the keys checked; raises AssertionError on a mismatch."""
    engine = model.engine
    engine.rng = np.random.default_rng(seed)
    state = engine.get_rng_state()  # from here on, every evaluation restarts from this generator state
    y, tape = engine.layer_forward(module, x)
    weights = np.random.default_rng(seed + 1).normal(size=y.shape)
    grads = engine.layer_backward(module, tape, weights)
    params = model.trainable_parameters()
    checked = []
    direction_rng = np.random.default_rng(seed + 2)
    for key, value in params.items():
        # with several active adapters the keys are "<adapter>/<full key>"
        if not key.rpartition(ADAPTER_KEY_SEPARATOR)[2].startswith(module + "."):
            continue
        assert key in grads, f"no gradient for {key}"
        direction = direction_rng.normal(size=value.shape)
        numeric = central_difference(lambda: _loss(model, module, x, weights, state), value, direction)
        analytic = float(np.sum(grads[key] * direction))
        assert abs(numeric - analytic) <= FD_TOL * max(1.0, abs(numeric)), (key, numeric, analytic)
        checked.append(key)
    if check_input and grads.get("input") is not None:
        direction = direction_rng.normal(size=np.shape(x))
        plus = _loss(model, module, x + FD_EPS * direction, weights, state)
        minus = _loss(model, module, x - FD_EPS * direction, weights, state)
        numeric = (plus - minus) / (2 * FD_EPS)
        analytic = float(np.sum(grads["input"] * direction))
        assert abs(numeric - analytic) <= FD_TOL * max(1.0, abs(numeric)), ("input", numeric, analytic)
        checked.append("input")
    return checked

"""The NumPy reference DoRA on every layer type: factored norm, detached-norm gradients, zero rows (merge,
unmerge and the no-op default init: test_numpy_common.py).

Tolerances: float64 internal consistency ≤ 1e-12 (merge vs forward, unmerge, factored vs direct norm ≤ 1e-10
where cancellation can cost digits); gradients through tests/gradcheck.py (central differences, ≤ 1e-6
relative).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import peftdecl
from peftdecl.plan.kinds.dora import MAGNITUDE, dora_weight_norm, factored_row_norm
from peftdecl_numpy.kinds.dora import OPS as DORA
from peftdecl_numpy.kinds.lora import OPS as LORA
from tests import layer_cases
from tests.conftest import rel_err
from tests.gradcheck import FD_EPS, FD_TOL, central_difference, check_gradients
from tests.layer_cases import layer_params
from tests.numpy_checks import SEEDS, assert_dense_merge_and_gradients, assert_merge_and_gradients, sizes

LAYERS = layer_cases.LORA_LAYERS
SPEC = layer_cases.KINDS["dora"].spec


def build(
    layer: str, seed: int = 0, state=None, scale_m: bool = True, **fields
) -> tuple[peftdecl.AdaptedModel, np.ndarray]:
    """A DoRA layer with random A, B and (``scale_m``) m moved off ‖W + sBA‖, so that g ≠ 1."""
    return layer_cases.build("dora", layer, seed, state=state, prepare=scale_m, **fields)


def direct_norm(model: peftdecl.AdaptedModel, module: str = "m") -> np.ndarray:
    """‖W + ΔW‖ per direction, from the dense ΔW (the definition the factored sum must reproduce)."""
    lp = model.plan().layer(module)
    weight = model.base_weight(module)
    dense = weight + LORA.delta_weight(lp, None, layer_params(model, module))
    axes = 0 if lp.layer.type == "embedding" else tuple(range(1, dense.ndim))
    return np.sqrt(np.sum(dense * dense, axis=axes))


@contextlib.contextmanager
def norm_override(fn) -> Iterator[None]:
    """Make the DoRA ops take n from ``fn(lp, base, p)`` (an instance attribute shadows the method)."""
    DORA.weight_norm = fn
    try:
        yield
    finally:
        del DORA.weight_norm


@contextlib.contextmanager
def frozen_norm(model: peftdecl.AdaptedModel, module: str = "m") -> Iterator[np.ndarray]:
    """Evaluate the forward with n held at its current value: the function whose gradient DoRA trains with."""
    n = dora_weight_norm(model.plan().layer(module), model.base_weight(module), layer_params(model, module))
    with norm_override(lambda lp, base, p: n):
        yield n


def frozen_gradients(model: peftdecl.AdaptedModel, x: np.ndarray, seed: int) -> None:
    """Unmerge, train, and compare the gradients with central differences with the norm frozen (DoRA detaches
    ‖W + sBA‖ from the graph)."""
    model.unmerge()
    model.train()
    with frozen_norm(model):
        check_gradients(model, "m", x, seed=seed)


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("fields", [{}, {"use_rslora": True}, {"lora_dropout": 0.3}])
def test_gradients_match_finite_differences_with_the_norm_frozen(layer: str, fields: dict) -> None:
    if layer == "embedding" and "lora_dropout" in fields:
        pytest.skip("HF PEFT applies no dropout to embeddings")
    model, x = build(layer, **fields)
    model.train()
    with frozen_norm(model):
        checked = check_gradients(model, "m", x)
    assert f"m.{MAGNITUDE}" in checked
    assert ("input" in checked) == (layer != "embedding")


@pytest.mark.parametrize("layer", ["linear", "conv2d", "embedding"])
def test_analytic_gradient_is_the_detached_one(layer: str) -> None:
    """Against the true function: m and x match its finite difference; A and B match it only after removing
    the part that flows through n (measured by perturbing A or B inside the norm alone)."""
    model, x = build(layer)
    y, tape = model.engine.layer_forward("m", x)
    weights = np.random.default_rng(3).normal(size=y.shape)
    grads = model.engine.layer_backward("m", tape, weights)
    params = model.trainable_parameters()
    lp = model.plan().layer("m")
    rng = np.random.default_rng(4)

    def loss(inputs: np.ndarray = x) -> float:
        return float(np.sum(model("m", inputs) * weights))

    for key, value in params.items():
        direction = rng.normal(size=value.shape)
        analytic = float(np.sum(grads[key] * direction))
        total = central_difference(loss, value, direction)
        if key.endswith(MAGNITUDE):
            assert abs(total - analytic) <= FD_TOL * max(1.0, abs(total)), key  # m does not enter n
            continue
        name = key[2:]

        def loss_with_shifted_norm(sign: float, name: str = name, direction: np.ndarray = direction) -> float:
            shift = sign * FD_EPS * direction
            with norm_override(
                lambda lp_, base, p: dora_weight_norm(lp_, base.weight, {**p, name: p[name] + shift})
            ):
                return loss()

        through_n = (loss_with_shifted_norm(1.0) - loss_with_shifted_norm(-1.0)) / (2 * FD_EPS)
        assert abs(through_n) > 1e-3 * max(1.0, abs(total)), key  # the norm path is real and was left out
        # two central differences are combined, so their errors add up: allow 10× the single-difference bound
        mismatch = abs(total - through_n - analytic)
        assert mismatch <= 10 * FD_TOL * max(1.0, abs(total)), (key, total, through_n, analytic)
    if lp.layer.type != "embedding":
        direction = rng.normal(size=x.shape)
        numeric = (loss(x + FD_EPS * direction) - loss(x - FD_EPS * direction)) / (2 * FD_EPS)
        analytic = float(np.sum(grads["input"] * direction))
        assert abs(numeric - analytic) <= FD_TOL * max(1.0, abs(analytic))  # n does not depend on x


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_factored_norm_equals_direct_norm_and_initial_magnitude(layer: str) -> None:
    model, _ = build(layer, scale_m=False, lora_alpha=12)
    lp = model.plan().layer("m")
    params = layer_params(model)
    expected = direct_norm(model)
    assert rel_err(dora_weight_norm(lp, model.base_weight("m"), params), expected) <= 1e-12
    assert params[MAGNITUDE].shape == lp.param(MAGNITUDE).shape
    assert (
        rel_err(params[MAGNITUDE].reshape(-1), expected) <= 1e-12
    )  # m starts at ‖W + sBA‖ with the drawn A, B


@settings(max_examples=30, deadline=None)
@given(**sizes(rows=(1, 8), cols=(1, 8), r=(1, 5)), s=st.floats(0.1, 4.0), seed=st.integers(0, 99))
def test_factored_row_norm_property(rows, cols, r, s, seed) -> None:
    rng = np.random.default_rng(seed)
    w, a, b = rng.normal(size=(rows, cols)), rng.normal(size=(r, cols)), rng.normal(size=(rows, r))
    direct = np.linalg.norm(w + s * b @ a, axis=1)
    # the factored sum loses digits by cancellation, relative to the sizes of its terms
    scale = np.linalg.norm(w, axis=1) + s * np.linalg.norm(b @ a, axis=1)
    assert np.all(np.abs(factored_row_norm(w, a, b, s) - direct) <= 1e-10 * scale)


def test_eval_and_training_formulas_against_dense_definitions() -> None:
    model, x = build("linear", lora_dropout=0.4)
    lp, p = model.plan().layer("m"), layer_params(model)
    w, bias, s = model.base_weight("m"), model.base_model["m.bias"], lp.scaling
    v = w + s * p["lora_B.weight"] @ p["lora_A.weight"]
    g = p[MAGNITUDE] / np.linalg.norm(v, axis=1)
    assert rel_err(model("m", x), g * (x @ v.T) + bias) <= 1e-12  # eval: y = g ⊙ (W + sBA) x + b

    model.train()
    model.engine.rng = np.random.default_rng(5)
    trained = model("m", x)
    mask = (np.random.default_rng(5).random(x.shape) >= 0.4) / 0.6  # the first draw of the same generator
    h = x * mask
    lora = s * (h @ p["lora_A.weight"].T) @ p["lora_B.weight"].T
    expected = x @ w.T + bias + (g - 1) * (h @ w.T) + g * lora  # HF PEFT recomputes W h on the dropped input
    assert rel_err(trained, expected) <= 1e-12


def test_zero_rows_stay_finite_with_unit_scale() -> None:
    """Rule: where ‖W + sBA‖_row = 0, g = 1 and m gets no gradient (HF PEFT gives NaN there, issue #2049)."""
    rng = np.random.default_rng(1)
    state = {"m.weight": rng.normal(size=(6, 5)), "m.bias": rng.normal(size=6)}
    state["m.weight"][2] = 0.0
    model, x = build("linear", state=state)
    model.trainable_parameters()["m.lora_B.weight"][2] = 0.0
    y, tape = model.engine.layer_forward("m", x)
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(y[:, 2], np.broadcast_to(state["m.bias"][2], (x.shape[0],)))
    grads = model.engine.layer_backward("m", tape, np.ones_like(y))
    assert grads[f"m.{MAGNITUDE}"][2] == 0.0
    assert all(np.all(np.isfinite(v)) for v in grads.values())
    before = model.base_weight("m")
    model.merge()
    assert rel_err(model("m", x), y) <= 1e-12
    model.unmerge()
    assert rel_err(model.base_weight("m"), before) <= 1e-12
    model.train()
    with frozen_norm(model):
        check_gradients(model, "m", x)


def test_dora_refuses_mixed_batches_and_lora_bias() -> None:
    model, x = build("linear")
    with pytest.raises(peftdecl.PeftdeclError, match="mixed batches"):
        model("m", x, adapter_names=["default"] * x.shape[0])
    with pytest.raises(peftdecl.SpecError, match=r"lora_bias"):
        peftdecl.load_spec({**SPEC, "lora_bias": True})


@settings(max_examples=20, deadline=None)
@given(**sizes(d_in=(1, 7), d_out=(1, 7), r=(1, 5), tokens=(1, 4)), rslora=st.booleans(), seed=SEEDS)
def test_linear_forward_matches_merged_weight_property(d_in, d_out, r, tokens, rslora, seed) -> None:
    rng = np.random.default_rng(seed)
    state = {"m.weight": rng.normal(size=(d_out, d_in)), "m.bias": rng.normal(size=d_out)}
    model, _ = build("linear", seed=seed, state=state, r=r, lora_alpha=2 * r, use_rslora=rslora)
    assert_dense_merge_and_gradients(model, rng.normal(size=(tokens, d_in)), seed, gradients=frozen_gradients)


@settings(max_examples=10, deadline=None)
@given(**sizes(c_in=(1, 3), c_out=(1, 3), kernel=(1, 3), stride=(1, 2), padding=(0, 1), r=(1, 3)), seed=SEEDS)
def test_conv2d_merge_and_gradients_property(c_in, c_out, kernel, stride, padding, r, seed) -> None:
    rng = np.random.default_rng(seed)
    state = {"m.weight": rng.normal(size=(c_out, c_in, kernel, kernel)), "m.bias": rng.normal(size=c_out)}
    layer_type = {"type": "conv2d", "stride": stride, "padding": padding}
    spec = {**SPEC, "r": r, "init_lora_weights": False}
    model = peftdecl.attach(state, spec, layer_types={"m": layer_type}, seed=seed)
    model.trainable_parameters()[f"m.{MAGNITUDE}"][...] *= rng.uniform(0.5, 1.5, size=(1, c_out, 1, 1))
    assert_merge_and_gradients(
        model, rng.normal(size=(2, c_in, 4, 4)), seed, tol=1e-11, gradients=frozen_gradients
    )

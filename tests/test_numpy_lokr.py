"""The NumPy reference LoKr on linear and conv layers: gradients vs finite differences (tests/gradcheck.py,
relative 1e-6), forward == forward of the merged weight and unmerge (float64, relative ≤ 1e-12), the factor
layouts (full, decomposed, CP), PEFT's three initialisations, rank dropout with and without rescaling."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import peftdecl
from peftdecl.plan.kinds.lycoris import factorization
from peftdecl_numpy.kinds.lokr import kron_grads
from tests.conftest import rel_err
from tests.gradcheck import check_gradients

LAYERS = {
    "linear": ({"m.weight": (12, 8), "m.bias": (12,)}, "linear", (3, 8)),
    "conv1d": (
        {"m.weight": (4, 6, 3), "m.bias": (4,)},
        {"type": "conv1d", "padding": 1, "stride": 2},
        (2, 6, 9),
    ),
    "conv1d_k1": ({"m.weight": (4, 6, 1)}, "conv1d", (2, 6, 5)),
    "conv2d": (
        {"m.weight": (6, 4, 3, 3), "m.bias": (6,)},
        {"type": "conv2d", "padding": 1, "dilation": 2},
        (2, 4, 6, 6),
    ),
    "conv2d_groups": (
        {"m.weight": (4, 2, 3, 2)},
        {"type": "conv2d", "groups": 2, "stride": [2, 1]},
        (2, 4, 5, 5),
    ),
    "conv2d_1x1": ({"m.weight": (6, 4, 1, 1)}, "conv2d", (2, 4, 4, 4)),
}
# r = 8: both factors full; r = 1: w2 factored (CP core with use_effective_conv2d); decompose_both: w1 as well
VARIANTS = {
    "full": {"r": 8},
    "w2_low_rank": {"r": 1},
    "cp": {"r": 1, "use_effective_conv2d": True},
    "both": {"r": 1, "decompose_both": True},
    "factor": {"r": 1, "decompose_both": True, "decompose_factor": 2},
}


def build(layer: str, seed: int = 0, **spec_fields) -> tuple[peftdecl.AdaptedModel, np.ndarray]:
    shapes, layer_type, x_shape = LAYERS[layer]
    rng = np.random.default_rng(seed)
    state = {k: rng.normal(size=s) for k, s in shapes.items()}
    spec = {"peft_type": "LOKR", "r": 3, "alpha": 5, "target_modules": ["m"], "init_weights": False}
    model = peftdecl.attach(state, {**spec, **spec_fields}, layer_types={"m": layer_type}, seed=seed)
    return model, rng.normal(size=x_shape)


def params(model: peftdecl.AdaptedModel) -> dict[str, np.ndarray]:
    return {k.split(".", 1)[1]: v for k, v in model.state_dict().items()}


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize(
    "dropout",
    [{}, {"rank_dropout": 0.4}, {"rank_dropout": 0.4, "rank_dropout_scale": True, "module_dropout": 0.3}],
)
def test_gradients_match_finite_differences(layer: str, variant: str, dropout: dict) -> None:
    model, x = build(layer, **VARIANTS[variant], **dropout)
    model.train()
    checked = check_gradients(model, "m", x)
    assert {f"m.{name}" for name in params(model)} | {"input"} == set(checked)


def test_factor_layouts() -> None:
    assert set(params(build("linear", **VARIANTS["full"])[0])) == {"lokr_w1", "lokr_w2"}
    assert set(params(build("linear", **VARIANTS["w2_low_rank"])[0])) == {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}
    assert set(params(build("linear", **VARIANTS["both"])[0])) == {
        "lokr_w1_a",
        "lokr_w1_b",
        "lokr_w2_a",
        "lokr_w2_b",
    }
    assert "lokr_t2" in params(build("conv2d", **VARIANTS["cp"])[0])
    assert "lokr_t2" in params(build("conv1d", **VARIANTS["cp"])[0])
    for layer in ("conv2d_1x1", "conv1d_k1", "linear"):
        assert "lokr_t2" not in params(build(layer, **VARIANTS["cp"])[0])


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_merged_forward_equals_adapter_forward_and_unmerge_restores(layer: str, variant: str) -> None:
    model, x = build(layer, **VARIANTS[variant])
    before = model.base_weight("m")
    adapted = model("m", x)
    model.merge()
    assert rel_err(model("m", x), adapted) <= 1e-12  # float64: merge is exact up to rounding
    model.unmerge()
    assert rel_err(model.base_weight("m"), before) <= 1e-12
    with model.disable_adapters():
        base_out = model("m", x)
    assert rel_err(adapted, base_out) > 1e-3


def test_scale_applies_even_when_both_factors_are_full() -> None:
    model, _ = build("linear", r=8, alpha=3)
    p = params(model)
    assert set(p) == {"lokr_w1", "lokr_w2"}
    base = model.base_weight("m")
    merged = model.merge_and_unload()["m.weight"]
    assert rel_err(merged - base, np.kron(p["lokr_w1"], p["lokr_w2"]) * 3 / 8) <= 1e-12


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("init", [True, "lycoris"])
def test_default_and_lycoris_init_are_no_ops(layer: str, variant: str, init) -> None:
    model, x = build(layer, init_weights=init, **VARIANTS[variant])
    with model.disable_adapters():
        base_out = model("m", x)
    np.testing.assert_array_equal(model("m", x), base_out)
    zeros = {k for k, v in params(model).items() if not np.any(v)}
    if init is True:
        assert zeros == {"lokr_w1"} or zeros == {"lokr_w1_a"}
    else:
        assert zeros == {"lokr_w2"} or zeros == {"lokr_w2_b"}


@pytest.mark.parametrize("scale", [False, True])
def test_rank_dropout_drops_output_rows_rescaled_only_with_rank_dropout_scale(scale: bool) -> None:
    model, x = build("linear", rank_dropout=0.5, rank_dropout_scale=scale)
    with model.disable_adapters():
        base_out = model("m", x)
    eval_delta = model("m", x) - base_out
    model.train()
    for seed in range(6):
        model.engine.rng = np.random.default_rng(seed)
        train_delta = model("m", x) - base_out
        ratio = np.linalg.norm(train_delta, axis=0) / np.linalg.norm(eval_delta, axis=0)
        kept = ratio > 1e-12
        expected = kept.size / kept.sum() if scale else 1.0
        np.testing.assert_allclose(ratio[kept], expected, rtol=1e-12)
        np.testing.assert_allclose(train_delta[:, kept], eval_delta[:, kept] * expected, rtol=1e-12)


def test_mixed_batch_and_two_active_adapters() -> None:
    model, x = build("linear")
    model.add_adapter(
        "b", {"peft_type": "LOKR", "r": 1, "target_modules": ["m"], "init_weights": False}, seed=9
    )
    with model.disable_adapters():
        base = model("m", x)
    deltas = {}
    for name in ("default", "b"):
        model.set_adapter(name)
        deltas[name] = model("m", x) - base
    mixed = model("m", x, adapter_names=["b", "__base__", "default"])
    np.testing.assert_allclose(
        mixed, np.stack([(base + deltas["b"])[0], base[1], (base + deltas["default"])[2]]), rtol=1e-13
    )
    model.set_adapter(["default", "b"])
    np.testing.assert_allclose(model("m", x), base + deltas["default"] + deltas["b"], rtol=1e-12)
    model.train()
    check_gradients(model, "m", x)


@settings(max_examples=60, deadline=None)
@given(dimension=st.integers(1, 400), factor=st.sampled_from([-1, 1, 2, 3, 4, 8, 16]))
def test_factorization_property(dimension: int, factor: int) -> None:
    m, n = factorization(dimension, factor)
    assert m * n == dimension
    if factor > 0 and dimension % factor == 0:
        assert m == factor
    else:
        assert m <= n
        # no divisor pair between m and √dimension is skipped when uncapped
        if factor == -1:
            assert not any(dimension % d == 0 for d in range(m + 1, int(dimension**0.5) + 1))


@settings(max_examples=25, deadline=None)
@given(
    a_shape=st.lists(st.integers(1, 3), min_size=1, max_size=4),
    b_shape=st.lists(st.integers(1, 3), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_kron_gradients_are_the_adjoint_of_kron(a_shape, b_shape, seed) -> None:
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=a_shape), rng.normal(size=b_shape)
    dk = rng.normal(size=np.kron(a, b).shape)
    da, db = kron_grads(a, b, dk)
    # kron is linear in each factor, so <dK, kron(ȧ, b)> = <dL/da, ȧ> exactly
    a_dot, b_dot = rng.normal(size=a.shape), rng.normal(size=b.shape)
    assert abs(np.sum(dk * np.kron(a_dot, b)) - np.sum(da * a_dot)) <= 1e-10 * max(1.0, np.abs(da).sum())
    assert abs(np.sum(dk * np.kron(a, b_dot)) - np.sum(db * b_dot)) <= 1e-10 * max(1.0, np.abs(db).sum())


@settings(max_examples=20, deadline=None)
@given(
    d_in=st.integers(1, 12),
    d_out=st.integers(1, 12),
    r=st.integers(1, 4),
    kernel=st.sampled_from([None, (1,), (3,), (1, 1), (2, 3)]),
    decompose_both=st.booleans(),
    effective=st.booleans(),
    factor=st.sampled_from([-1, 2, 3]),
    seed=st.integers(0, 2**16),
)
def test_forward_matches_merged_weight_and_gradients_property(
    d_in, d_out, r, kernel, decompose_both, effective, factor, seed
) -> None:
    rng = np.random.default_rng(seed)
    if kernel is None:
        state, layer_type, x = (
            {"m.weight": rng.normal(size=(d_out, d_in))},
            "linear",
            rng.normal(size=(3, d_in)),
        )
    else:
        state = {"m.weight": rng.normal(size=(d_out, d_in, *kernel))}
        layer_type = {"type": f"conv{len(kernel)}d", "padding": 1}
        x = rng.normal(size=(2, d_in, *(4,) * len(kernel)))
    spec = {
        "peft_type": "LOKR",
        "r": r,
        "alpha": r + 2,
        "target_modules": ["m"],
        "init_weights": False,
        "decompose_both": decompose_both,
        "use_effective_conv2d": effective,
        "decompose_factor": factor,
    }
    model = peftdecl.attach(state, spec, layer_types={"m": layer_type}, seed=seed)
    adapted = model("m", x)
    model.merge()
    assert rel_err(model("m", x), adapted) <= 1e-11  # float64 round-off only
    model.unmerge()
    model.train()
    check_gradients(model, "m", x, seed=seed)

"""The NumPy reference LoKr on linear and conv layers: gradients vs finite differences (tests/gradcheck.py,
relative 1e-6), the merged weight (float64, relative ≤ 1e-12), the factor layouts (full, decomposed, CP), PEFT's
three initialisations, rank dropout with and without rescaling. Merge == forward and unmerge for every layout:
test_numpy_common.py."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import peftdecl
from peftdecl.plan.kinds.lycoris import factorization
from peftdecl_numpy.kinds.lokr import kron_grads
from tests import layer_cases
from tests.conftest import rel_err
from tests.gradcheck import check_gradients
from tests.layer_cases import base_output, layer_params, random_layer
from tests.numpy_checks import (
    SEEDS,
    add_second_adapter,
    assert_active_pair_sums,
    assert_merge_and_gradients,
    sizes,
)

LAYERS = layer_cases.LOKR_LAYERS
VARIANTS = layer_cases.LOKR_VARIANTS  # the factor layouts
build = partial(layer_cases.build, "lokr")


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
    assert {f"m.{name}" for name in layer_params(model)} | {"input"} == set(checked)


def test_factor_layouts() -> None:
    assert set(layer_params(build("linear", **VARIANTS["full"])[0])) == {"lokr_w1", "lokr_w2"}
    assert set(layer_params(build("linear", **VARIANTS["w2_low_rank"])[0])) == {
        "lokr_w1",
        "lokr_w2_a",
        "lokr_w2_b",
    }
    assert set(layer_params(build("linear", **VARIANTS["both"])[0])) == {
        "lokr_w1_a",
        "lokr_w1_b",
        "lokr_w2_a",
        "lokr_w2_b",
    }
    assert "lokr_t2" in layer_params(build("conv2d", **VARIANTS["cp"])[0])
    assert "lokr_t2" in layer_params(build("conv1d", **VARIANTS["cp"])[0])
    for layer in ("conv2d_1x1", "conv1d_k1", "linear"):
        assert "lokr_t2" not in layer_params(build(layer, **VARIANTS["cp"])[0])


def test_scale_applies_even_when_both_factors_are_full() -> None:
    model, _ = build("linear", r=8, alpha=3)
    p = layer_params(model)
    assert set(p) == {"lokr_w1", "lokr_w2"}
    base = model.base_weight("m")
    merged = model.merge_and_unload()["m.weight"]
    assert rel_err(merged - base, np.kron(p["lokr_w1"], p["lokr_w2"]) * 3 / 8) <= 1e-12


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("init", [True, "lycoris"])
def test_default_and_lycoris_init_are_no_ops(layer: str, variant: str, init) -> None:
    model, x = build(layer, init_weights=init, **VARIANTS[variant])
    np.testing.assert_array_equal(model("m", x), base_output(model, x))
    zeros = {k for k, v in layer_params(model).items() if not np.any(v)}
    if init is True:
        assert zeros == {"lokr_w1"} or zeros == {"lokr_w1_a"}
    else:
        assert zeros == {"lokr_w2"} or zeros == {"lokr_w2_b"}


@pytest.mark.parametrize("scale", [False, True])
def test_rank_dropout_drops_output_rows_rescaled_only_with_rank_dropout_scale(scale: bool) -> None:
    model, x = build("linear", rank_dropout=0.5, rank_dropout_scale=scale)
    base_out = base_output(model, x)
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
    base, deltas = add_second_adapter(model, x, peft_type="LOKR", r=1, init_weights=False)
    mixed = model("m", x, adapter_names=["b", "__base__", "default"])
    np.testing.assert_allclose(
        mixed, np.stack([(base + deltas["b"])[0], base[1], (base + deltas["default"])[2]]), rtol=1e-13
    )
    assert_active_pair_sums(model, x, base, deltas)
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
    seed=SEEDS,
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
    **sizes(d_in=(1, 12), d_out=(1, 12), r=(1, 4)),
    kernel=st.sampled_from([None, (1,), (3,), (1, 1), (2, 3)]),
    decompose_both=st.booleans(),
    effective=st.booleans(),
    factor=st.sampled_from([-1, 2, 3]),
    seed=SEEDS,
)
def test_forward_matches_merged_weight_and_gradients_property(
    d_in, d_out, r, kernel, decompose_both, effective, factor, seed
) -> None:
    state, layer_types, x = random_layer(np.random.default_rng(seed), d_out, d_in, kernel)
    spec = {
        **layer_cases.KINDS["lokr"].spec,
        "r": r,
        "alpha": r + 2,
        "decompose_both": decompose_both,
        "use_effective_conv2d": effective,
        "decompose_factor": factor,
    }
    model = peftdecl.attach(state, spec, layer_types=layer_types, seed=seed)
    assert_merge_and_gradients(model, x, seed, tol=1e-11)  # float64 round-off only

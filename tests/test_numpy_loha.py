"""The NumPy reference LoHa on linear and conv layers: gradients vs finite differences (tests/gradcheck.py,
relative 1e-6), the merged weight (float64, relative ≤ 1e-12), PEFT's no-op initialisation, rank and module
dropout in training mode. Merge == forward and unmerge on every layer: test_numpy_common.py."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import peftdecl
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

LAYERS = layer_cases.LOHA_LAYERS
build = partial(layer_cases.build, "loha")


def param_names(model: peftdecl.AdaptedModel) -> set[str]:
    return {p.name for p in model.plan().layer("m").params}


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize(
    "fields",
    [{}, {"use_effective_conv2d": True}, {"rank_dropout": 0.4}, {"rank_dropout": 0.4, "module_dropout": 0.3}],
)
def test_gradients_match_finite_differences(layer: str, fields: dict) -> None:
    model, x = build(layer, **fields)
    model.train()
    checked = check_gradients(model, "m", x)
    assert {f"m.{name}" for name in param_names(model)} | {"input"} == set(checked)


@pytest.mark.parametrize("seed", range(4))
def test_gradients_when_module_dropout_skips_or_keeps(seed: int) -> None:
    model, x = build("conv2d", module_dropout=0.5, rank_dropout=0.2, use_effective_conv2d=True)
    model.train()
    check_gradients(model, "m", x, seed=seed)


def test_effective_conv_uses_cp_cores_only_for_kernels_larger_than_one() -> None:
    assert {"hada_t1", "hada_t2"} <= param_names(build("conv2d", use_effective_conv2d=True)[0])
    assert {"hada_t1", "hada_t2"} <= param_names(build("conv1d", use_effective_conv2d=True)[0])
    for layer in ("conv2d_1x1", "conv1d_k1", "linear"):
        assert not {"hada_t1", "hada_t2"} & param_names(build(layer, use_effective_conv2d=True)[0])


def test_delta_weight_is_the_scaled_hadamard_product() -> None:
    model, _ = build("linear", r=2, alpha=5)
    p = layer_params(model)
    expected = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"]) * 5 / 2
    merged = model.merge_and_unload()["m.weight"]
    with model.disable_adapters():
        base = model.base_weight("m")
    assert rel_err(merged - base, expected) <= 1e-12


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("effective", [False, True])
def test_default_init_is_a_no_op_and_random_init_is_not(layer: str, effective: bool) -> None:
    model, x = build(layer, init_weights=True, use_effective_conv2d=effective)
    np.testing.assert_array_equal(model("m", x), base_output(model, x))
    assert not np.any(model.state_dict()["m.hada_w2_b"])
    assert all(np.any(v) for k, v in model.state_dict().items() if not k.endswith("hada_w2_b"))


def test_rank_dropout_drops_output_rows_renormalised_by_the_mean() -> None:
    model, x = build("linear", rank_dropout=0.5)
    base_out = base_output(model, x)
    eval_delta = model("m", x) - base_out
    model.train()
    factors = set()
    for seed in range(6):
        model.engine.rng = np.random.default_rng(seed)
        train_delta = model("m", x) - base_out
        # each output feature is either dropped or kept and multiplied by out / (number kept)
        ratio = np.linalg.norm(train_delta, axis=0) / np.linalg.norm(eval_delta, axis=0)
        kept = ratio > 1e-12
        np.testing.assert_allclose(train_delta[:, kept], eval_delta[:, kept] * ratio[kept], rtol=1e-12)
        if kept.any():
            np.testing.assert_allclose(ratio[kept], kept.size / kept.sum(), rtol=1e-12)
        factors.add(int(kept.sum()))
    assert len(factors) > 1  # the masks really vary with the generator


def test_module_dropout_skips_the_whole_adapter_only_in_training() -> None:
    model, x = build("conv1d", module_dropout=0.5)
    base_out = base_output(model, x)
    eval_out = model("m", x)
    model.train()
    outcomes = []
    for seed in range(12):
        model.engine.rng = np.random.default_rng(seed)
        y = model("m", x)
        skipped, applied = rel_err(y, base_out) <= 1e-15, rel_err(y, eval_out) <= 1e-15
        assert skipped != applied
        outcomes.append(skipped)
    assert any(outcomes) and not all(outcomes)
    model.eval()
    np.testing.assert_array_equal(model("m", x), eval_out)


def test_mixed_batch_and_two_active_adapters() -> None:
    model, x = build("linear")
    base, deltas = add_second_adapter(model, x, peft_type="LOHA", r=2, init_weights=False)
    mixed = model("m", x, adapter_names=["default", "b", "__base__", "b"])
    np.testing.assert_allclose(mixed[[1, 3]], (base + deltas["b"])[[1, 3]], rtol=1e-13)
    np.testing.assert_allclose(mixed[0], (base + deltas["default"])[0], rtol=1e-13)
    np.testing.assert_allclose(mixed[2], base[2], rtol=1e-13)
    assert_active_pair_sums(model, x, base, deltas)
    model.train()
    check_gradients(model, "m", x)


def test_rank_and_alpha_patterns_apply() -> None:
    rng = np.random.default_rng(0)
    state = {"a.weight": rng.normal(size=(4, 4)), "b.weight": rng.normal(size=(4, 4))}
    spec = {
        "peft_type": "LOHA",
        "r": 2,
        "alpha": 4,
        "target_modules": ["a", "b"],
        "rank_pattern": {"b": 3},
        "alpha_pattern": {"a": 1},
    }
    plan = peftdecl.attach(state, spec).plan()
    assert (plan.layer("a").r, plan.layer("a").scaling) == (2, 1 / 2)
    assert (plan.layer("b").r, plan.layer("b").scaling) == (3, 4 / 3)
    assert plan.layer("b").param("hada_w1_a").shape[1] == 3


def test_embedding_is_refused_with_a_clear_error() -> None:
    state = {"emb.weight": np.zeros((10, 4))}
    with pytest.raises(peftdecl.TargetError, match=r"emb.*embedding"):
        peftdecl.attach(
            state, {"peft_type": "LOHA", "target_modules": ["emb"]}, layer_types={"emb": "embedding"}
        )


@settings(max_examples=20, deadline=None)
@given(
    **sizes(d_in=(1, 7), d_out=(1, 7), r=(1, 5)),
    kernel=st.sampled_from([None, (1,), (2,), (1, 1), (2, 3)]),
    effective=st.booleans(),
    rank_dropout=st.sampled_from([0.0, 0.3]),
    seed=SEEDS,
)
def test_forward_matches_merged_weight_and_gradients_property(
    d_in, d_out, r, kernel, effective, rank_dropout, seed
) -> None:
    state, layer_types, x = random_layer(np.random.default_rng(seed), d_out, d_in, kernel)
    spec = {
        **layer_cases.KINDS["loha"].spec,
        "r": r,
        "alpha": 2 * r + 1,
        "use_effective_conv2d": effective,
        "rank_dropout": rank_dropout,
    }
    model = peftdecl.attach(state, spec, layer_types=layer_types, seed=seed)
    assert_merge_and_gradients(model, x, seed, tol=1e-11)  # float64 round-off only

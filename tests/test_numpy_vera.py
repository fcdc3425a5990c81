"""The NumPy reference VeRA: gradients vs finite differences, init, shared projections (merge == forward,
unmerge and dropout: test_numpy_common.py).

Tolerances: float64 internal consistency (merge vs forward, unmerge) ≤ 1e-12 relative; gradients through
tests/gradcheck.py (central differences, 1e-6).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import peftdecl
from peftdecl.errors import AdapterFileError
from peftdecl.init import torch_cpu_uniform
from peftdecl.plan.kinds import vera as vera_layout
from tests import layer_cases
from tests.conftest import rel_err
from tests.gradcheck import check_gradients
from tests.layer_cases import base_output
from tests.numpy_checks import add_second_adapter, assert_active_pair_sums

LAYERS = layer_cases.VERA_LAYERS  # modules m and n: the shared projections are cut differently for each
build = partial(layer_cases.build, "vera")


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradients_match_finite_differences(layer: str, dropout: float) -> None:
    model, x = build(layer, vera_dropout=dropout)
    model.train()
    checked = check_gradients(model, "m", x)
    assert {"m.vera_lambda_b", "m.vera_lambda_d", "input"} <= set(checked)
    assert "vera_A" not in model.trainable_parameters()  # the projections are frozen


def test_delta_weight_is_the_paper_formula_on_cut_projections() -> None:
    model, _ = build("linear")
    p = model.state_dict()
    a, b = p["vera_A"], p["vera_B"]
    assert a.shape == (3, 7) and b.shape == (6, 3)  # r × max_in, max_out × r over both layers
    merged = model.merge_and_unload()
    for module, (d_out, d_in) in {"m": (6, 5), "n": (3, 7)}.items():
        lam_b, lam_d = p[f"{module}.vera_lambda_b"], p[f"{module}.vera_lambda_d"]
        expected = np.diag(lam_b) @ b[:d_out] @ np.diag(lam_d) @ a[:, :d_in]
        assert rel_err(merged[f"{module}.weight"] - model.base_model[f"{module}.weight"], expected) <= 1e-12


def test_default_init_is_a_no_op_with_d_initial() -> None:
    model, x = build("linear", init_weights=True, d_initial=0.25)
    p = model.state_dict()
    np.testing.assert_array_equal(p["m.vera_lambda_b"], np.zeros(6))
    np.testing.assert_array_equal(p["m.vera_lambda_d"], np.full(3, 0.25))
    np.testing.assert_array_equal(model("m", x), base_output(model, x))


def test_init_weights_false_gives_unit_lambda_b_and_random_lambda_d() -> None:
    p = build("linear")[0].state_dict()
    np.testing.assert_array_equal(p["m.vera_lambda_b"], np.ones(6))
    assert np.std(p["m.vera_lambda_d"]) > 0


def test_two_active_adapters_and_mixed_batches() -> None:
    model, x = build("linear")
    base, deltas = add_second_adapter(model, x, peft_type="VERA", r=2, init_weights=False)
    assert_active_pair_sums(model, x, base, deltas)
    mixed = model("m", x, adapter_names=["b", "__base__", "default", "b"])
    np.testing.assert_allclose(mixed[[0, 3]], (base + deltas["b"])[[0, 3]], rtol=1e-13)
    np.testing.assert_allclose(mixed[2], (base + deltas["default"])[2], rtol=1e-13)
    np.testing.assert_allclose(mixed[1], base[1], rtol=1e-13)


def test_projections_follow_one_generator_stream() -> None:
    # B continues A's stream: drawing both in one go must equal the two offset draws the plan uses
    r, max_in, max_out, key = 3, 7, 6, 11
    model, _ = build("linear", projection_prng_key=key)
    p = model.state_dict()
    bound_a, bound_b = vera_layout.kaiming_bound(max_in), vera_layout.kaiming_bound(r)
    np.testing.assert_array_equal(p["vera_A"], torch_cpu_uniform(key, 0, bound_a, (r, max_in)))
    tail = torch_cpu_uniform(key, 0, bound_b, (r * max_in + max_out * r,))[r * max_in :]
    np.testing.assert_array_equal(p["vera_B"], tail.reshape(max_out, r))
    assert np.all(np.abs(p["vera_A"]) <= bound_a) and np.all(np.abs(p["vera_B"]) <= bound_b)
    assert np.all(p["vera_A"] == p["vera_A"].astype(np.float32))  # float32 values, as torch draws them


def test_save_and_load_round_trip(tmp_path) -> None:
    model, x = build("linear")
    model.save(tmp_path)
    again = peftdecl.load_adapter(dict(model.base_model), tmp_path)
    x_n = np.random.default_rng(1).normal(size=(2, 7))
    for module, inputs in (("m", x), ("n", x_n)):
        assert rel_err(again(module, inputs), model(module, inputs)) <= 1e-6  # float32 file vs float64


def test_file_without_projections_is_refused_without_a_regenerator(tmp_path, monkeypatch) -> None:
    model, _ = build("linear", save_projection=False)
    model.save(tmp_path)
    monkeypatch.setattr(vera_layout, "_PROJECTION_SOURCES", [])
    with pytest.raises(
        AdapterFileError, match=r"adapter_model\.safetensors: .*save_projection=false.*manual_seed\(0\)"
    ):
        peftdecl.load_adapter(dict(model.base_model), tmp_path)


def test_file_without_projections_uses_a_registered_regenerator(tmp_path, monkeypatch) -> None:
    model, x = build("linear", save_projection=False)
    model.save(tmp_path)
    p = model.state_dict()
    calls = []

    def source(key: int, r: int, max_in: int, max_out: int):
        calls.append((key, r, max_in, max_out))
        return p["vera_A"], p["vera_B"]

    monkeypatch.setattr(vera_layout, "_PROJECTION_SOURCES", [source])
    again = peftdecl.load_adapter(dict(model.base_model), tmp_path)
    assert calls == [(0, 3, 7, 6)]
    assert rel_err(again("m", x), model("m", x)) <= 1e-6  # float32 file


def test_larger_projections_in_a_file_are_cut_to_the_plan() -> None:
    model, _ = build("linear")
    plan, p = model.plan(), model.state_dict()
    rng = np.random.default_rng(3)
    big_a, big_b = rng.normal(size=(5, 9)), rng.normal(size=(8, 5))
    arrays = vera_layout.vera_from_file(plan, {**p, "vera_A": big_a, "vera_B": big_b})
    np.testing.assert_array_equal(arrays["vera_A"], big_a[:3, :7])
    np.testing.assert_array_equal(arrays["vera_B"], big_b[:6, :3])


def test_embedding_layers_are_refused() -> None:
    state = {"e.weight": np.zeros((10, 4))}
    with pytest.raises(peftdecl.TargetError, match=r"\be\b.*embedding.*VERA supports linear, gpt2_conv1d"):
        peftdecl.attach(
            state, {"peft_type": "VERA", "r": 2, "target_modules": ["e"]}, layer_types={"e": "embedding"}
        )


@settings(max_examples=20, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 8), st.integers(1, 8)), min_size=1, max_size=3),
    r=st.integers(1, 6),
    tokens=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_forward_matches_merged_weight_property(shapes, r, tokens, seed) -> None:
    rng = np.random.default_rng(seed)
    state = {f"l{i}.weight": rng.normal(size=(d_out, d_in)) for i, (d_out, d_in) in enumerate(shapes)}
    spec = {
        "peft_type": "VERA",
        "r": r,
        "target_modules": list({k[:-7] for k in state}),
        "init_weights": False,
        "projection_prng_key": seed,
    }
    model = peftdecl.attach(state, spec, seed=seed)
    xs = {f"l{i}": rng.normal(size=(tokens, d_in)) for i, (_, d_in) in enumerate(shapes)}
    adapted = {m: model(m, x) for m, x in xs.items()}
    merged = model.merge_and_unload()
    for m, x in xs.items():
        np.testing.assert_allclose(adapted[m], x @ merged[f"{m}.weight"].T, rtol=1e-10, atol=1e-12)
    model.unmerge()
    model.train()
    for m, x in xs.items():
        check_gradients(model, m, x, seed=seed)

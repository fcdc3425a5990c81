"""The NumPy reference OFT: gradients vs finite differences, Cayley and Neumann, COFT, block dropout (merge ==
forward, unmerge and the no-op default init: test_numpy_common.py).

Tolerances: float64 internal consistency ≤ 1e-10 (relative); gradients by tests/gradcheck.py (1e-6 relative
on a central difference).
"""

from __future__ import annotations

import warnings
from functools import partial

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import peftdecl
from peftdecl_numpy.kinds.oft import project_coft
from peftdecl_numpy.rotation import cayley, neumann, neumann_coefficients, skew_from_triu
from tests import layer_cases
from tests.conftest import rel_err
from tests.gradcheck import check_gradients
from tests.numpy_checks import SEEDS, assert_dense_merge_and_gradients, sizes

TOL = 1e-10  # float64 consistency

LAYERS = layer_cases.OFT_LAYERS
VARIANTS = layer_cases.OFT_VARIANTS
build = partial(layer_cases.build, "oft")  # oft_block_size by layer: layer_cases.OFT_BLOCK_SIZE


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_gradients_match_finite_differences(layer: str, variant: str) -> None:
    model, x = build(layer, **VARIANTS[variant])
    model.train()
    checked = check_gradients(model, "m", x)
    assert checked[0].endswith("R.weight")
    assert ("input" in checked) == (layer != "embedding")


def test_exact_cayley_is_orthogonal_and_neumann_approximates_its_transpose() -> None:
    q = 0.05 * skew_from_triu(np.random.default_rng(0).normal(size=(3, 10)), 5)
    exact = cayley(q)
    np.testing.assert_allclose(
        exact @ exact.transpose(0, 2, 1), np.broadcast_to(np.eye(5), exact.shape), atol=1e-14
    )
    # (I + Q)(I − Q)⁻¹ = I + 2 Σ_{k≥1} Q^k; PEFT's m-term series stops at Q^m, so its error is O(‖Q‖^m)
    for terms in (5, 9):
        m = len(neumann_coefficients(terms)) - 1
        err = np.abs(neumann(q, terms) - exact.transpose(0, 2, 1)).max()
        assert err <= 4 * np.linalg.norm(q, 2, axis=(1, 2)).max() ** m
    assert rel_err(neumann(q, 9), exact) > 1e-2  # the two modes are transposes, not the same matrix


def test_coft_projects_the_stored_tensor_and_differentiates_at_the_projection() -> None:
    model, x = build("linear", coft=True, eps=1e-2)
    key = "m.oft_R.weight"
    stored = model.state_dict()[key]
    model("m", x)  # like HF PEFT, a forward overwrites the parameter by its projection
    projected = model.state_dict()[key]
    limit = 1e-2 / np.sqrt(stored.shape[0])
    norms = np.linalg.norm(skew_from_triu(projected, 4), axis=(1, 2))
    assert np.all(norms <= limit * (1 + 1e-12))
    np.testing.assert_allclose(projected, project_coft(stored, 4, 1e-2), rtol=1e-14)
    for row in range(stored.shape[0]):  # a projection rescales each block, keeping its direction
        assert abs(np.dot(projected[row], stored[row])) == pytest.approx(
            np.linalg.norm(projected[row]) * np.linalg.norm(stored[row]), rel=1e-12
        )

    plain, _ = build("linear")
    plain.engine.trainable_parameters(("default",))[key][...] = projected
    for m in (model, plain):
        m.train()
    grads = [
        m.engine.layer_backward("m", m.engine.layer_forward("m", x)[1], np.ones((3, 5)))
        for m in (model, plain)
    ]
    assert rel_err(grads[0][key], grads[1][key]) <= TOL
    assert rel_err(grads[0]["input"], grads[1]["input"]) <= TOL


def test_coft_gradients_inside_the_ball_match_finite_differences() -> None:
    model, x = build(
        "linear", coft=True, eps=10.0
    )  # every block strictly inside: the projection is the identity
    model.train()
    assert "m.oft_R.weight" in check_gradients(model, "m", x)


def test_coft_leaves_small_blocks_alone() -> None:
    u = np.random.default_rng(1).normal(size=(2, 6)) * 1e-6
    np.testing.assert_array_equal(project_coft(u, 4, 1.0), u)


def test_module_dropout_replaces_whole_blocks_by_identity_in_training_only() -> None:
    model, x = build("linear", module_dropout=0.5)
    eval_out = model("m", x)
    model.train()
    model.engine.rng = np.random.default_rng(5)
    y, tape = model.engine.layer_forward("m", x)
    cache = tape["running"][0][2]
    assert cache["dropped"].sum() == 1  # int(0.5 · 2 blocks)
    rot = cache["rot"]
    for block in range(2):
        if cache["dropped"][block]:
            np.testing.assert_array_equal(rot[block], np.eye(4))
    model.engine.rng = np.random.default_rng(5)
    np.testing.assert_array_equal(model("m", x), y)
    model.eval()
    np.testing.assert_array_equal(model("m", x), eval_out)


def test_module_dropout_never_drops_a_shared_block() -> None:
    model, x = build("linear", module_dropout=0.9, block_share=True)
    eval_out = model("m", x)
    model.train()
    np.testing.assert_array_equal(model("m", x), eval_out)


def _nearest_divisor_brute_force(dim: int, value: int) -> int:
    return min((d for d in range(1, dim + 1) if dim % d == 0), key=lambda d: (abs(d - value), d))


@pytest.mark.parametrize(
    ("field", "value"), [("oft_block_size", 5), ("oft_block_size", 7), ("r", 5), ("r", 20)]
)
def test_block_layout_is_adjusted_to_the_nearest_divisor_with_a_warning(field: str, value: int) -> None:
    # HF PEFT's own rule is compared with ours over many sizes in test_hf_oft
    state = {"m.weight": np.ones((3, 12))}
    spec = {"peft_type": "OFT", "r": 0, "oft_block_size": 0, field: value, "target_modules": ["m"]}
    with pytest.warns(UserWarning, match=f"m: .*{value} does not divide 12"):
        model = peftdecl.attach(state, spec)
    options = model.plan().layer("m").options
    chosen = options["block_size"] if field == "oft_block_size" else options["n_blocks"]
    assert chosen == _nearest_divisor_brute_force(12, value)
    assert options["block_size"] * options["n_blocks"] == 12


def test_unsupported_layers_are_refused_by_name() -> None:
    state = {"c.weight": np.ones((4, 2, 3, 3)), "g.weight": np.ones((4, 1, 1, 1))}
    layer_types = {"c": {"type": "conv2d", "dilation": 2}, "g": {"type": "conv2d", "groups": 2}}
    with pytest.raises(peftdecl.TargetError, match="c: OFT does not support dilated"):
        peftdecl.attach(
            state, {"peft_type": "OFT", "oft_block_size": 2, "target_modules": ["c"]}, layer_types=layer_types
        )
    with pytest.raises(peftdecl.TargetError, match="g: OFT on a grouped convolution"):
        peftdecl.attach(
            state, {"peft_type": "OFT", "oft_block_size": 2, "target_modules": ["g"]}, layer_types=layer_types
        )


def test_save_and_reload_round_trip(tmp_path) -> None:
    model, x = build("embedding", coft=True)
    expected = model("m", x)
    model.save(tmp_path)
    state = {"m.weight": model.base_weight("m")}
    again = peftdecl.load_adapter(state, tmp_path, layer_types={"m": "embedding"})
    assert rel_err(again("m", x), expected) <= 1e-6  # the file is float32


@settings(max_examples=20, deadline=None)
@given(
    **sizes(blocks=(1, 4), block=(2, 5), d_out=(1, 4), terms=(2, 7)),
    share=st.booleans(),
    exact=st.booleans(),
    seed=SEEDS,
)
def test_linear_forward_matches_merged_weight_property(
    blocks, block, d_out, share, exact, terms, seed
) -> None:
    rng = np.random.default_rng(seed)
    d_in = blocks * block
    state = {"m.weight": rng.normal(size=(d_out, d_in))}
    spec = {
        "peft_type": "OFT",
        "oft_block_size": block,
        "block_share": share,
        "use_cayley_neumann": not exact,
        "num_cayley_neumann_terms": terms,
        "target_modules": ["m"],
        "init_weights": False,
    }
    model = peftdecl.attach(state, spec, seed=seed)
    x = rng.normal(size=(2, d_in))
    assert_dense_merge_and_gradients(model, x, seed, tol=TOL)


def test_neumann_adapters_from_before_peft_0_18_warn() -> None:
    # HF PEFT 0.18.0 changed the series; an older file's numbers were computed with another one
    state = {"m.weight": np.ones((3, 8))}
    spec = {"peft_type": "OFT", "oft_block_size": 4, "target_modules": ["m"], "peft_version": "0.17.1"}
    with pytest.warns(UserWarning, match="saved by peft 0.17.1"):
        peftdecl.attach(state, spec)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peftdecl.attach(state, {**spec, "peft_version": "0.21.2"})
        peftdecl.attach(state, {**spec, "use_cayley_neumann": False})

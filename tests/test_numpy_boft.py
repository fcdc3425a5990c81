"""The NumPy reference BOFT: gradients vs finite differences, the butterfly itself, block dropout, and files
with several butterfly factors (which HF PEFT only produces with its CUDA extension). Merge == forward, unmerge
and the no-op default init: test_numpy_common.py.

Tolerances: float64 internal consistency ≤ 1e-10 (relative), orthogonality ≤ 1e-12; gradients by
tests/gradcheck.py (1e-6 relative on a central difference).
"""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
from hypothesis import given, settings

import peftdecl
from peftdecl.plan.kinds.boft import butterfly_perms
from peftdecl_numpy.kinds.boft import butterfly_matrix, orthogonal_blocks
from tests import layer_cases
from tests.conftest import rel_err
from tests.gradcheck import check_gradients
from tests.layer_cases import layer_params
from tests.numpy_checks import SEEDS, assert_dense_merge_and_gradients, sizes

TOL = 1e-10  # float64 consistency

LAYERS = layer_cases.BOFT_LAYERS
VARIANTS = layer_cases.BOFT_VARIANTS
build = partial(layer_cases.build, "boft")


def butterfly_spec(block: int, factors: int) -> dict:
    """BOFT with ``factors`` butterfly factors of ``block``-wide blocks, randomly initialised."""
    return {**layer_cases.KINDS["boft"].spec, "boft_block_size": block, "boft_n_butterfly_factor": factors}


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_gradients_match_finite_differences(layer: str, variant: str) -> None:
    model, x = build(layer, **VARIANTS[variant])
    model.train()
    assert check_gradients(model, "m", x) == ["m.boft_R", "m.boft_s", "input"]


@pytest.mark.parametrize("factors", [1, 2, 3, 4])
def test_butterfly_is_the_product_of_permuted_block_diagonal_factors(factors: int) -> None:
    # HF PEFT's definition, formed densely: P_i[k, p_i[k]] = 1, B_i = P_i · blockdiag(Q_i) · P_iᵀ,
    # M = B_{N−1} ⋯ B_0
    width, block = 16, 2
    state = {"m.weight": np.random.default_rng(0).normal(size=(3, width))}
    model = peftdecl.attach(state, butterfly_spec(block, factors), seed=factors)
    lp = model.plan().layer("m")
    params = model.state_dict()
    p = {"boft_R": params["m.boft_R"], "boft_s": params["m.boft_s"]}
    q = orthogonal_blocks(p)[1]
    dense = np.eye(width)
    for i, perm in enumerate(butterfly_perms(width, width // block, block, factors)):
        perm_mat = np.zeros((width, width))
        perm_mat[np.arange(width), perm] = 1.0
        blocks = np.zeros((width, width))
        for j, qj in enumerate(q[i]):
            blocks[j * block : (j + 1) * block, j * block : (j + 1) * block] = qj
        dense = perm_mat @ blocks @ perm_mat.T @ dense
    m = butterfly_matrix(lp, p)
    assert rel_err(m, dense) <= 1e-13
    np.testing.assert_allclose(m @ m.T, np.eye(width), atol=1e-12)
    x = np.random.default_rng(1).normal(size=(4, width))
    expected = (x @ dense @ state["m.weight"].T) * p["boft_s"].reshape(-1)
    assert rel_err(model("m", x), expected) <= TOL


def test_each_butterfly_factor_doubles_the_coordinates_an_output_mixes() -> None:
    # factor i permutes within groups of 2^i blocks, so with 2×2 blocks N factors couple each coordinate with
    # block · 2^(N−1) others, and N = log2(D) + 1 factors give a dense M
    width, block = 16, 2
    for factors in (1, 2, 3, 4):
        model = peftdecl.attach({"m.weight": np.ones((1, width))}, butterfly_spec(block, factors), seed=1)
        m = butterfly_matrix(model.plan().layer("m"), layer_params(model))
        reach = (np.abs(m) > 1e-15).sum(axis=1)
        assert np.all(reach == block * 2 ** (factors - 1))


def test_dropout_replaces_blocks_of_one_factor_in_training_only() -> None:
    model, x = build("linear", boft_block_size=2, boft_n_butterfly_factor=2, boft_dropout=0.5)
    eval_out = model("m", x)
    model.train()
    model.engine.rng = np.random.default_rng(3)
    y, tape = model.engine.layer_forward("m", x)
    cache = tape["running"][0][2]
    dropped = cache["dropped"]
    assert (
        dropped.sum() == 2 and np.count_nonzero(dropped.any(axis=1)) == 1
    )  # int(0.5 · 4) blocks, one factor
    np.testing.assert_array_equal(cache["used"][dropped], np.broadcast_to(np.eye(2), (2, 2, 2)))
    model.engine.rng = np.random.default_rng(3)
    np.testing.assert_array_equal(model("m", x), y)
    model.eval()
    np.testing.assert_array_equal(model("m", x), eval_out)


def test_several_factors_round_trip_through_a_file(tmp_path) -> None:
    model, x = build("conv2d", boft_block_size=2, boft_n_butterfly_factor=3)
    expected = model("m", x)
    model.save(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["boft_n_butterfly_factor"] == 3
    state = {"m.weight": model.base_weight("m"), "m.bias": model.engine._layers["m"].bias}
    again = peftdecl.load_adapter(state, tmp_path, layer_types={"m": LAYERS["conv2d"][1]})
    assert again.state_dict()["m.boft_R"].shape == (3, 4, 2, 2)
    assert rel_err(again("m", x), expected) <= 1e-6  # float32 file


def test_single_factor_file_with_a_larger_configured_factor_loads_as_identity_factors(tmp_path) -> None:
    # what HF PEFT writes without its CUDA extension: config N = 2, tensors of one factor
    model, x = build("linear", boft_block_size=2)
    expected = model("m", x)
    model.save(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "boft_n_butterfly_factor": 2}))
    state = {"m.weight": model.base_weight("m"), "m.bias": model.engine._layers["m"].bias}
    with pytest.warns(UserWarning, match="holds 1 butterfly factor but its config says 2"):
        again = peftdecl.load_adapter(state, tmp_path)
    assert again.state_dict()["m.boft_R"].shape == (2, 4, 2, 2)
    assert rel_err(again("m", x), expected) <= 1e-6  # float32 file


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"boft_block_size": 3}, "boft_block_size 3 must divide 8"),
        ({"boft_block_size": 0, "boft_block_num": 3}, "boft_block_num 3 must divide 8"),
        ({"boft_block_size": 4, "boft_n_butterfly_factor": 3}, "= 16 must divide 8"),
        ({"boft_block_size": 0, "boft_block_num": 2, "boft_n_butterfly_factor": 3}, "multiple of 2"),
        ({"boft_block_size": 0, "boft_block_num": 8, "boft_n_butterfly_factor": 2}, "must both be even"),
    ],
)
def test_inconsistent_block_layouts_are_refused_by_module(fields: dict, message: str) -> None:
    state = {"m.weight": np.ones((2, 8))}
    with pytest.raises(peftdecl.TargetError, match=f"m: BOFT on width 8: .*{message}"):
        peftdecl.attach(state, {"peft_type": "BOFT", "target_modules": ["m"], **fields})


@settings(max_examples=15, deadline=None)
@given(**sizes(block_half=(1, 2), log_blocks=(0, 3), extra=(0, 3), d_out=(1, 3)), seed=SEEDS)
def test_linear_forward_matches_merged_weight_property(block_half, log_blocks, extra, d_out, seed) -> None:
    block, blocks = 2 * block_half, 2**log_blocks
    factors = 1 + min(extra, log_blocks)  # every valid number of factors for this layout
    rng = np.random.default_rng(seed)
    state = {"m.weight": rng.normal(size=(d_out, block * blocks))}
    model = peftdecl.attach(state, butterfly_spec(block, factors), seed=seed)
    x = rng.normal(size=(2, block * blocks))
    assert_dense_merge_and_gradients(model, x, seed, tol=TOL)

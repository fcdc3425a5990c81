"""The NumPy reference AdaLoRA: gradients vs finite differences, kept-rank masks, the orthogonality
regulariser, the rank allocator's own invariants and the pruned-file hooks (merge == forward, unmerge and
dropout: test_numpy_common.py).

Tolerances: float64 internal consistency ≤ 1e-10 relative; gradients by tests/gradcheck.py (central
differences).
"""

from __future__ import annotations

import itertools
import json
from functools import partial

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import peftdecl
from peftdecl.errors import AdapterFileError, PeftdeclError, TargetError
from peftdecl_numpy.kinds.adalora import orthogonal_regularizer
from peftdecl_numpy.rank_allocator import RankAllocator
from tests import layer_cases
from tests.conftest import rel_err
from tests.gradcheck import FD_TOL, central_difference, check_gradients
from tests.layer_cases import base_output
from tests.numpy_checks import SEEDS, assert_dense_merge_and_gradients, assert_merge_and_gradients, sizes

LAYERS = layer_cases.ADALORA_LAYERS
MASK = layer_cases.ADALORA_MASK
build = partial(layer_cases.build, "adalora")


def spec_for(**fields) -> dict:
    return {**layer_cases.KINDS["adalora"].spec, **fields}


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("fields", [{}, {"lora_dropout": 0.3}, MASK, {"lora_alpha": 0}])
def test_gradients_match_finite_differences(layer: str, fields: dict) -> None:
    model, x = build(layer, **fields)
    model.train()
    checked = check_gradients(model, "m", x)
    assert {"m.lora_A", "m.lora_E", "m.lora_B", "input"} <= set(checked)


def test_default_init_is_a_no_op_but_not_zero() -> None:
    model, x = build("linear", init_lora_weights=True)
    np.testing.assert_array_equal(model("m", x), base_output(model, x))
    params = model.state_dict()
    assert not params["m.lora_E"].any() and params["m.lora_A"].any() and params["m.lora_B"].any()


def test_scale_divides_by_init_r_plus_eps() -> None:
    # delta weight of the reference vs the formula written out with the stored tensors
    model, _ = build("linear", lora_alpha=5)
    p = model.state_dict()
    merged = model.merge_and_unload()
    expected = p["m.lora_B"] @ (p["m.lora_A"] * p["m.lora_E"]) * 5 / (3 + 1e-5)
    base, _ = build("linear", lora_alpha=5)
    assert rel_err(merged["m.weight"] - base.base_weight("m"), expected) <= 1e-12


@pytest.mark.parametrize("layer", ["linear", "conv2d"])
def test_masked_triplet_does_not_exist(layer: str) -> None:
    masked, x = build(layer, **MASK)
    full, _ = build(layer)
    # the same stored numbers with the dropped triplet's singular value zeroed give the same layer
    full.trainable_parameters()["m.lora_E"][1] = 0.0
    assert rel_err(masked("m", x), full("m", x)) <= 1e-12
    engine = masked.engine
    y, tape = engine.layer_forward("m", x)
    grads = engine.layer_backward("m", tape, np.ones_like(y))
    assert grads["m.lora_E"][1, 0] == 0.0


@pytest.mark.parametrize("fields", [{}, {"rank_pattern": {"m.lora_E": [False, True, True]}}])
def test_orthogonal_regularizer_gradient_and_value(fields: dict) -> None:
    rng = np.random.default_rng(3)
    state = {"m.weight": rng.normal(size=(6, 5)), "n.weight": rng.normal(size=(4, 6))}
    model = peftdecl.attach(state, spec_for(target_modules=["m", "n"], orth_reg_weight=0.3, **fields), seed=2)
    params = model.trainable_parameters()
    value, grads = orthogonal_regularizer(model.plan(), params)
    a = params["n.lora_A"]
    # the value, computed from its definition on one layer pair and the other pair
    norms = [
        np.linalg.norm(a @ a.T - np.eye(3)),
        np.linalg.norm(params["n.lora_B"].T @ params["n.lora_B"] - np.eye(3)),
    ]
    kept = np.asarray(fields["rank_pattern"]["m.lora_E"]) if fields else np.ones(3, bool)
    am, bm = params["m.lora_A"][kept], params["m.lora_B"][:, kept]
    norms += [np.linalg.norm(am @ am.T - np.eye(len(am))), np.linalg.norm(bm.T @ bm - np.eye(len(am)))]
    assert abs(value - 0.3 * np.mean(norms)) <= 1e-12 * value
    directions = np.random.default_rng(4)
    for key, param in params.items():
        direction = directions.normal(size=param.shape)
        numeric = central_difference(
            lambda: orthogonal_regularizer(model.plan(), params)[0], param, direction
        )
        analytic = float(np.sum(grads[key] * direction)) if key in grads else 0.0  # lora_E does not enter R
        assert abs(numeric - analytic) <= FD_TOL * max(1.0, abs(numeric)), (key, numeric, analytic)
    if fields:
        assert not grads["m.lora_A"][0].any() and not grads["m.lora_B"][:, 0].any()


def allocator_setup(seed: int = 0, **fields):
    rng = np.random.default_rng(seed)
    state = {f"l{i}.weight": rng.normal(size=(5 + i, 6)) for i in range(3)}
    spec = spec_for(
        init_r=4, target_r=2, target_modules=["l0", "l1", "l2"], total_step=12, tinit=2, tfinal=3, **fields
    )
    model = peftdecl.attach(state, spec, seed=seed)
    return model, RankAllocator(model.plan()), rng


def random_grads(params: dict, rng: np.random.Generator) -> dict:
    return {k: rng.normal(size=v.shape) for k, v in params.items()}


def test_budget_schedule_shape() -> None:
    _, alloc, _ = allocator_setup()
    assert (alloc.init_bgt, alloc.target_bgt) == (12, 6)
    budgets = [alloc.budget_schedule(t)[0] for t in range(13)]
    assert budgets[:3] == [alloc.init_bgt] * 3 and budgets[9:] == [alloc.target_bgt] * 4
    assert all(a >= b for a, b in itertools.pairwise(budgets))
    assert not any(alloc.budget_schedule(t)[1] for t in range(3))


def test_allocation_keeps_budget_then_freezes_the_final_mask() -> None:
    model, alloc, rng = allocator_setup()
    params = model.trainable_parameters()
    seen = []
    for step in range(1, 13):
        budget, mask = alloc.update_and_allocate(step, params, random_grads(params, rng))
        if mask is None:
            assert step <= alloc.tinit
            continue
        kept = sum(sum(v) for v in mask.values())
        assert kept == budget  # continuous random scores: no ties at the threshold
        for module, keep in ((k[: -len(".lora_E")], v) for k, v in mask.items()):
            assert not params[f"{module}.lora_E"][~np.asarray(keep)].any()
        seen.append(mask)
        for value in params.values():  # an optimiser step revives masked singular values
            value += 0.01 * rng.normal(size=value.shape)
    assert seen[-1] == seen[-2] == seen[-3]  # steps after total_step - tfinal re-apply the final mask
    assert sum(sum(v) for v in alloc.rank_pattern.values()) == alloc.target_bgt
    assert set(alloc.rank_pattern) == {f"l{i}.lora_E" for i in range(3)}


def test_allocator_past_the_end_needs_a_final_mask() -> None:
    model, alloc, _ = allocator_setup()
    with pytest.raises(ValueError, match="no mask was ever allocated"):
        alloc.update_and_allocate(11, model.trainable_parameters(), {})
    with pytest.raises(KeyError, match=r"grads has no entry l0\.lora_A"):
        alloc.update_and_allocate(1, model.trainable_parameters(), {})


def test_allocator_on_a_pruned_plan_never_revives_dropped_triplets() -> None:
    pattern = {"l0.lora_E": [True, False, True, True], "l1.lora_E": [False] * 3 + [True]}
    model, alloc, rng = allocator_setup(rank_pattern=pattern)
    assert alloc.init_bgt == 4 + 3 + 1
    params = model.trainable_parameters()
    for step in range(1, 10):
        _, mask = alloc.update_and_allocate(step, params, random_grads(params, rng))
    assert mask is not None and not mask["l0.lora_E"][1] and not any(mask["l1.lora_E"][:3])


def test_pruned_file_round_trip(tmp_path) -> None:
    model, x = build("linear", **MASK)
    model.save(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {"m.lora_E": [True, False, True]}
    from peftdecl.formats.safetensors_io import read_safetensors

    tensors, _ = read_safetensors(tmp_path / "adapter_model.safetensors")
    assert {k: v.shape for k, v in tensors.items()} == {
        "base_model.model.m.lora_A": (2, 5),
        "base_model.model.m.lora_E": (2, 1),
        "base_model.model.m.lora_B": (6, 2),
    }
    state = LAYERS["linear"].random_state(np.random.default_rng(0))  # the base build() drew
    loaded = peftdecl.load_adapter(state, tmp_path)
    assert rel_err(loaded("m", x), model("m", x)) <= 1e-6  # float32 file
    assert not loaded.state_dict()["m.lora_A"][1].any()


def test_allocated_mask_reaches_the_file_through_update_spec(tmp_path) -> None:
    model, alloc, rng = allocator_setup()
    params = model.trainable_parameters()
    for step in range(1, 10):
        alloc.update_and_allocate(step, params, random_grads(params, rng))
    x = rng.normal(size=(2, 6))
    before = {m: model(m, x) for m in ("l0", "l1", "l2")}
    model.update_spec(rank_pattern=alloc.rank_pattern)
    assert all(rel_err(model(m, x), before[m]) <= 1e-12 for m in before)
    model.save(tmp_path)
    saved_pattern = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    assert saved_pattern == alloc.rank_pattern
    model.merge()
    with pytest.raises(PeftdeclError, match="merged"):
        model.update_spec(rank_pattern=None)
    model.unmerge()
    with pytest.raises(PeftdeclError, match="would change the tensors"):
        model.update_spec(init_r=5, rank_pattern=None)


def test_bad_rank_patterns_and_files_are_named() -> None:
    with pytest.raises(TargetError, match="expected init_r = 3"):
        build("linear", rank_pattern={"m.lora_E": [True, False]})
    with pytest.raises(TargetError, match="does not target"):
        build("linear", rank_pattern={"other.lora_E": [True, False, True]})
    with pytest.raises(TargetError, match=r"'<module>\.lora_E'"):
        build("linear", rank_pattern={"m.lora_A": [True, False, True]})
    with pytest.raises(TargetError, match="grouped convolution"):
        state = {"m.weight": np.ones((4, 1, 3, 3))}
        peftdecl.attach(state, spec_for(), layer_types={"m": {"type": "conv2d", "groups": 2}})
    with pytest.raises(TargetError, match="supports linear, conv2d, gpt2_conv1d"):
        peftdecl.attach({"m.weight": np.ones((7, 3))}, spec_for(), layer_types={"m": "embedding"})
    model, _ = build("linear", **MASK)
    from peftdecl.plan.kinds.adalora import expand_from_file

    arrays = model.state_dict()
    arrays["m.lora_A"] = arrays["m.lora_A"][:1]
    with pytest.raises(AdapterFileError, match=r"m.lora_A has shape \[1, 5\]; rank_pattern keeps 2 of 3"):
        expand_from_file(model.plan(), arrays)


@settings(max_examples=20, deadline=None)
@given(**sizes(d_in=(1, 8), d_out=(1, 8), init_r=(1, 5), tokens=(1, 4), keep_bits=(0, 31)), seed=SEEDS)
def test_linear_forward_matches_merged_weight_property(d_in, d_out, init_r, tokens, keep_bits, seed) -> None:
    rng = np.random.default_rng(seed)
    state = {"m.weight": rng.normal(size=(d_out, d_in))}
    mask = [bool(keep_bits >> i & 1) for i in range(init_r)]
    model = peftdecl.attach(
        state, spec_for(init_r=init_r, target_r=1, rank_pattern={"m.lora_E": mask}), seed=seed
    )
    assert_dense_merge_and_gradients(model, rng.normal(size=(tokens, d_in)), seed)


@settings(max_examples=10, deadline=None)
@given(
    **sizes(channels=(1, 3), out=(1, 3), stride=(1, 2), padding=(0, 1), init_r=(1, 4)),
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    seed=SEEDS,
)
def test_conv2d_forward_matches_merged_weight_property(
    channels, out, kernel, stride, padding, init_r, seed
) -> None:
    rng = np.random.default_rng(seed)
    state = {"m.weight": rng.normal(size=(out, channels, *kernel))}
    layer = {"type": "conv2d", "stride": stride, "padding": padding}
    model = peftdecl.attach(state, spec_for(init_r=init_r, target_r=1), layer_types={"m": layer}, seed=seed)
    assert_merge_and_gradients(model, rng.normal(size=(2, channels, 5, 4)), seed, tol=1e-10)

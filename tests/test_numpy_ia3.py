"""The NumPy reference IA3: shapes, feed-forward matching, gradients vs finite differences, merge, unmerge.

Tolerances: float64 internal consistency ≤ 1e-12 (merge vs forward, dense definitions); gradients through
tests/gradcheck.py (central differences, ≤ 1e-6 relative); unmerge is HF PEFT's division by l + 1e-8, so it is
compared exactly with that formula (≤ 1e-14) and with the original weight within its own bound 1e-8 / min |l|.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import peftdecl
from tests import layer_cases
from tests.conftest import rel_err
from tests.gradcheck import check_gradients
from tests.layer_cases import base_output
from tests.numpy_checks import SEEDS, assert_dense_merge_and_gradients, sizes

LAYERS = layer_cases.IA3_LAYERS


def build(layer: str, feedforward: bool, seed: int = 0, **fields) -> tuple[peftdecl.AdaptedModel, np.ndarray]:
    """IA3 on ``layer``, scaling its input (``feedforward``) or its output."""
    return layer_cases.build("ia3", layer, seed, feedforward_modules=["m"] if feedforward else [], **fields)


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("feedforward", [False, True])
def test_vector_shape_follows_peft(layer: str, feedforward: bool) -> None:
    model, _ = build(layer, feedforward)
    info = model.plan().layer("m").layer
    shape = model.state_dict()["m.ia3_l"].shape
    if info.is_conv:
        channels = info.in_features if feedforward else info.out_features
        assert shape == (1, channels, *(1,) * len(info.kernel_size))  # (1, C, 1, 1) or (1, C, 1, 1, 1)
    else:
        assert shape == ((1, info.in_features) if feedforward else (info.out_features, 1))


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("feedforward", [False, True])
def test_gradients_match_finite_differences(layer: str, feedforward: bool) -> None:
    model, x = build(layer, feedforward)
    model.train()
    assert check_gradients(model, "m", x) == ["m.ia3_l", "input"]


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("feedforward", [False, True])
def test_merge_equals_forward_and_unmerge_is_peft_division(layer: str, feedforward: bool) -> None:
    model, x = build(layer, feedforward)
    before, l_vec = model.base_weight("m"), model.state_dict()["m.ia3_l"]
    adapted = model("m", x)
    model.merge()
    merged = model.base_weight("m")
    assert rel_err(model("m", x), adapted) <= 1e-12  # float64: merge is exact up to rounding
    model.unmerge()
    unmerged = model.base_weight("m")
    l_entries = merged / before  # the l that scaled each entry: its output row's, or its input column's
    assert rel_err(unmerged, merged / (l_entries + 1e-8)) <= 1e-14  # HF PEFT's W' / (l + 1e-8)
    assert rel_err(unmerged, before) <= 1e-8 / np.abs(l_vec).min()  # inexact by about 1e-8 / |l|
    assert rel_err(adapted, base_output(model, x)) > 1e-3


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("feedforward", [False, True])
def test_default_init_is_an_exact_no_op(layer: str, feedforward: bool) -> None:
    model, x = build(layer, feedforward, init_ia3_weights=True)
    np.testing.assert_array_equal(model("m", x), base_output(model, x))
    np.testing.assert_array_equal(model.state_dict()["m.ia3_l"], 1.0)


@pytest.mark.parametrize("feedforward", [False, True])
def test_linear_forward_against_dense_definitions(feedforward: bool) -> None:
    model, x = build("linear", feedforward)
    w, b, l_vec = (
        model.base_weight("m"),
        model.base_model["m.bias"],
        model.state_dict()["m.ia3_l"].reshape(-1),
    )
    expected = (x * l_vec) @ w.T + b if feedforward else (x @ w.T + b) * l_vec  # the bias is scaled too
    assert rel_err(model("m", x), expected) <= 1e-12
    model.merge()
    assert rel_err(model.engine.unload()["m.bias"], b if feedforward else b * l_vec) <= 1e-15


def test_feedforward_matching_rules() -> None:
    state = {f"{m}.weight": np.ones((2, 2)) for m in ("a.q_proj", "a.down_proj", "a.up")}
    targets = ["q_proj", "down_proj", "up"]

    def feedforward(selector) -> dict[str, bool]:
        spec = {"peft_type": "IA3", "target_modules": targets, "feedforward_modules": selector}
        if isinstance(selector, list):
            spec["target_modules"] = targets + [s for s in selector if s not in targets]
        plan = peftdecl.attach(state, spec).plan()
        return {lp.module: lp.options["feedforward"] for lp in plan.layers}

    # a list entry is a raw suffix (no '.' boundary), unlike target_modules
    assert feedforward(["proj"]) == {"a.q_proj": True, "a.down_proj": True, "a.up": False}
    assert feedforward(r"a\.(down_proj|up)") == {"a.q_proj": False, "a.down_proj": True, "a.up": True}
    assert feedforward("down_proj") == {"a.q_proj": False, "a.down_proj": False, "a.up": False}  # full match
    llama = peftdecl.attach(state, {"peft_type": "IA3", "target_modules": targets}, model_type="llama").plan()
    assert {lp.module for lp in llama.layers if lp.options["feedforward"]} == {"a.down_proj"}
    with pytest.raises(peftdecl.TargetError, match="feedforward_modules is null"):
        peftdecl.attach(state, {"peft_type": "IA3", "target_modules": targets})
    with pytest.raises(peftdecl.SpecError, match="subset of target_modules"):
        peftdecl.load_spec(
            {"peft_type": "IA3", "target_modules": ["up"], "feedforward_modules": ["down_proj"]}
        )


def test_unsupported_layers_are_refused() -> None:
    state = {"emb.weight": np.ones((5, 3)), "c.weight": np.ones((2, 3, 3))}
    for module, layer_type in (("emb", "embedding"), ("c", "conv1d")):
        spec = {"peft_type": "IA3", "target_modules": [module], "feedforward_modules": []}
        with pytest.raises(peftdecl.TargetError, match=rf"{module}\b.*{layer_type}.*IA3 supports"):
            peftdecl.attach(state, spec, layer_types={"emb": "embedding", "c": "conv1d"})


@settings(max_examples=20, deadline=None)
@given(
    **sizes(d_in=(1, 7), d_out=(1, 7), tokens=(1, 4)),
    feedforward=st.booleans(),
    bias=st.booleans(),
    seed=SEEDS,
)
def test_linear_merge_and_gradients_property(d_in, d_out, tokens, feedforward, bias, seed) -> None:
    rng = np.random.default_rng(seed)
    state = {"m.weight": rng.normal(size=(d_out, d_in))}
    if bias:
        state["m.bias"] = rng.normal(size=d_out)
    spec = {
        "peft_type": "IA3",
        "target_modules": ["m"],
        "feedforward_modules": ["m"] if feedforward else [],
        "init_ia3_weights": False,
    }
    model = peftdecl.attach(state, spec, seed=seed)
    assert_dense_merge_and_gradients(model, rng.normal(size=(tokens, d_in)), seed)

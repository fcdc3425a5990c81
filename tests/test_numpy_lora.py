"""The NumPy reference LoRA on every layer type: gradients vs finite differences, merge == forward, unmerge."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import peftdecl
from tests.conftest import rel_err
from tests.gradcheck import check_gradients

LAYERS = {
    "linear": ({"m.weight": (6, 5), "m.bias": (6,)}, "linear", (4, 5)),
    "embedding": ({"m.weight": (11, 5)}, "embedding", None),
    "conv1d": (
        {"m.weight": (4, 3, 3), "m.bias": (4,)},
        {"type": "conv1d", "padding": 1, "stride": 2},
        (2, 3, 9),
    ),
    "conv2d": ({"m.weight": (4, 3, 3, 3), "m.bias": (4,)}, {"type": "conv2d", "padding": 1}, (2, 3, 5, 5)),
    "conv2d_1x1": ({"m.weight": (4, 3, 1, 1)}, "conv2d", (2, 3, 4, 4)),
    "gpt2_conv1d": ({"m.weight": (5, 6), "m.bias": (6,)}, "gpt2_conv1d", (4, 5)),
}


def build(layer: str, seed: int = 0, **spec_fields) -> tuple[peftdecl.AdaptedModel, np.ndarray]:
    shapes, layer_type, x_shape = LAYERS[layer]
    rng = np.random.default_rng(seed)
    state = {k: rng.normal(size=s) for k, s in shapes.items()}
    spec = {"peft_type": "LORA", "r": 3, "lora_alpha": 6, "target_modules": ["m"], "init_lora_weights": False}
    model = peftdecl.attach(state, {**spec, **spec_fields}, layer_types={"m": layer_type}, seed=seed)
    x = rng.integers(0, 11, size=(2, 4)) if x_shape is None else rng.normal(size=x_shape)
    return model, x


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("fields", [{}, {"use_rslora": True}, {"lora_dropout": 0.3}, {"lora_bias": True}])
def test_gradients_match_finite_differences(layer: str, fields: dict) -> None:
    if layer == "embedding" and ("lora_bias" in fields or "lora_dropout" in fields):
        pytest.skip("embeddings have no lora_bias and no dropout in HF PEFT")
    model, x = build(layer, **fields)
    model.train()
    checked = check_gradients(model, "m", x)
    assert any(k.endswith(("lora_A.weight", "lora_embedding_A")) for k in checked)


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_merged_forward_equals_adapter_forward_and_unmerge_restores(layer: str) -> None:
    model, x = build(layer, lora_bias=layer not in ("embedding", "conv2d_1x1"))
    before = model.base_weight("m")
    adapted = model("m", x)
    model.merge()
    assert rel_err(model("m", x), adapted) <= 1e-12  # float64: merge is exact up to rounding
    model.unmerge()
    assert rel_err(model.base_weight("m"), before) <= 1e-12
    with model.disable_adapters():
        base_out = model("m", x)
    assert rel_err(model("m", x), base_out) > 1e-3  # the adapter really changes the output


def test_default_init_is_a_no_op() -> None:
    model, x = build("linear", init_lora_weights=True)
    with model.disable_adapters():
        base_out = model("m", x)
    np.testing.assert_array_equal(model("m", x), base_out)


def test_dropout_is_seeded_and_only_in_training() -> None:
    model, x = build("linear", lora_dropout=0.5)
    eval_out = model("m", x)
    model.train()
    model.engine.rng = np.random.default_rng(5)
    first = model("m", x)
    model.engine.rng = np.random.default_rng(5)
    np.testing.assert_array_equal(model("m", x), first)
    assert rel_err(first, eval_out) > 1e-6
    model.eval()
    np.testing.assert_array_equal(model("m", x), eval_out)


def test_mixed_batch_rows_match_single_adapter_runs() -> None:
    model, x = build("linear")
    model.add_adapter(
        "b", {"peft_type": "LORA", "r": 2, "target_modules": ["m"], "init_lora_weights": False}, seed=9
    )
    mixed = model("m", x, adapter_names=["default", "b", "__base__", "b"])
    model.set_adapter("b")
    only_b = model("m", x)
    model.set_adapter("default")
    only_default = model("m", x)
    with model.disable_adapters():
        base = model("m", x)
    np.testing.assert_allclose(mixed[[1, 3]], only_b[[1, 3]], rtol=1e-13)
    np.testing.assert_allclose(mixed[0], only_default[0], rtol=1e-13)
    np.testing.assert_allclose(mixed[2], base[2], rtol=1e-13)


def test_two_active_adapters_sum_their_contributions() -> None:
    model, x = build("linear")
    model.add_adapter(
        "b", {"peft_type": "LORA", "r": 2, "target_modules": ["m"], "init_lora_weights": False}, seed=9
    )
    with model.disable_adapters():
        base = model("m", x)
    deltas = []
    for name in ("default", "b"):
        model.set_adapter(name)
        deltas.append(model("m", x) - base)
    model.set_adapter(["default", "b"])
    np.testing.assert_allclose(model("m", x), base + deltas[0] + deltas[1], rtol=1e-12)
    model.train()
    check_gradients(model, "m", x)


@settings(max_examples=25, deadline=None)
@given(
    d_in=st.integers(1, 9),
    d_out=st.integers(1, 9),
    r=st.integers(1, 6),
    tokens=st.integers(1, 5),
    rslora=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_forward_matches_merged_weight_property(d_in, d_out, r, tokens, rslora, seed) -> None:
    rng = np.random.default_rng(seed)
    state = {"m.weight": rng.normal(size=(d_out, d_in))}
    spec = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 2 * r,
        "use_rslora": rslora,
        "target_modules": ["m"],
        "init_lora_weights": False,
    }
    model = peftdecl.attach(state, spec, seed=seed)
    x = rng.normal(size=(tokens, d_in))
    adapted = model("m", x)
    merged = model.merge_and_unload()
    np.testing.assert_allclose(adapted, x @ merged["m.weight"].T, rtol=1e-10, atol=1e-12)
    model.unmerge()
    model.train()
    check_gradients(model, "m", x, seed=seed)

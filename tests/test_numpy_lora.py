"""The NumPy reference LoRA on every layer type: gradients vs finite differences, mixed batches, two active
adapters. Merge == forward, unmerge, the no-op default init and dropout are in test_numpy_common.py."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import peftdecl
from tests import layer_cases
from tests.gradcheck import check_gradients
from tests.layer_cases import base_output
from tests.numpy_checks import (
    SEEDS,
    add_second_adapter,
    assert_active_pair_sums,
    assert_dense_merge_and_gradients,
    sizes,
)

build = partial(layer_cases.build, "lora")
LAYERS = layer_cases.LORA_LAYERS


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("fields", [{}, {"use_rslora": True}, {"lora_dropout": 0.3}, {"lora_bias": True}])
def test_gradients_match_finite_differences(layer: str, fields: dict) -> None:
    if layer == "embedding" and ("lora_bias" in fields or "lora_dropout" in fields):
        pytest.skip("embeddings have no lora_bias and no dropout in HF PEFT")
    model, x = build(layer, **fields)
    model.train()
    checked = check_gradients(model, "m", x)
    assert any(k.endswith(("lora_A.weight", "lora_embedding_A")) for k in checked)


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
    base = base_output(model, x)
    np.testing.assert_allclose(mixed[[1, 3]], only_b[[1, 3]], rtol=1e-13)
    np.testing.assert_allclose(mixed[0], only_default[0], rtol=1e-13)
    np.testing.assert_allclose(mixed[2], base[2], rtol=1e-13)


def test_two_active_adapters_sum_their_contributions() -> None:
    model, x = build("linear")
    base, deltas = add_second_adapter(model, x, peft_type="LORA", r=2, init_lora_weights=False)
    assert_active_pair_sums(model, x, base, deltas)
    model.train()
    checked = check_gradients(model, "m", x)
    # several active adapters: every tensor keyed "<adapter>/<full key>", as on the torch backend
    assert {"default/m.lora_A.weight", "b/m.lora_A.weight", "b/m.lora_B.weight"} <= set(checked)


@settings(max_examples=25, deadline=None)
@given(**sizes(d_in=(1, 9), d_out=(1, 9), r=(1, 6), tokens=(1, 5)), rslora=st.booleans(), seed=SEEDS)
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
    assert_dense_merge_and_gradients(model, rng.normal(size=(tokens, d_in)), seed)

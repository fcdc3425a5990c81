"""The NumPy backend against the core contracts of :mod:`peftdecl.backend`: every kind's ops implement the kind-ops
Protocols; the engine's generator is seeded by the engine options and its state can be saved and restored;
update_spec keeps the live arrays; the inventory reports each layer's dtype and quantisation, and attaching to a
quantised layer is refused with its name; the engine computes in the dtype it is given.
"""

from __future__ import annotations

import importlib
import re

import numpy as np
import pytest

import peftdecl
from peftdecl.backend import AdditiveOps, ComposingOps, Engine, ExplicitGradientOps, KindOps, get_backend
from peftdecl.errors import BackendError, PeftdeclError
from peftdecl.kinds import kinds
from peftdecl.plan import LayerInfo
from peftdecl.quant.layouts import quantize, tensors_from_quantized
from peftdecl.quant.scheme import QuantScheme
from peftdecl_numpy.kinds import ops_for
from tests.conftest import rel_err
from tests.layer_cases import KINDS, LINEAR

PROMPT_KINDS = ("prefix_tuning", "prompt_tuning")
# the tape variants the engine and peftdecl_numpy.compose call, besides the Protocol methods
ADDITIVE_TAPE = ("delta_record", "delta_backward")
COMPOSING_TAPE = (
    "compose_output_record",
    "compose_output_backward",
    "compose_weight_record",
    "compose_weight_backward",
)
LAYER_KINDS = [name for name, decl in kinds().items() if "numpy" in decl.ops and name not in PROMPT_KINDS]


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_every_kind_implements_the_kind_ops_protocols(kind: str) -> None:
    ops = ops_for(kind)
    assert isinstance(ops, KindOps) and isinstance(ops, ExplicitGradientOps)
    if ops.additive:
        assert isinstance(ops, AdditiveOps)
        assert all(callable(getattr(ops, name, None)) for name in ADDITIVE_TAPE)
    else:
        assert isinstance(ops, ComposingOps)
        assert all(callable(getattr(ops, name, None)) for name in COMPOSING_TAPE)
        assert ops.input_order in ("active", "reversed")
    assert ops.additive == kinds()[kind].additive
    # the layer types come from the registry: the kind modules declare none of their own
    assert not hasattr(importlib.import_module(type(ops).__module__), "LAYER_TYPES")


def lora_with_dropout(seed: int = 0) -> tuple[peftdecl.AdaptedModel, np.ndarray]:
    rng = np.random.default_rng(1)
    spec = {**KINDS["lora"].spec, "lora_dropout": 0.5}
    model = peftdecl.attach(LINEAR.random_state(rng), spec, engine_options={"seed": seed})
    model.train()
    return model, LINEAR.random_input(rng)


def test_the_rng_state_round_trips_and_the_seed_comes_from_the_engine_options() -> None:
    model, x = lora_with_dropout()
    assert isinstance(model.engine, Engine)
    state = model.engine.get_rng_state()
    assert state and all(isinstance(v, np.ndarray) for v in state.values())
    first, second = model("m", x), model("m", x)
    assert rel_err(second, first) > 1e-3  # fresh dropout masks on the second call
    model.engine.set_rng_state(state)
    np.testing.assert_array_equal(model("m", x), first)
    np.testing.assert_array_equal(model("m", x), second)
    np.testing.assert_array_equal(lora_with_dropout(seed=0)[0]("m", x), first)
    assert rel_err(lora_with_dropout(seed=1)[0]("m", x), first) > 1e-3
    with pytest.raises(PeftdeclError, match="rng state lacks"):
        model.engine.set_rng_state({})


def test_update_spec_keeps_the_live_arrays() -> None:
    rng = np.random.default_rng(0)
    model = peftdecl.attach(LINEAR.random_state(rng), KINDS["adalora"].spec)
    x = LINEAR.random_input(rng)
    before, output = model.trainable_parameters(), model("m", x)
    model.update_spec(rank_pattern={"m.lora_E": [True, False, True]})
    after = model.trainable_parameters()
    assert before.keys() == after.keys() and all(after[k] is before[k] for k in before)
    assert rel_err(model("m", x), output) > 1e-6  # the second triplet no longer counts
    bigger = peftdecl.attach(LINEAR.random_state(rng), {**KINDS["adalora"].spec, "init_r": 4}).plan()
    with pytest.raises(PeftdeclError, match=r"m\.lora_A: the new plan needs shape"):
        model.engine.replace_plan("default", bigger)


# quantised layers in their libraries' layouts next to a float layer ``v``, written by the reference codecs
SCHEMES = {
    "mlx_affine": QuantScheme("affine", bits=4, group_size=32),
    "bnb_8bit": QuantScheme("int8"),
    "bnb_4bit": QuantScheme("nf4", double_quant=True),
}
MLX_FACT = {"bits": 4, "group_size": 32}


def quantised_state(quantization: str) -> dict[str, np.ndarray]:
    weight = np.random.default_rng(3).normal(size=(6, 64)).astype(np.float32)
    packed = tensors_from_quantized("q", quantize(weight, SCHEMES[quantization]))
    return {**packed, "v.weight": np.ones((6, 64), np.float32)}


@pytest.mark.parametrize("quantization", sorted(SCHEMES))
def test_a_quantised_layer_is_described_adapted_and_left_as_stored(quantization: str) -> None:
    state = quantised_state(quantization)
    facts = {"quantization": MLX_FACT} if quantization == "mlx_affine" else {}
    info = get_backend("numpy").inventory(state, **facts)
    assert info.layers["q"].quantization == quantization and info.layers["v"].quantization is None
    assert (info.layers["q"].in_features, info.layers["q"].out_features) == (64, 6)
    spec = {**KINDS["lora"].spec, "target_modules": ["q", "v"]}
    model = peftdecl.attach(state, spec, **facts)
    assert model("q", np.ones((2, 64))).shape == (2, 6)
    only_v = peftdecl.attach(state, {**spec, "target_modules": ["v"]}, **facts)
    unloaded = only_v.merge_and_unload()  # nothing merged into q: its stored tensors come back byte for byte
    for key, value in state.items():
        if key.startswith("q."):
            assert unloaded[key].dtype == value.dtype and np.array_equal(unloaded[key], value), key


def test_an_mlx_quantised_layer_without_its_bits_is_refused_naming_the_weight() -> None:
    with pytest.raises(
        PeftdeclError, match=r"q\.weight: an MLX affine-quantised weight; pass the model fact"
    ):
        get_backend("numpy").inventory(quantised_state("mlx_affine"))


@pytest.mark.parametrize("missing", ["q.weight.absmax", "q.weight.quant_map", "q.weight.nested_absmax"])
def test_a_4bit_weight_missing_its_state_is_refused_naming_the_key(missing: str) -> None:
    state = quantised_state("bnb_4bit")
    del state[missing]
    with pytest.raises(PeftdeclError, match=re.escape(missing)):
        peftdecl.attach(state, {**KINDS["lora"].spec, "target_modules": ["v"]})


def test_a_layer_of_unknown_quantisation_is_refused_at_attach_by_name() -> None:
    state = {"q.weight": np.ones((6, 8), np.float32), "v.weight": np.ones((6, 8), np.float32)}
    declared = {"q": LayerInfo("linear", 8, 6, False, quantization="unknown")}
    spec = {**KINDS["lora"].spec, "target_modules": ["q", "v"]}
    with pytest.raises(BackendError, match=r"^q: the base layer is quantised \(unknown\)"):
        peftdecl.attach(state, spec, layer_types=declared)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_inventory_reports_the_stored_dtype(dtype: str) -> None:
    state = {"m.weight": np.ones((3, 4), dtype)}
    assert get_backend("numpy").inventory(state).layers["m"].dtype == dtype


def test_the_engine_computes_in_the_dtype_it_is_given() -> None:
    rng = np.random.default_rng(0)
    state, x = LINEAR.random_state(rng), LINEAR.random_input(rng)
    reference = peftdecl.attach(state, KINDS["lora"].spec)
    single = peftdecl.attach(state, KINDS["lora"].spec, dtype="float32")
    assert single.base_weight("m").dtype == np.float32 and reference.base_weight("m").dtype == np.float64
    y = single("m", x)
    assert y.dtype == np.float32 and rel_err(y, reference("m", x)) <= 1e-6
    assert all(v.dtype == np.float32 for v in single.trainable_parameters().values())

"""Several active adapters on one layer in the NumPy reference, as HF PEFT combines them (verified against PEFT
through the torch backend in test_torch_multi_active.py):

- LoRA and DoRA fold over the active adapters: r ← r + s·B A x, or for DoRA r ← b + g ⊙ (r − b) + g ⊙ s·B A x;
- IA3 multiplies the vectors (input side for feed-forward layers, output side otherwise);
- OFT rotates the input by each adapter in active order (x R₁ R₂), an embedding's output likewise;
- BOFT multiplies the butterflies the other way round (x M₂ M₁) and the scales;
- merging folds each adapter into the weight in turn: the composed forward for all but OFT, whose merge (W R₁ᵀ R₂ᵀ)
  is the forward of the reversed order.

Expected values come from dense formulas written here (norms, rotations as dense matrices) or from each adapter
run alone; gradients from central differences (tests/gradcheck.py). Tolerances (float64, relative): 1e-12 for
forward and merged weights, 1e-10 where a Neumann rotation is inverted (unmerge) or rebuilt from blocks, 1e-6
for IA3's unmerge (a division by l + 1e-8, as in HF PEFT).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import peftdecl
from peftdecl.plan.kinds.dora import dora_weight_norm
from peftdecl_numpy.kinds.boft import butterfly_matrix
from peftdecl_numpy.kinds.dora import OPS as DORA
from peftdecl_numpy.kinds.oft import OPS as OFT
from tests.conftest import rel_err
from tests.gradcheck import check_gradients
from tests.layer_cases import KINDS, LINEAR_8_IN, build

TOL = 1e-12
ROTATION_TOL = 1e-10
IA3_UNMERGE_TOL = 1e-6

# a spec field that leaves each kind's default initialisation (a no-op adapter) in place
NO_OP_INIT = {
    "lora": {"init_lora_weights": True},
    "dora": {"init_lora_weights": True},
    "adalora": {"init_lora_weights": True},
    "vera": {"init_weights": True},
    "loha": {"init_weights": True},
    "lokr": {"init_weights": True},
    "ia3": {"init_ia3_weights": True},
    "oft": {"init_weights": True},
    "boft": {"init_weights": True},
}
IA3_FF = {"feedforward_modules": ["m"]}
IA3_OUT = {"feedforward_modules": []}


def kind_cases() -> list:
    params = []
    for kind in NO_OP_INIT:
        for layer in sorted(KINDS[kind].layers):
            for ff in (False, True) if kind == "ia3" else (False,):
                case_id = f"{kind}-{layer}" + ("-ff" if ff else "")
                fields = (IA3_FF if ff else IA3_OUT) if kind == "ia3" else {}
                params.append(pytest.param(kind, layer, fields, id=case_id))
    return params


@pytest.mark.parametrize(("kind", "layer", "fields"), kind_cases())
@pytest.mark.parametrize("order", [("default", "noop"), ("noop", "default")], ids=["first", "second"])
def test_a_no_op_second_adapter_changes_nothing_and_gradients_hold(kind, layer, fields, order) -> None:
    # the composed path (each kind's composition hooks) against the kind's own single-adapter forward/backward
    model, x = build(kind, layer, **fields)
    entry = KINDS[kind]
    model.add_adapter(
        "noop", {**entry.spec, **(entry.layer_fields or {}).get(layer, {}), **fields, **NO_OP_INIT[kind]}
    )
    model.train()
    alone, tape = model.engine.layer_forward("m", x)
    weights = np.random.default_rng(3).normal(size=alone.shape)
    grads_alone = model.engine.layer_backward("m", tape, weights)
    model.set_adapter(list(order))
    both, tape = model.engine.layer_forward("m", x)
    assert rel_err(both, alone) <= TOL
    grads_both = model.engine.layer_backward("m", tape, weights)
    for key, value in grads_alone.items():
        got = grads_both[key if key == "input" else f"default/{key}"]
        assert (got is None) == (value is None), key
        if value is not None:
            assert rel_err(got, value) <= 1e-10, key
    with frozen_norms(model):
        check_gradients(model, "m", x, seed=4)


@contextlib.contextmanager
def frozen_norms(model: peftdecl.AdaptedModel) -> Iterator[None]:
    """Hold every DoRA adapter's n = ‖W + s·B A‖ at its current value (DoRA detaches it, so its gradient is the
    one of this function); the other kinds are untouched."""
    frozen = {}
    for name in model.adapters:
        for lp in model.plan(name).layers:
            if lp.kind == "dora":
                params = {k.removeprefix(lp.module + "."): v for k, v in model.state_dict(name).items()}
                frozen[id(lp)] = dora_weight_norm(lp, model.base_weight(lp.module), params)
    DORA.weight_norm = lambda lp, base, p: frozen[id(lp)]  # an instance attribute shadows the method
    try:
        yield
    finally:
        del DORA.weight_norm


# -- PEFT's formulas on a linear layer (W 5×8 with bias) -----------------------------------------------------
LORA = {"peft_type": "LORA", "target_modules": ["m"], "init_lora_weights": False}
SPECS: dict[str, dict[str, Any]] = {
    "lora": {**LORA, "r": 2, "lora_alpha": 4},
    "dora": {**LORA, "r": 3, "lora_alpha": 3, "use_dora": True},
    "dora2": {**LORA, "r": 2, "lora_alpha": 5, "use_dora": True},
    "ia3": {"peft_type": "IA3", "target_modules": ["m"], "init_ia3_weights": False, **IA3_OUT},
    "ia3_ff": {"peft_type": "IA3", "target_modules": ["m"], "init_ia3_weights": False, **IA3_FF},
    "oft": {"peft_type": "OFT", "target_modules": ["m"], "init_weights": False, "oft_block_size": 4},
    "oft2": {
        "peft_type": "OFT",
        "target_modules": ["m"],
        "init_weights": False,
        "oft_block_size": 2,
        "use_cayley_neumann": False,
    },
    "boft": {"peft_type": "BOFT", "target_modules": ["m"], "init_weights": False, "boft_block_size": 2},
    "boft2": {
        "peft_type": "BOFT",
        "target_modules": ["m"],
        "init_weights": False,
        "boft_block_size": 2,
        "boft_n_butterfly_factor": 2,
    },
}


def dense_output(model: peftdecl.AdaptedModel, names: list[str], x: np.ndarray) -> np.ndarray:
    """HF PEFT's composition written out with dense matrices: input-side transforms, the base, then the output
    side in active order (a layer of PEFT holds one tuner; the cross-kind order is peftdecl's rule)."""
    w, b = model.base_weight("m"), BIAS
    transform, out_scale = np.eye(w.shape[1]), np.ones(w.shape[0])
    for name in names:
        lp, p = model.plan(name).layer("m"), layer_params_of(model, name)
        if lp.kind == "oft":
            transform = transform @ block_diag(OFT.rotation(lp, p))
        elif lp.kind == "boft":
            transform = butterfly_matrix(lp, p) @ transform
            out_scale = out_scale * p["boft_s"].reshape(-1)
        elif lp.kind == "ia3" and lp.options["feedforward"]:
            transform = transform * p["ia3_l"].reshape(-1)[None, :]  # diag(l) from the right: x ⊙ l
    r = ((x @ transform) @ w.T) * out_scale + b
    for name in names:
        lp, p = model.plan(name).layer("m"), layer_params_of(model, name)
        if lp.kind in ("lora", "dora"):
            a, bb, s = p["lora_A.weight"], p["lora_B.weight"], lp.scaling
            v = s * (x @ a.T @ bb.T)
            if lp.kind == "dora":
                g = p["lora_magnitude_vector"] / np.linalg.norm(w + s * bb @ a, axis=1)
                r = b + g * (r - b) + g * v
            else:
                r = r + v
        elif lp.kind == "ia3" and not lp.options["feedforward"]:
            r = r * p["ia3_l"].reshape(-1)
    return r


def block_diag(blocks: np.ndarray) -> np.ndarray:
    n, b, _ = blocks.shape
    out = np.zeros((n * b, n * b))
    for i, block in enumerate(blocks):
        out[i * b : (i + 1) * b, i * b : (i + 1) * b] = block
    return out


def layer_params_of(model: peftdecl.AdaptedModel, name: str) -> dict[str, np.ndarray]:
    return {k.removeprefix("m."): v for k, v in model.state_dict(name).items()}


COMBOS = {
    "dora+dora": ["dora", "dora2"],
    "lora+dora": ["lora", "dora"],
    "dora+lora": ["dora", "lora"],
    "ia3+ia3": ["ia3", "ia3"],
    "ia3_ff+ia3_ff": ["ia3_ff", "ia3_ff"],
    "ia3_ff+ia3": ["ia3_ff", "ia3"],
    "oft+oft": ["oft", "oft2"],
    "boft+boft": ["boft", "boft2"],
    "oft+lora+ia3+dora": ["oft", "lora", "ia3", "dora"],
}


BIAS = LINEAR_8_IN.random_state(np.random.default_rng(0))["m.bias"]


def combo_model(combo: str) -> tuple[peftdecl.AdaptedModel, list[str], np.ndarray]:
    """The adapters of ``combo`` (keys of SPECS) on a 5×8 linear layer (bias BIAS), all active in that order, with
    DoRA magnitudes moved off their initial ‖W + sBA‖; and an input."""
    kinds = COMBOS[combo]
    names = [f"{k}_{i}" for i, k in enumerate(kinds)]
    rng = np.random.default_rng(0)
    state = LINEAR_8_IN.random_state(rng)
    model = peftdecl.attach(state, SPECS[kinds[0]], name=names[0], seed=1)
    for i, (name, kind) in enumerate(zip(names[1:], kinds[1:], strict=True)):
        model.add_adapter(name, SPECS[kind], seed=2 + i)
    for name in names:
        magnitude = model.engine.trainable_parameters((name,)).get("m.lora_magnitude_vector")
        if magnitude is not None:
            magnitude *= rng.uniform(0.5, 1.5, size=magnitude.shape)
    model.set_adapter(names)
    return model, names, rng.normal(size=(3, 8))


@pytest.mark.parametrize("combo", sorted(COMBOS))
def test_forward_is_peft_composition_and_gradients_hold(combo: str) -> None:
    model, names, x = combo_model(combo)
    assert rel_err(model("m", x), dense_output(model, names, x)) <= TOL
    model.train()
    with frozen_norms(model):
        checked = check_gradients(model, "m", x, seed=1)
    assert {key.partition("/")[0] for key in checked} == {*names, "input"}


def test_order_matters_for_rotations_and_rescaling() -> None:
    # rotations do not commute, and DoRA rescales only what came before it
    for combo in ("oft+oft", "boft+boft", "lora+dora"):
        model, names, x = combo_model(combo)
        forward = model("m", x)
        model.set_adapter(names[::-1])
        assert rel_err(model("m", x), forward) > 1e-3, combo
        assert rel_err(model("m", x), dense_output(model, names[::-1], x)) <= TOL


@pytest.mark.parametrize("combo", sorted(COMBOS))
def test_merge_folds_each_adapter_in_turn(combo: str) -> None:
    model, names, x = combo_model(combo)
    before = model.base_weight("m")
    composed = model("m", x)
    reversed_order = dense_output(model, names[::-1], x)
    model.merge()
    merged = model("m", x)
    if combo == "oft+oft":
        # W R₁ᵀ R₂ᵀ: the forward of the reversed order, not the composed one (as in HF PEFT)
        assert rel_err(merged, reversed_order) <= ROTATION_TOL
        assert rel_err(merged, composed) > 1e-3
    elif "oft" not in combo:
        assert rel_err(merged, composed) <= TOL
    model.unmerge()
    # IA3 unmerges by dividing by l + 1e-8, as HF PEFT does: inexact by about 1e-8 / |l|
    unmerge_tol = IA3_UNMERGE_TOL if "ia3" in combo else ROTATION_TOL
    assert rel_err(model.base_weight("m"), before) <= unmerge_tol
    assert rel_err(model("m", x), composed) <= unmerge_tol


def test_dora_merge_takes_each_norm_on_the_unmerged_weight() -> None:
    model, names, _ = combo_model("dora+dora")
    w = model.base_weight("m")
    expected = w
    for name in names:
        lp, p = model.plan(name).layer("m"), layer_params_of(model, name)
        delta = lp.scaling * p["lora_B.weight"] @ p["lora_A.weight"]
        g = p["lora_magnitude_vector"] / np.linalg.norm(w + delta, axis=1)  # ‖W + ΔW‖ of the original W
        expected = g[:, None] * (expected + delta)
    model.merge()
    assert rel_err(model.base_weight("m"), expected) <= TOL


@pytest.mark.parametrize("layer", ["linear", "conv2d", "embedding"])
def test_dora_with_dropout_in_training_and_other_layer_types(layer: str) -> None:
    # with dropout in training each DoRA adapter adds (g − 1) ⊙ W h + g ⊙ s·B A h to the running output
    spec = KINDS["dora"].spec
    fields = {} if layer == "embedding" else {"lora_dropout": 0.3}
    model, x = build("dora", layer, **fields)
    model.add_adapter("b", {**spec, "r": 2, **fields}, seed=7)
    params = model.engine.trainable_parameters(("b",))
    params["m.lora_magnitude_vector"] *= 1.3
    model.set_adapter(["default", "b"])
    model.train()
    with frozen_norms(model):
        checked = check_gradients(model, "m", x, seed=2)
    assert len(checked) == 6 + (layer != "embedding")  # A, B and m of each adapter (and the input)


def test_mixed_batches_still_refuse_non_additive_kinds() -> None:
    model, names, x = combo_model("lora+dora")
    with pytest.raises(peftdecl.PeftdeclError, match="additive kinds only"):
        model("m", x, adapter_names=[names[0], names[1], "__base__"])

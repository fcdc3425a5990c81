"""LoRA on raw parameters (``target_parameters``) on the NumPy reference engine, against HF PEFT 0.21.

The models are the tiny MoE models of ``tests/moe_models.py``, handed to the NumPy backend as their state dicts
(``peftdecl_torch.inventory.numpy_model``). Expected values come from real PEFT (merged state dicts, saved folders,
trainable counts, gradients of A and B) and from plain torch autograd on the unadapted module run with the
parameter the engine hands out (dL/dW').
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import peftdecl
from peftdecl.errors import PeftdeclError
from tests.conftest import rel_err, selected_backends

if "numpy" not in selected_backends():
    pytest.skip("the NumPy backend is not selected here", allow_module_level=True)

# torch and peft give the expected values (moe_models skips the module without them)
from tests.moe_models import CASES, EXPERTS, make_input, make_model, peft, peft_model, torch  # noqa: I001
from peftdecl_torch.inventory import numpy_model

pytestmark = pytest.mark.peft

MERGE_TOL = 1e-6  # our float64 W + ΔW against PEFT's float32 merge_and_unload, relative per tensor
OUTPUT_TOL = 1e-5  # float32 forward of the same weights, relative over the whole output
FLOAT64_TOL = 1e-10  # float64 gradients: only summation order differs


def numpy_state(model: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(state dict as float64, keyword arguments of attach / load_adapter) for the NumPy backend."""
    state, layer_types, facts = numpy_model(model)
    return state, {"layer_types": layer_types, **facts}


def torch_state(model: Any) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy() for k, v in model.state_dict().items()}


def assert_state_close(found: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert set(found) == set(expected)
    worst = {k: rel_err(found[k], expected[k]) for k in expected}
    assert max(worst.values()) <= MERGE_TOL, {k: v for k, v in worst.items() if v > MERGE_TOL}


def run_with(model: Any, parameters: dict[str, np.ndarray], inputs: dict[str, Any]) -> Any:
    """The torch model's output with some of its parameters replaced (float32, as the model)."""
    swapped = {k: torch.tensor(v, dtype=torch.float32) for k, v in parameters.items()}
    with torch.no_grad():
        found = torch.func.functional_call(model, swapped, (), inputs)
    return getattr(found, "logits", found).double().numpy()


@pytest.mark.parametrize("name", list(CASES))
def test_peft_folder_merges_into_peft_merged_state_dict(name: str, tmp_path: Path) -> None:
    base, theirs = peft_model(name)
    theirs.save_pretrained(tmp_path)
    state, options = numpy_state(base)
    ours = peftdecl.load_adapter(state, tmp_path, backend="numpy", **options)
    expected = torch_state(theirs.merge_and_unload())
    merged = ours.merge_and_unload()
    changed = [k for k in expected if rel_err(expected[k], state[k]) > 1e-3]
    assert changed  # the adapters move the merged parameters: the comparison below proves something
    assert_state_close(merged, expected)


@pytest.mark.parametrize("name", ["2d", "experts_nested", "transposed", "with_modules", "gpt_oss"])
def test_our_folder_has_peft_keys_and_peft_merges_it_as_we_do(name: str, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    base, theirs = peft_model(name)
    theirs.save_pretrained(tmp_path / "peft")
    state, options = numpy_state(base)
    spec = {"peft_type": "LORA", "init_lora_weights": False, **CASES[name][1]}
    ours = peftdecl.attach(state, spec, backend="numpy", seed=5, **options)
    ours.save_pretrained(tmp_path / "ours")
    shapes = {
        folder: {k: v.shape for k, v in load_file(tmp_path / folder / "adapter_model.safetensors").items()}
        for folder in ("peft", "ours")
    }
    assert shapes["ours"] == shapes["peft"]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert_state_close(ours.merge_and_unload(), torch_state(loaded.merge_and_unload()))


@pytest.mark.parametrize("name", ["2d", "experts_nested", "transposed", "qwen3_moe"])
def test_effective_parameters_run_the_module_with_peft_outputs(name: str, tmp_path: Path) -> None:
    base, theirs = peft_model(name)
    theirs.save_pretrained(tmp_path)
    state, options = numpy_state(base)
    ours = peftdecl.load_adapter(state, tmp_path, backend="numpy", **options)
    swapped = {
        lp.layer.parameter: ours.engine.effective_parameter(lp.layer.parameter) for lp in ours.plan().layers
    }
    inputs = make_input(CASES[name][0])
    with torch.no_grad():
        expected = getattr(theirs(**inputs), "logits", None)
        expected = (theirs(**inputs) if expected is None else expected).double().numpy()
    assert (
        rel_err(run_with(base, swapped, inputs), expected) <= OUTPUT_TOL
    )  # the torch module run with W + ΔW


def test_a_layer_forward_on_a_parameter_is_refused_with_the_way_out() -> None:
    state, options = numpy_state(make_model("moe"))
    spec = {"peft_type": "LORA", "target_parameters": ["head.weight", *EXPERTS], "init_lora_weights": False}
    ours = peftdecl.attach(state, spec, backend="numpy", **options)
    x = np.ones((2, 6))
    for module in ("head", "experts", "experts.base_layer"):
        with pytest.raises(PeftdeclError, match=re.escape("merge the adapter")) as found:
            ours(module, x)
        assert "torch backend" in str(found.value) and "target_parameters" in str(found.value)
    assert ours("proj", x).shape == (2, 6)  # an unadapted layer still runs


def test_merge_unmerge_unload_two_adapters_and_counts(tmp_path: Path) -> None:
    base, theirs = peft_model("experts_nested")
    other_spec = peft.LoraConfig(target_modules=[], target_parameters=EXPERTS, r=3, init_lora_weights=False)
    theirs.add_adapter("other", other_spec)
    theirs.save_pretrained(tmp_path)
    state, options = numpy_state(base)
    ours = peftdecl.load_adapter(state, tmp_path, backend="numpy", is_trainable=True, **options)
    ours.load_adapter(tmp_path, "other", is_trainable=True)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ours.merge_adapter()
    ours.unmerge_adapter()
    assert all(np.array_equal(v, state[k]) for k, v in ours.unload().items())  # the loaded values, exactly
    theirs.base_model.set_adapter(["default", "other"])
    expected = torch_state(theirs.merge_and_unload())  # W + ΔW_default + ΔW_other
    ours.set_adapter(["default", "other"])
    assert_state_close(ours.merge_and_unload(safe_merge=True), expected)


def test_adapters_must_adapt_a_module_one_way() -> None:
    state, options = numpy_state(make_model("moe"))
    spec = {"peft_type": "LORA", "target_modules": [], "target_parameters": EXPERTS}
    ours = peftdecl.attach(state, spec, backend="numpy", **options)
    with pytest.raises(PeftdeclError, match="same parameters"):
        ours.add_adapter("gate_only", {**spec, "target_parameters": ["experts.gate_up_proj"]})
    ours.add_adapter("head_param", {**spec, "target_parameters": ["head.weight"]})
    with pytest.raises(PeftdeclError, match="adapted one way only"):
        ours.add_adapter("head_layer", {"peft_type": "LORA", "target_modules": ["head"]})
    assert set(ours.adapters) == {"default", "head_param"}


def test_parameter_declarations_are_checked() -> None:
    state = {"experts.w": np.ones((2, 3, 4)), "proj.weight": np.ones((3, 3))}
    spec = {"peft_type": "LORA", "target_parameters": ["experts.w"], "r": 1, "init_lora_weights": False}
    declared = {"experts.w": {"type": "parameter", "transposed": True}}
    ours = peftdecl.attach(state, spec, backend="numpy", layer_types=declared)
    assert ours.plan().layers[0].layer.transposed and ours.plan().layers[0].layer.in_features == 3
    with pytest.raises(PeftdeclError, match=re.escape("takes only 'transposed'")):
        peftdecl.attach(
            state, spec, backend="numpy", layer_types={"experts.w": {"type": "parameter", "x": 1}}
        )
    with pytest.raises(PeftdeclError, match=re.escape("['nope.w']")):
        peftdecl.attach(state, spec, backend="numpy", layer_types={"nope.w": "parameter"})


@pytest.mark.parametrize("name", ["experts_nested", "transposed", "with_modules"])
def test_gradients_from_dl_dw_match_peft_autograd(name: str, tmp_path: Path) -> None:
    model_name, kwargs = CASES[name]
    base = make_model(model_name).double()
    state, options = numpy_state(base)
    spec = {"peft_type": "LORA", "init_lora_weights": False, **kwargs}
    ours = peftdecl.attach(state, spec, backend="numpy", seed=9, **options)
    ours.save(tmp_path, dtype=np.float64)
    inputs = {k: v.double() for k, v in make_input(model_name).items()}
    cotangent = torch.randn((3, 4, 5), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    # dL/dW' by plain autograd on the unadapted module run with W' (proj, a target_modules Linear: merged weight)
    plan, arrays = ours.plan(), ours.state_dict()
    swapped = {}
    for lp in plan.layers:
        if lp.layer.type == "parameter":
            value = ours.engine.effective_parameter(lp.layer.parameter)
            swapped[lp.layer.parameter] = torch.tensor(value, requires_grad=True)
        else:
            a, b = arrays[lp.key("lora_A.weight")], arrays[lp.key("lora_B.weight")]
            swapped[f"{lp.module}.weight"] = torch.tensor(state[f"{lp.module}.weight"] + lp.scaling * b @ a)
    (torch.func.functional_call(base, swapped, (), inputs) * cotangent).sum().backward()
    grads: dict[str, np.ndarray] = {}
    for lp in plan.layers:
        if lp.layer.type == "parameter":
            d_weight = swapped[lp.layer.parameter].grad.numpy()
            grads.update(ours.engine.parameter_backward(lp.layer.parameter, d_weight))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True).train()
    (theirs(**inputs) * cotangent).sum().backward()
    peft_grads = {
        n.removeprefix("base_model.model.").replace(".default", ""): p.grad.numpy()
        for n, p in theirs.named_parameters()
        if p.requires_grad and "lora_" in n and not n.startswith("base_model.model.proj.")
    }
    assert set(grads) == set(peft_grads)
    assert set(grads) <= set(ours.trainable_parameters())
    for key, grad in peft_grads.items():
        assert rel_err(grads[key], grad) <= FLOAT64_TOL

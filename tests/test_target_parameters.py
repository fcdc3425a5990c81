"""LoRA on raw parameters (``target_parameters``) against HF PEFT 0.21's ParamWrapper.

The tiny models are those of ``tests/moe_models.py`` (the NumPy engine's tests use them too). Expected values
come from real PEFT (outputs, merged parameters, ΔW, gradients), from the float64 NumPy reference
(``peftdecl_numpy.kinds.lora_param``) and from plain torch autograd on the unadapted module.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import peftdecl  # noqa: E402
from peftdecl.errors import PeftdeclError, SpecError, TargetError  # noqa: E402
from peftdecl_numpy.kinds import lora_param as reference  # noqa: E402
from peftdecl_torch.layer import AdaptedLayer  # noqa: E402
from tests.conftest import rel_err, selected_backends  # noqa: E402
from tests.moe_models import (  # noqa: E402
    CASES,
    EXPERTS,
    UsesParameter,
    make_input,
    make_model,
    output,
    peft_model,
)

nn = torch.nn
pytestmark = pytest.mark.peft

if "torch" not in selected_backends():
    pytest.skip("these tests run the torch backend, not selected here", allow_module_level=True)

OUTPUT_TOL = 1e-5  # float32 forward of the same weights, relative over the whole output
REFERENCE_TOL = 1e-6  # PEFT's float32 ΔW / merged parameter against the float64 reference
FLOAT64_TOL = 1e-10  # float64 gradients: only summation order differs


def file_keys(folder: Path) -> dict[str, tuple[int, ...]]:
    from safetensors.numpy import load_file

    return {k: tuple(v.shape) for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}


@pytest.mark.parametrize("name", list(CASES))
def test_peft_folder_loads_with_peft_outputs_and_merge(name: str, tmp_path: Path) -> None:
    base, theirs = peft_model(name)
    inputs = make_input(CASES[name][0])
    expected = output(theirs, inputs)
    assert rel_err(expected, output(base, inputs)) > 1e-3  # the adapter changes the output
    theirs.save_pretrained(tmp_path)
    ours = peftdecl.load_adapter(copy.deepcopy(base), tmp_path, backend="torch")
    assert rel_err(output(ours, inputs), expected) <= OUTPUT_TOL
    merged_ours = ours.merge_and_unload()
    merged_theirs = theirs.merge_and_unload()
    assert rel_err(output(merged_ours, inputs), output(merged_theirs, inputs)) <= OUTPUT_TOL
    assert set(merged_ours.state_dict()) == set(base.state_dict())  # no wrapper left behind


@pytest.mark.parametrize("name", ["2d", "experts_nested", "transposed", "with_modules"])
def test_our_folder_has_peft_keys_and_loads_in_peft(name: str, tmp_path: Path) -> None:
    base, theirs = peft_model(name)
    theirs.save_pretrained(tmp_path / "peft")
    model_name, kwargs = CASES[name]
    spec = {"peft_type": "LORA", "init_lora_weights": False, **kwargs}
    ours = peftdecl.attach(copy.deepcopy(base), spec, backend="torch", seed=5)
    ours.save_pretrained(tmp_path / "ours")
    assert file_keys(tmp_path / "ours") == file_keys(tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    inputs = make_input(model_name)
    assert rel_err(output(loaded, inputs), output(ours.eval(), inputs)) <= OUTPUT_TOL


def _peft_wrappers(model: Any) -> dict[str, Any]:
    """PEFT's ParamWrappers by the key prefix PEFT saves their tensors under."""
    from peft.tuners.lora.layer import ParamWrapper

    found = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, ParamWrapper):
            found[name] = module
    return found


@pytest.mark.parametrize("name", ["2d", "experts_nested", "transposed"])
def test_reference_delta_and_merge_match_peft(name: str, tmp_path: Path) -> None:
    base, theirs = peft_model(name)
    theirs.save_pretrained(tmp_path)
    plan = peftdecl.load_adapter(copy.deepcopy(base), tmp_path, backend="torch").plan()
    wrappers = _peft_wrappers(theirs)
    assert sorted(wrappers) == sorted(lp.module for lp in plan.layers)
    params = {n: p.detach().double().numpy() for n, p in base.named_parameters()}
    merged_params = dict(theirs.merge_and_unload().named_parameters())
    for lp in plan.layers:
        wrapper = wrappers[lp.module]
        p = {
            "lora_A.weight": wrapper.lora_A["default"].weight.detach().double().numpy(),
            "lora_B.weight": wrapper.lora_B["default"].weight.detach().double().numpy(),
        }
        delta = reference.delta_weight(lp, p)
        assert rel_err(delta, wrapper.get_delta_weight("default").detach().double().numpy()) <= REFERENCE_TOL
        merged = reference.merged(lp, params[lp.layer.parameter], p)
        peft_merged = merged_params[lp.layer.parameter].detach().double().numpy()
        assert rel_err(merged, peft_merged) <= REFERENCE_TOL
        assert rel_err(reference.unmerged(lp, merged, p), params[lp.layer.parameter]) <= FLOAT64_TOL


def _losses(model: Any, inputs: dict[str, Any], cotangent: Any) -> Any:
    return (model(**inputs) * cotangent).sum()


@pytest.mark.parametrize("name", ["experts_nested", "transposed", "with_modules"])
def test_gradients_match_autograd_reference_and_peft(name: str, tmp_path: Path) -> None:
    model_name, kwargs = CASES[name]
    base = make_model(model_name).double()
    spec = {"peft_type": "LORA", "init_lora_weights": False, **kwargs}
    ours = peftdecl.attach(copy.deepcopy(base), spec, backend="torch", seed=9)
    ours.train()
    inputs = {k: v.double() for k, v in make_input(model_name).items()}
    cotangent = torch.randn(
        output(base, inputs).shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64
    )
    params = ours.trainable_parameters()
    _losses(ours, inputs, cotangent).backward()
    ours_grads = {k: v.grad.numpy() for k, v in params.items()}
    plan = ours.plan()
    arrays = ours.state_dict()
    # the reference: dL/dW' by plain autograd on the unadapted model run with W' = W + ΔW, then A and B's chain rule
    swapped, weights = {}, {n: p.detach().numpy() for n, p in base.named_parameters()}
    for lp in plan.layers:
        p = {k: arrays[lp.key(k)] for k in ("lora_A.weight", "lora_B.weight")}
        if lp.layer.type == "parameter":
            w = weights[lp.layer.parameter]
            swapped[lp.layer.parameter] = torch.tensor(reference.merged(lp, w, p), requires_grad=True)
        else:  # a target_modules Linear: without dropout its LoRA is its merged weight
            merged = weights[f"{lp.module}.weight"] + lp.scaling * p["lora_B.weight"] @ p["lora_A.weight"]
            swapped[f"{lp.module}.weight"] = torch.tensor(merged)
    plain = copy.deepcopy(base)
    loss = (torch.func.functional_call(plain, swapped, (), inputs) * cotangent).sum()
    loss.backward()
    for lp in plan.layers:
        if lp.layer.type != "parameter":
            continue
        p = {k: arrays[lp.key(k)] for k in ("lora_A.weight", "lora_B.weight")}
        expected = reference.factor_grads(lp, p, swapped[lp.layer.parameter].grad.numpy())
        for k, grad in expected.items():
            assert rel_err(ours_grads[lp.key(k)], grad) <= FLOAT64_TOL
    # and PEFT's autograd on the same tensors (our folder, loaded trainable)
    ours.save(tmp_path, dtype=np.float64)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    theirs.train()
    _losses(theirs, inputs, cotangent).backward()
    peft_grads = {
        n.removeprefix("base_model.model.").replace(".default", ""): p.grad.numpy()
        for n, p in theirs.named_parameters()
        if p.requires_grad
    }
    assert set(peft_grads) == set(ours_grads)
    for key, grad in peft_grads.items():
        assert rel_err(ours_grads[key], grad) <= FLOAT64_TOL


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"lora_dropout": 0.1}, "$.lora_dropout"),
        ({"fan_in_fan_out": True}, "$.fan_in_fan_out"),
        ({"lora_bias": True}, "$.lora_bias"),
        ({"use_dora": True}, "$.use_dora"),
        ({"init_lora_weights": "pissa"}, "$.init_lora_weights"),
        ({"use_qalora": True}, "$.use_qalora"),
        ({"alora_invocation_tokens": [1, 2]}, "$.alora_invocation_tokens"),
    ],
)
def test_options_peft_refuses_on_parameters_are_refused_up_front(change: dict[str, Any], path: str) -> None:
    with pytest.raises(SpecError, match=re.escape(path)):
        peftdecl.load_spec({"peft_type": "LORA", "target_parameters": ["head.weight"], **change})
    peftdecl.load_spec({"peft_type": "LORA", "target_modules": ["proj"], **change})  # fine without parameters


def test_adalora_keeps_refusing_target_parameters() -> None:
    spec = {"peft_type": "ADALORA", "total_step": 10, "target_parameters": ["head.weight"]}
    with pytest.raises(SpecError, match=re.escape("$.target_parameters")):
        peftdecl.load_spec(spec)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"target_parameters": ["nope.weight"]}, "matched no parameter"),
        (
            {"target_modules": ["head"], "target_parameters": ["head.weight"]},
            "a module is adapted either way",
        ),
        ({"target_parameters": ["head.bias"]}, "only 2-D and 3-D parameters"),
    ],
)
def test_targeting_errors(spec: dict[str, Any], message: str) -> None:
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(3, 2)

        def forward(self, x: Any) -> Any:
            return self.head(x)

    with pytest.raises(TargetError, match=message):
        peftdecl.attach(Holder(), {"peft_type": "LORA", **spec}, backend="torch")


def test_top_level_parameter_is_refused_as_in_peft() -> None:
    with pytest.raises(TargetError, match="top-level module"):
        peftdecl.attach(
            UsesParameter(3, 2), {"peft_type": "LORA", "target_parameters": ["weight"]}, backend="torch"
        )


def test_two_adapters_add_up_and_must_target_the_same_parameters() -> None:
    base = make_model("moe")
    spec = {"peft_type": "LORA", "init_lora_weights": False, "target_parameters": EXPERTS, "r": 2}
    ours = peftdecl.attach(copy.deepcopy(base), spec, backend="torch", seed=1)
    ours.add_adapter("other", {**spec, "lora_alpha": 3}, seed=2)
    ours.set_adapter(["default", "other"])
    inputs = make_input("moe")
    swapped = {}
    for name in ("default", "other"):
        arrays = ours.state_dict(name)
        for lp in ours.plan(name).layers:
            p = {k: arrays[lp.key(k)] for k in ("lora_A.weight", "lora_B.weight")}
            before = swapped.get(
                lp.layer.parameter, dict(base.named_parameters())[lp.layer.parameter].detach()
            )
            swapped[lp.layer.parameter] = before + torch.tensor(
                reference.delta_weight(lp, p), dtype=torch.float32
            )
    with torch.no_grad():
        expected = torch.func.functional_call(base, swapped, (), inputs).double().numpy()
    assert rel_err(output(ours, inputs), expected) <= OUTPUT_TOL  # W + ΔW_default + ΔW_other
    with pytest.raises(PeftdeclError, match="same parameters"):
        ours.add_adapter("third", {**spec, "target_parameters": ["experts.gate_up_proj"]})
    assert ours.adapters.keys() == {"default", "other"}
    assert rel_err(output(ours, inputs), expected) <= OUTPUT_TOL  # the refused adapter left nothing behind
    with pytest.raises(PeftdeclError, match="mixed batch"):
        ours(**inputs, adapter_names=["default", "other", "default"])


def test_merge_unmerge_disable_and_trainable_count_follow_peft(tmp_path: Path) -> None:
    base, theirs = peft_model("experts_nested")
    theirs.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    ours = peftdecl.load_adapter(model, tmp_path, backend="torch", is_trainable=True)
    inputs = make_input("moe")
    adapted = output(ours, inputs)
    ours.merge_adapter()
    assert rel_err(output(ours, inputs), adapted) <= OUTPUT_TOL  # merged: the same function
    ours.unmerge_adapter()
    assert rel_err(output(ours, inputs), adapted) <= OUTPUT_TOL
    with ours.disable_adapter():
        assert rel_err(output(ours, inputs), output(base, inputs)) <= OUTPUT_TOL
    theirs_trainable = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert ours.get_nb_trainable_parameters() == (
        theirs_trainable,
        sum(p.numel() for p in theirs.parameters()),
    )
    assert ours.unload() is model
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())  # both nested wrappers are gone
    # the base back, up to the float32 rounding of W + ΔW − ΔW from the merge and unmerge above
    assert rel_err(output(model, inputs), output(base, inputs)) <= OUTPUT_TOL


def test_initialisations_follow_peft_rules() -> None:
    base = make_model("moe")
    inputs = make_input("moe")
    spec = {"peft_type": "LORA", "target_parameters": EXPERTS, "r": 2}
    noop = peftdecl.attach(copy.deepcopy(base), spec, backend="torch")
    assert rel_err(output(noop, inputs), output(base, inputs)) == 0  # B = 0: an exact no-op, as in PEFT
    drawn = peftdecl.attach(
        copy.deepcopy(base), {**spec, "init_lora_weights": False}, backend="torch", seed=3
    )
    for lp in drawn.plan().layers:
        arrays = drawn.state_dict()
        rank, d_in = lp.param("lora_A.weight").shape
        assert rank == 2 * 3  # r · E stacked rows, as PEFT's nn.Linear(in, r · E)
        # nn.Linear's default draw: U(±1/√fan_in), fan_in = in for A and r · E for B (PEFT keeps both with false)
        for key, fan_in in (("lora_A.weight", d_in), ("lora_B.weight", rank)):
            found = np.abs(arrays[lp.key(key)]).max()
            assert 0.8 / fan_in**0.5 < found <= 1 / fan_in**0.5


@pytest.mark.parametrize("name", ["experts_nested", "transposed"])
def test_bfloat16_stacks_round_as_peft(name: str, tmp_path: Path) -> None:
    model_name, kwargs = CASES[name]
    base = make_model(model_name).to(torch.bfloat16)
    torch.manual_seed(1234)
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kwargs)
    ).eval()
    theirs.save_pretrained(tmp_path)
    ours = peftdecl.load_adapter(copy.deepcopy(base), tmp_path, backend="torch")
    inputs = {k: v.to(torch.bfloat16) for k, v in make_input(model_name).items()}
    # the same bfloat16 operations as PEFT (one baddbmm into W): rounding W + ΔW another way measured 4e-3 here
    assert rel_err(output(ours, inputs), output(theirs, inputs)) <= 1e-3
    merged_ours, merged_theirs = ours.merge_and_unload(), theirs.merge_and_unload()
    assert rel_err(output(merged_ours, inputs), output(merged_theirs, inputs)) <= 1e-3


def test_torch_and_numpy_claim_parameter_layers_mlx_does_not() -> None:
    backends = peftdecl.backends()
    for name in ("torch", "numpy"):  # the NumPy engine merges them (tests/test_target_parameters_numpy.py)
        assert backends[name].capabilities.why_not("lora", "parameter") is None
    if "mlx" in backends:  # no wrapper around an MLX module's raw array: absent, with the reason
        reason = backends["mlx"].capabilities.why_not("lora", "parameter") or ""
        assert "does not run lora on parameter layers" in reason

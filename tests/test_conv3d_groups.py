"""Conv3d (LoRA, DoRA, lora_bias, IA3) and grouped convolutions (LoRA, DoRA with ``groups > 1``) against HF PEFT
and between the NumPy reference and the torch backend.

- PEFT's saved folder loads in the NumPy reference and in the torch backend with PEFT's layer outputs; merged
  weights equal PEFT's where PEFT merges, and where it refuses (grouped conv) peftdecl refuses too.
- The folder peftdecl saves holds PEFT's tensor names and shapes and loads in PEFT with the same outputs.
- Grouped DoRA's magnitude follows PEFT's norm (B read as [−1, r] times A as [r, −1], laid out as W).
- torch autograd gradients equal the reference's explicit backward; the reference's LoRA gradients equal
  finite differences.
- A rank not divisible by groups is refused naming ``$.r``, where PEFT refuses it too.
Tolerances are stated beside each comparison.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

import peftdecl  # noqa: E402
from peftdecl.equiv import perturbed  # noqa: E402
from peftdecl.errors import PeftdeclError, TargetError  # noqa: E402
from peftdecl.plan.kinds.dora import MAGNITUDE, dora_weight_norm  # noqa: E402
from tests import peft_parity as parity  # noqa: E402
from tests.backend_models import driver, float32_input, float32_state  # noqa: E402
from tests.conftest import rel_err, selected_backends  # noqa: E402
from tests.gradcheck import check_gradients  # noqa: E402
from tests.hf_models import merged_state, numpy_inputs, peft, peft_model, perturb  # noqa: E402
from tests.layer_cases import Layer  # noqa: E402

nn = torch.nn
pytestmark = pytest.mark.peft

TORCH_TOL = 1e-5  # the torch backend's float32 layer output vs the float64 reference, relative
GRAD_TOL = 1e-10  # torch float64 autograd vs the reference's float64 explicit backward, relative


class Net(nn.Module):
    """One conv ``conv`` (the adapted layer) followed by a linear head ``lin``."""

    def __init__(self, conv: nn.Module, head_in: int) -> None:
        super().__init__()
        self.conv = conv
        self.lin = nn.Linear(head_in, 3)

    def forward(self, x: Any) -> Any:
        return self.lin(torch.relu(self.conv(x)).flatten(1))


def maker(conv: Callable[[], nn.Module], x_shape: tuple[int, ...]) -> Callable[[], Net]:
    """A seeded Net around ``conv()`` whose head fits the conv's output on inputs of ``x_shape``."""

    def make() -> Net:
        torch.manual_seed(0)
        layer = conv()
        with torch.no_grad():
            head_in = layer(torch.zeros(x_shape)).numel() // x_shape[0]
        return Net(layer, head_in).eval()

    return make


CONV3D_X = (2, 2, 3, 4, 5)
GROUPED2D_X = (2, 4, 5, 5)
GROUPED1D_X = (2, 6, 7)
GROUPED3D_X = (1, 4, 3, 3, 3)
MODELS = {
    # kernel (2, 2, 3), a stride and padding per axis (no dilation: PEFT's lora_A does not copy it)
    "conv3d": (
        maker(lambda: nn.Conv3d(2, 4, (2, 2, 3), (1, 2, 1), (1, 0, 1)), CONV3D_X),
        CONV3D_X,
    ),
    "grouped2d": (maker(lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), GROUPED2D_X), GROUPED2D_X),
    "grouped1d": (maker(lambda: nn.Conv1d(6, 3, 3, stride=2, groups=3), GROUPED1D_X), GROUPED1D_X),
    "grouped3d": (maker(lambda: nn.Conv3d(4, 4, 2, groups=2, bias=False), GROUPED3D_X), GROUPED3D_X),
}


def lora(**fields: Any) -> Callable[[], Any]:
    return lambda: peft.LoraConfig(target_modules=["conv"], init_lora_weights=False, **fields)


def ia3(**fields: Any) -> Callable[[], Any]:
    return lambda: peft.IA3Config(target_modules=["conv"], init_ia3_weights=False, **fields)


# name -> (model, PEFT config)
CASES = {
    "conv3d-lora": ("conv3d", lora(r=4, lora_alpha=8)),
    "conv3d-lora-rslora": ("conv3d", lora(r=4, lora_alpha=8, use_rslora=True)),
    "conv3d-dora": ("conv3d", lora(r=4, lora_alpha=8, use_dora=True)),
    "conv3d-lora_bias": ("conv3d", lora(r=4, lora_alpha=8, lora_bias=True)),
    "conv3d-ia3": ("conv3d", ia3(feedforward_modules=[])),
    "conv3d-ia3-feedforward": ("conv3d", ia3(feedforward_modules=["conv"])),
    "grouped2d-lora": ("grouped2d", lora(r=4, lora_alpha=8)),
    "grouped2d-dora": ("grouped2d", lora(r=4, lora_alpha=8, use_dora=True)),
    "grouped1d-lora": ("grouped1d", lora(r=6, lora_alpha=3)),
    "grouped1d-dora": ("grouped1d", lora(r=3, lora_alpha=3, use_dora=True)),
    "grouped3d-lora": ("grouped3d", lora(r=2, lora_alpha=4)),
    "grouped3d-dora": ("grouped3d", lora(r=4, lora_alpha=4, use_dora=True)),
}


def grouped(case: str) -> bool:
    return case.startswith("grouped")


def probe(case: str) -> dict[str, np.ndarray]:
    x_shape = MODELS[CASES[case][0]][1]
    return {"conv": np.random.default_rng(11).normal(size=x_shape)}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_folder_loads_and_merges_like_peft(case: str, tmp_path: Path) -> None:
    model, config = CASES[case]
    make = MODELS[model][0]
    wrapped, ours = parity.load_peft_saved(make, config(), tmp_path)
    parity.assert_layers_like_peft(ours, wrapped, probe(case))  # ≤ parity.OUTPUT_TOL
    if not grouped(case):
        parity.assert_merged_equal(ours.merge_and_unload(), merged_state(wrapped))  # ≤ parity.MERGE_TOL
        return
    with pytest.raises(NotImplementedError, match="groups > 1"):  # PEFT 0.21 refuses the merge ...
        wrapped.merge_and_unload()
    with pytest.raises(PeftdeclError, match=r"groups=.*cannot hold"):  # ... and so does peftdecl, saying why
        ours.merge_and_unload()


@pytest.mark.parametrize("case", list(CASES))
def test_torch_backend_loads_peft_folder_like_peft(case: str, tmp_path: Path) -> None:
    if "torch" not in selected_backends():
        pytest.skip("the torch backend is not selected")
    model, config = CASES[case]
    make = MODELS[model][0]
    wrapped = peft_model(make(), config())
    perturb(wrapped)
    wrapped.save_pretrained(tmp_path)
    ours = peftdecl.load_adapter(make(), tmp_path)
    x = torch.tensor(probe(case)["conv"], dtype=torch.float32)
    with torch.no_grad():
        expected = wrapped(x).double().numpy()
        assert rel_err(ours(x).double().numpy(), expected) <= TORCH_TOL  # both float32
        if grouped(case):
            with pytest.raises(PeftdeclError, match="cannot hold"):
                ours.merge_and_unload()
            return
        merged = ours.merge_and_unload()
        assert (
            rel_err(merged(x).double().numpy(), wrapped.merge_and_unload()(x).double().numpy()) <= TORCH_TOL
        )


@pytest.mark.parametrize("case", list(CASES))
def test_saved_folder_loads_in_peft(case: str, tmp_path: Path) -> None:
    model, config = CASES[case]
    make = MODELS[model][0]
    ours, theirs = parity.round_trip(make, config(), tmp_path, probe(case))
    parity.assert_saved_like_peft(tmp_path / "ours", theirs, shapes=True)
    parity.assert_layers_like_peft(ours, theirs, probe(case))  # ≤ parity.OUTPUT_TOL


@pytest.mark.parametrize("case", ["grouped2d-lora", "grouped3d-dora", "conv3d-lora", "conv3d-dora"])
def test_fresh_adapter_has_peft_shapes(case: str, tmp_path: Path) -> None:
    model, config = CASES[case]
    make = MODELS[model][0]
    spec = {**config().to_dict(), "target_modules": ["conv"]}
    ours, theirs = parity.save_for_peft(make, spec, tmp_path)
    parity.assert_saved_like_peft(tmp_path, theirs, shapes=True)
    parity.assert_layers_like_peft(ours, theirs, probe(case))  # ≤ parity.OUTPUT_TOL


@pytest.mark.parametrize("case", ["grouped2d-dora", "grouped1d-dora", "grouped3d-dora", "conv3d-dora"])
def test_dora_magnitude_is_peft_norm(case: str, tmp_path: Path) -> None:
    """PEFT's initial m (A and B drawn, not perturbed) equals our plan's norm of W + s·L on PEFT's own A, B, W."""
    model, config = CASES[case]
    wrapped, ours = parity.load_peft_saved(MODELS[model][0], config(), tmp_path, perturbed=False)
    lp = ours.plan().layer("conv")
    own = {name: ours.state_dict()[f"conv.{name}"] for name in ("lora_A.weight", "lora_B.weight")}
    norm = dora_weight_norm(lp, ours.base_weight("conv"), own)
    theirs = wrapped.base_model.model.conv.lora_magnitude_vector["default"].weight.detach().double().numpy()
    assert theirs.shape == lp.param(MAGNITUDE).shape
    assert rel_err(norm, theirs.reshape(-1)) <= 1e-6  # PEFT's float32 norm vs the float64 one


@pytest.mark.parametrize("groups, r", [(2, 3), (4, 6)])
def test_rank_not_divisible_by_groups_is_refused(groups: int, r: int) -> None:
    make = maker(lambda: nn.Conv2d(4, 4, 1, groups=groups), (1, 4, 2, 2))
    with pytest.raises(ValueError, match="divisible by groups"):  # PEFT's own check
        peft_model(make(), peft.LoraConfig(target_modules=["conv"], r=r))
    state, options = numpy_inputs(make())
    spec = {"peft_type": "LORA", "r": r, "target_modules": ["conv"]}
    with pytest.raises(
        TargetError, match=rf"groups={groups} needs a rank divisible by {groups}, got r={r}.*\$\.r"
    ):
        peftdecl.attach(state, spec, **options)
    with pytest.raises(TargetError, match=r"rank_pattern"):  # a per-module rank is checked the same way
        peftdecl.attach(state, {**spec, "r": groups, "rank_pattern": {"conv": r}}, **options)


# --- gradients: the reference's explicit backward against finite differences and torch autograd ------------

GROUPED2D = {"type": "conv2d", "groups": 2, "padding": 1, "stride": [2, 1]}
GRADIENT_LAYERS = {
    "grouped2d": Layer({"m.weight": (6, 2, 3, 3), "m.bias": (6,)}, GROUPED2D, (2, 4, 5, 5)),
    "grouped1d": Layer({"m.weight": (4, 3, 3)}, {"type": "conv1d", "groups": 2, "stride": 2}, (2, 6, 7)),
    "grouped3d": Layer(
        {"m.weight": (4, 2, 2, 2, 2)}, {"type": "conv3d", "groups": 2, "padding": 1}, (1, 4, 2, 3, 3)
    ),
}
GRADIENT_SPECS = {
    "lora": {"peft_type": "LORA", "r": 4, "lora_alpha": 6, "init_lora_weights": False},
    "dora": {"peft_type": "LORA", "r": 4, "lora_alpha": 6, "init_lora_weights": False, "use_dora": True},
    "lora_bias": {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 3,
        "init_lora_weights": False,
        "lora_bias": True,
    },
}


def twins(layer: Layer, spec: dict[str, Any]) -> tuple[Any, Any, Any, np.ndarray]:
    """(torch driver, torch float64 model, NumPy reference, input) holding the same perturbed adapter numbers."""
    rng = np.random.default_rng(3)
    state, x = float32_state(layer, rng), float32_input(layer, rng)
    spec = {**spec, "target_modules": ["m"]}
    reference = peftdecl.attach(state, spec, backend="numpy", seed=3, layer_types=layer.layer_types())
    trainable = {k for k, p in reference.plan().param_specs().items() if p.role == "trainable"}
    arrays = {
        k: v.astype(np.float64) for k, v in perturbed(reference.state_dict(), trainable, 0.1, 3).items()
    }
    run = driver("torch")
    ours = peftdecl.attach(run.base(layer, state, "float64"), spec, backend="torch", seed=3)
    for model in (reference, ours):
        model.delete_adapter("default")
        model.add_adapter("default", spec, arrays=arrays, activate=True)
    return run, ours, reference, x


@pytest.mark.parametrize("layer", list(GRADIENT_LAYERS))
def test_reference_lora_gradients_are_finite_differences(layer: str) -> None:
    shapes = GRADIENT_LAYERS[layer]
    rng = np.random.default_rng(5)
    spec = {**GRADIENT_SPECS["lora_bias"], "target_modules": ["m"]}
    # init_lora_weights=False: A, B and B's bias all start non-zero
    model = peftdecl.attach(shapes.random_state(rng), spec, seed=5, layer_types=shapes.layer_types())
    assert check_gradients(
        model, "m", shapes.random_input(rng), seed=5
    )  # ≤ 1e-6 relative (tests/gradcheck.py)


@pytest.mark.parametrize("kind", list(GRADIENT_SPECS))
@pytest.mark.parametrize("layer", list(GRADIENT_LAYERS))
def test_torch_gradients_equal_reference_backward(layer: str, kind: str) -> None:
    if "torch" not in selected_backends():
        pytest.skip("the torch backend is not selected")
    run, ours, reference, x = twins(GRADIENT_LAYERS[layer], GRADIENT_SPECS[kind])
    expected, tape = reference.engine.layer_forward("m", x)
    dy = np.random.default_rng(1).normal(size=expected.shape)
    expected_grads = reference.engine.layer_backward("m", tape, dy)
    y, grads = run.vjp(ours, x, dy, "float64")
    assert rel_err(y, expected) <= GRAD_TOL
    assert set(grads) == {k for k, v in expected_grads.items() if v is not None}
    for key, grad in grads.items():
        assert rel_err(grad, expected_grads[key]) <= GRAD_TOL, key


@pytest.mark.parametrize(
    "spec",
    [
        {"peft_type": "LOHA", "r": 2},
        {"peft_type": "LOKR", "r": 2},
        {"peft_type": "ADALORA", "init_r": 2, "target_r": 1, "total_step": 10},
        {"peft_type": "OFT", "r": 0, "oft_block_size": 2},
        {"peft_type": "BOFT", "boft_block_size": 2},
        {"peft_type": "VERA", "r": 2},
    ],
    ids=lambda spec: spec["peft_type"],
)
def test_kinds_peft_runs_on_no_conv3d_refuse_it(spec: dict[str, Any]) -> None:
    """HF PEFT 0.21 has no Conv3d layer for these kinds: peftdecl names the layer and the types the kind adapts."""
    make = maker(lambda: nn.Conv3d(2, 4, 2), (1, 2, 2, 2, 2))
    with pytest.raises(
        (TypeError, ValueError), match=r"not supported|No layers types compatible"
    ):  # PEFT's own
        peft_model(make(), peft.get_peft_config({**spec, "target_modules": ["conv"]}))
    state, options = numpy_inputs(make())
    with pytest.raises(TargetError, match=r"conv \(conv3d\) cannot be adapted: .* supports .* layers only"):
        peftdecl.attach(state, {**spec, "target_modules": ["conv"]}, **options)


class TwoConvs(nn.Module):
    """A plain conv ``a`` (mergeable) feeding a grouped conv ``conv`` (not)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)

    def forward(self, x: Any) -> Any:
        return self.conv(self.a(x))


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_refused_merge_writes_no_weight(backend: str) -> None:
    """The grouped layer's refusal comes before the mergeable layer ``a`` is merged: nothing changes."""
    if backend not in selected_backends():
        pytest.skip(f"the {backend} backend is not selected")
    torch.manual_seed(0)
    spec = {"peft_type": "LORA", "r": 2, "target_modules": ["a", "conv"], "init_lora_weights": False}
    if backend == "torch":
        model = peftdecl.attach(TwoConvs(), spec, seed=0)
    else:
        state, options = numpy_inputs(TwoConvs())
        model = peftdecl.attach(state, spec, seed=0, **options)
    weights = {m: np.array(model.base_weight(m)) for m in ("a", "conv")}
    for step in (model.merge, model.merge_and_unload):
        with pytest.raises(PeftdeclError, match="groups=2"):
            step()
        for module, weight in weights.items():
            assert np.array_equal(model.base_weight(module), weight), module

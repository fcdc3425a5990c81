"""AdaLoRA's rank allocator runs on the arrays it is given: the same steps on NumPy float64, array_api_strict
float64 and torch (float64 and float32) tensors keep the same triplets and zero the same singular values in place.

Expected values: the NumPy float64 run. Scores agree to 1e-12 relative in float64 and 1e-6 in float32 (the
allocator's products and running averages rounded to float32); the masks agree exactly (random scores: no
near-ties at the threshold).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import peftdecl
from peftdecl_numpy.rank_allocator import RankAllocator
from peftdecl_numpy.xp_ops import to_numpy
from tests.conftest import rel_err

STEPS = 12
SPEC = {
    "peft_type": "ADALORA",
    "init_r": 4,
    "target_r": 2,
    "total_step": STEPS,
    "tinit": 2,
    "tfinal": 3,
    "deltaT": 2,
    "target_modules": ["l0", "l1", "l2"],
    "init_lora_weights": False,
}


def plan_and_steps() -> tuple[Any, dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """An AdaLoRA plan on three layers, its initial tensors and one random gradient per step (all float64)."""
    rng = np.random.default_rng(0)
    state = {f"l{i}.weight": rng.normal(size=(5 + i, 6)) for i in range(3)}
    model = peftdecl.attach(state, SPEC)
    params = {k: np.array(v) for k, v in model.trainable_parameters().items()}
    grads = [{k: rng.normal(size=v.shape) for k, v in params.items()} for _ in range(STEPS)]
    return model.plan(), params, grads


def run(convert: Callable[[np.ndarray], Any]) -> tuple[list[Any], dict[str, np.ndarray]]:
    """Every step's mask and the final parameters (on the host), run on ``convert``'s arrays."""
    plan, params, grads = plan_and_steps()
    live = {k: convert(v) for k, v in params.items()}
    allocator = RankAllocator(plan)
    masks = []
    for step in range(1, STEPS + 1):
        _, mask = allocator.update_and_allocate(
            step, live, {k: convert(g) for k, g in grads[step - 1].items()}
        )
        masks.append(mask)
    return masks, {k: to_numpy(v) for k, v in live.items()}


def strict(value: np.ndarray) -> Any:
    xp = pytest.importorskip("array_api_strict")
    return xp.asarray(value)


def torch_tensor(dtype: str) -> Callable[[np.ndarray], Any]:
    torch = pytest.importorskip("torch")
    return lambda value: torch.tensor(value, dtype=getattr(torch, dtype))


@pytest.mark.parametrize(
    ("convert", "tol"),
    [
        pytest.param(strict, 1e-12, id="array_api_strict-float64"),
        pytest.param("float64", 1e-12, id="torch-float64"),
        pytest.param("float32", 1e-6, id="torch-float32"),
    ],
)
def test_the_allocator_gives_the_same_masks_and_zeros_on_every_namespace(convert: Any, tol: float) -> None:
    masks, params = run(np.array)
    converter = torch_tensor(convert) if isinstance(convert, str) else convert
    other_masks, other_params = run(converter)
    assert any(mask is not None for mask in masks) and masks[-1] is not None
    assert other_masks == masks
    for key, expected in params.items():
        assert rel_err(other_params[key], expected) <= tol, key
        if key.endswith("lora_E"):  # the masked singular values are exactly zero on both
            np.testing.assert_array_equal(other_params[key] == 0, expected == 0)
    assert sum(sum(v) for v in masks[-1].values()) == 3 * SPEC["target_r"]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_scores_stay_on_the_parameters_namespace_and_agree(dtype: str) -> None:
    torch = pytest.importorskip("torch")
    plan, params, grads = plan_and_steps()
    reference, other = RankAllocator(plan), RankAllocator(plan)
    live = {k: torch.tensor(v, dtype=getattr(torch, dtype)) for k, v in params.items()}
    for step in (1, 2):  # before any masking: scores only
        reference.update_and_allocate(step, params, grads[step - 1])
        other.update_and_allocate(
            step, live, {k: torch.tensor(g, dtype=live[k].dtype) for k, g in grads[step - 1].items()}
        )
    tol = 1e-12 if dtype == "float64" else 1e-6
    for module, expected in reference.triplet_scores().items():
        got = other.triplet_scores()[module]
        assert isinstance(got, torch.Tensor) and got.dtype == getattr(torch, dtype)
        assert rel_err(got.numpy(), expected) <= tol, module

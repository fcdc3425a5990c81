"""EVA and LoRA-GA on MLX against the NumPy reference.

MLX has neither forward hooks nor a gradient estimator in peftdecl, so the data come from elsewhere, as a user
would bring them: an EVA state (module -> A) and LoRA-GA gradients kept for the model with
``peftdecl.inits.remember``. Given those and the same seed, MLX (float32 storage) must hold the reference's float64
tensors and residual weights.
"""

from __future__ import annotations

import numpy as np
import pytest

import peftdecl
from tests.conftest import rel_err, selected_backends

TOL = 1e-5  # float32 storage of float64 values
TARGETS = ["lin0", "lin1"]


@pytest.fixture
def mlx_model() -> tuple[object, dict[str, np.ndarray]]:
    if "mlx" not in selected_backends():
        pytest.skip("the mlx backend is not selected")
    from tests.mlx_models import mlx_mlp

    return mlx_mlp()


def test_lora_ga_with_kept_gradients(mlx_model: tuple[object, dict[str, np.ndarray]]) -> None:
    model, state = mlx_model
    rng = np.random.default_rng(0)
    grads = {"lin0": rng.standard_normal((16, 12)), "lin1": rng.standard_normal((10, 16))}
    spec = {
        "peft_type": "LORA",
        "r": 2,
        "target_modules": TARGETS,
        "init_lora_weights": "lora_ga",
        "lora_ga_config": {},
    }
    peftdecl.inits.remember(state, "lora_ga", grads)
    peftdecl.inits.remember(model, "lora_ga", grads)
    reference = peftdecl.attach(state, spec, backend="numpy")
    ours = peftdecl.attach(model, spec, backend="mlx")
    expected = reference.state_dict()
    for key, value in ours.state_dict().items():
        assert rel_err(value, expected[key]) <= TOL
    for module in TARGETS:
        assert rel_err(ours.engine.base_weight(module), reference.engine.base_weight(module)) <= TOL


def test_eva_from_a_state(mlx_model: tuple[object, dict[str, np.ndarray]]) -> None:
    model, state = mlx_model
    rng = np.random.default_rng(1)
    eva_state = {"lin0": np.linalg.qr(rng.standard_normal((12, 6)))[0].T, "lin1": np.zeros((0, 16))}
    spec = {"peft_type": "LORA", "r": 3, "target_modules": TARGETS, "init_lora_weights": "eva"}
    reference = peftdecl.attach(state, spec, backend="numpy")
    ours = peftdecl.attach(model, spec, backend="mlx")
    for adapted in (reference, ours):
        peftdecl.initialize_lora_eva_weights(adapted, eva_state_dict=eva_state)
        assert adapted.plan().targets == ("lin0",)  # lin1 got rank 0: no adapter there, as in PEFT
        assert dict(adapted.spec().rank_pattern) == {"lin0": 6}
        assert dict(adapted.spec().alpha_pattern) == {"lin0": 16.0}  # alpha × 6/3 keeps s
    expected = reference.state_dict()
    for key, value in ours.state_dict().items():
        assert rel_err(value, expected[key]) <= TOL
    assert rel_err(expected["lin0.lora_A.weight"], eva_state["lin0"]) <= 1e-15  # a copy

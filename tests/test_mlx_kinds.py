"""Every kind the MLX backend runs, against the float64 NumPy reference on the same numbers.

Per layer, float32 MLX vs float64 reference, relative error ≤ 1e-5 for outputs and for the gradients of every
trainable tensor and of the input (eval mode, and training mode with the dropout draws shared with the reference).
Merges: the merged weight agrees with the reference's to ≤ 1e-6 (float32 vs float64), the merged forward with the
adapter forward to ≤ 1e-5, and unmerge restores the base weight to ≤ 1e-6.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import peftdecl
from tests.conftest import rel_err
from tests.mlx_models import Tiny, assert_vjp_like_reference, mx, shared_draws, twin

LAYER_TOL = 1e-5
MERGE_TOL = 1e-6
CAPS = peftdecl.backends()["mlx"].capabilities

# kind -> (spec, modules it targets); dropout rates are non-zero so that training mode differs from eval
SPECS = {
    "lora": ({"peft_type": "LORA", "r": 3, "lora_alpha": 6, "init_lora_weights": False, "lora_dropout": 0.3},
             ["q_proj", "down_proj", "embed_tokens"]),
    "lora_rslora_bias": ({"peft_type": "LORA", "r": 4, "lora_alpha": 6, "use_rslora": True, "lora_bias": True,
                          "init_lora_weights": False}, ["q_proj"]),
    "dora": ({"peft_type": "LORA", "use_dora": True, "r": 3, "lora_alpha": 6, "init_lora_weights": False,
              "lora_dropout": 0.3}, ["q_proj", "down_proj", "embed_tokens"]),
    "adalora": ({"peft_type": "ADALORA", "init_r": 4, "target_r": 2, "total_step": 10, "lora_alpha": 8,
                 "lora_dropout": 0.3}, ["q_proj", "down_proj"]),
    "ia3": ({"peft_type": "IA3", "feedforward_modules": ["down_proj"], "init_ia3_weights": False},
            ["q_proj", "down_proj"]),
    "loha": ({"peft_type": "LOHA", "r": 3, "alpha": 6, "init_weights": False, "rank_dropout": 0.3,
              "module_dropout": 0.2}, ["q_proj", "down_proj"]),
    "lokr": ({"peft_type": "LOKR", "r": 1, "alpha": 3, "init_weights": False, "decompose_both": True,
              "rank_dropout": 0.3, "rank_dropout_scale": True}, ["q_proj", "down_proj"]),
    "oft": ({"peft_type": "OFT", "r": 0, "oft_block_size": 4, "init_weights": False, "module_dropout": 0.3},
            ["q_proj", "down_proj"]),
    "oft_exact_cayley": ({"peft_type": "OFT", "r": 0, "oft_block_size": 4, "init_weights": False,
                          "use_cayley_neumann": False, "coft": True, "eps": 0.5}, ["q_proj", "down_proj"]),
    "boft": ({"peft_type": "BOFT", "boft_block_size": 2, "boft_n_butterfly_factor": 2, "init_weights": False,
              "boft_dropout": 0.3}, ["q_proj", "down_proj"]),
    "vera": ({"peft_type": "VERA", "r": 4, "init_weights": False, "vera_dropout": 0.3}, ["q_proj", "down_proj"]),
}  # fmt: skip
EXECUTION_KIND = {"lora_rslora_bias": "lora", "oft_exact_cayley": "oft"}


def spec_for(case: str) -> dict:
    spec, targets = SPECS[case]
    return {**spec, "target_modules": targets}


def needs(case: str, layer_type: str | None = None) -> None:
    reason = CAPS.why_not(EXECUTION_KIND.get(case, case), layer_type)
    if reason:
        pytest.skip(reason)


def inputs(module: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if module == "embed_tokens":
        return rng.integers(0, 13, size=(2, 3))
    return rng.normal(size=(2, 3, 16 if module == "q_proj" else 12))


CASES = [(case, module) for case, (_, targets) in SPECS.items() for module in targets]


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize(("case", "module"), CASES)
def test_layer_output_and_gradients_match_reference(case: str, module: str, mode: str, monkeypatch) -> None:
    needs(case, "embedding" if module == "embed_tokens" else "linear")
    ours, ref = twin(Tiny(), spec_for(case))
    x = inputs(module)
    ours.eval()  # an mlx.nn.Module starts in training mode
    if mode == "train":
        ours.train()
        ref.train()
        shared_draws(monkeypatch, seed=5)
        ref.engine.rng = np.random.default_rng(5)
    assert_vjp_like_reference(ours, ref, module, x, LAYER_TOL)


@pytest.mark.parametrize("case", sorted(SPECS))
def test_merge_matches_reference_and_unmerge_restores(case: str) -> None:
    needs(case)
    ours, ref = twin(Tiny(), spec_for(case))
    modules = [m for m in SPECS[case][1] if CAPS.supports(EXECUTION_KIND.get(case, case), _type(m))]
    ids = mx.array(inputs("embed_tokens"))
    ours.eval()
    adapted = np.array(ours(ids))
    before = {m: ours.base_weight(m) for m in modules}
    ours.merge()
    ref.merge()
    for m in modules:
        assert rel_err(ours.base_weight(m), ref.base_weight(m)) <= MERGE_TOL, m
    assert rel_err(np.array(ours(ids)), adapted) <= LAYER_TOL
    ours.unmerge()
    for m in modules:
        assert rel_err(ours.base_weight(m), before[m]) <= MERGE_TOL, m
    with ours.disable_adapters():
        base = np.array(ours(ids))
    assert rel_err(adapted, base) > 1e-3  # the adapter really changes the output


def _type(module: str) -> str:
    return "embedding" if module == "embed_tokens" else "linear"


@settings(max_examples=8, deadline=None)
@given(
    d_in=st.integers(2, 9),
    d_out=st.integers(1, 9),
    r=st.integers(1, 4),
    dora=st.booleans(),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_linear_lora_and_dora_match_reference(d_in, d_out, r, dora, bias, seed) -> None:
    model = Tiny()
    model.q_proj = peftdecl_linear(d_in, d_out, bias, seed)
    spec = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "use_dora": dora, "init_lora_weights": False,
            "target_modules": ["q_proj"]}  # fmt: skip
    ours, ref = twin(model, spec, seed=seed)
    ours.eval()
    x = np.random.default_rng(seed).normal(size=(3, d_in))
    dy = np.random.default_rng(seed + 1).normal(size=(3, d_out))
    y_ref, tape = ref.engine.layer_forward("q_proj", x)
    grads_ref = ref.engine.layer_backward("q_proj", tape, dy)
    y, grads = ours.engine.layer_vjp("q_proj", x, dy)
    assert rel_err(y, y_ref) <= LAYER_TOL
    for key, value in grads_ref.items():
        assert rel_err(grads[key], value) <= LAYER_TOL, key


def peftdecl_linear(d_in: int, d_out: int, bias: bool, seed: int):
    import mlx.nn as nn

    mx.random.seed(seed)
    layer = nn.Linear(d_in, d_out, bias=bias)
    mx.eval(layer.parameters())
    return layer


def test_coft_projects_the_stored_tensor_during_training_like_the_reference() -> None:
    """Two SGD steps: HF PEFT (and the reference) overwrite the parameter by its projection before each use, so
    each step starts from the projected value; stored tensors agree to ≤ 1e-5 afterwards."""
    import mlx.nn as nn
    import mlx.optimizers as optim

    needs("oft")
    spec = {**SPECS["oft_exact_cayley"][0], "target_modules": ["q_proj"]}
    ours, ref = twin(Tiny(), spec)
    ours.train()
    ref.train()
    layer, key, lr = ours.engine.layer("q_proj"), "q_proj.oft_R.weight", 0.3
    rng = np.random.default_rng(0)
    x, dy = rng.normal(size=(2, 3, 16)), rng.normal(size=(2, 3, 12))
    step = nn.value_and_grad(layer, lambda inputs: mx.sum(layer(inputs) * mx.array(dy, mx.float32)))
    opt = optim.SGD(learning_rate=lr)
    start = ref.state_dict()[key].copy()
    for _ in range(2):
        _, grads = step(mx.array(x, mx.float32))
        opt.update(layer, grads)
        _, tape = ref.engine.layer_forward("q_proj", x)
        ref.trainable_parameters()[key] -= lr * ref.engine.layer_backward("q_proj", tape, dy)[key]
    assert rel_err(ref.state_dict()[key], start) > 1e-2
    assert rel_err(ours.state_dict()[key], ref.state_dict()[key]) <= LAYER_TOL


@pytest.mark.parametrize("module", ["q_proj", "embed_tokens"])
def test_dora_factored_norm_matches_reference(module: str, monkeypatch) -> None:
    """Large layers take DoRA's factored norm (no out × in temporary); force it on the tiny ones."""
    import peftdecl_mlx.kinds.dora as mlx_dora

    monkeypatch.setattr(mlx_dora, "FORM_LIMIT", 0)
    ours, ref = twin(Tiny(), spec_for("dora"))
    ours.eval()
    x = inputs(module)
    y_ref, tape = ref.engine.layer_forward(module, x)
    dy = np.random.default_rng(1).normal(size=y_ref.shape)
    grads_ref = ref.engine.layer_backward(module, tape, dy)
    y, grads = ours.engine.layer_vjp(module, x, dy)
    assert rel_err(y, y_ref) <= LAYER_TOL
    for key, value in grads_ref.items():
        if value is not None:
            assert rel_err(grads[key], value) <= LAYER_TOL, key

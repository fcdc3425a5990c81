"""The MLX backend's fused LoRA and DoRA paths (one function with a hand-written gradient each), forced in turn by
the engine options ``fused_merged`` (True: merged, False: low-rank) and ``fused`` (False: neither).

Against the float64 NumPy reference: outputs and the gradients of every trainable tensor and of the input, relative
error ≤ 1e-5 (float32), for the merged path (x (W + s·B A)ᵀ) and the low-rank path (x Wᵀ + s·(x Aᵀ) Bᵀ), on a layer
with and without a base bias. An unfrozen base gets dW and db equal to float64 NumPy formulas (≤ 1e-5). Inside
``mx.compile`` (as mlx-lm's trainer runs a step), outputs and gradients still match the reference (≤ 1e-5) on two
input shapes, a bfloat16 input's output to 2e-2, and dropout (the model's state, which holds the engine's key,
passed through) draws anew each call.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip(
    "mlx.core"
)  # the numpy and torch CI jobs install no mlx: skip before importing the backend

import peftdecl_mlx.kinds._fused as fused
import peftdecl_mlx.kinds.dora as mlx_dora
from tests.conftest import rel_err
from tests.mlx_models import Tiny, assert_vjp_like_reference, mx, tree_flatten, twin

TOL = 1e-5
SPECS = {
    "lora": {"peft_type": "LORA", "r": 3, "lora_alpha": 6, "init_lora_weights": False},
    "lora_bias": {"peft_type": "LORA", "r": 3, "lora_alpha": 6, "init_lora_weights": False, "lora_bias": True},
    "dora": {"peft_type": "LORA", "r": 3, "lora_alpha": 6, "init_lora_weights": False, "use_dora": True},
}  # fmt: skip
WIDTH = {"q_proj": 16, "down_proj": 12}  # q_proj has a base bias, down_proj has none


def _spy(monkeypatch: pytest.MonkeyPatch, name: str) -> list[tuple]:
    """Record the arguments of every call to ``fused.<name>`` (the cached factory of one fused function)."""
    calls: list[tuple] = []
    real = getattr(fused, name)
    monkeypatch.setattr(fused, name, lambda *args: calls.append(args) or real(*args))
    return calls


def _grads_match(ours, ref, module: str, x: np.ndarray) -> None:
    assert_vjp_like_reference(ours, ref, module, x, TOL)


@pytest.mark.parametrize("module", sorted(WIDTH))
@pytest.mark.parametrize("merge", [True, False], ids=["merged", "low_rank"])
@pytest.mark.parametrize("case", ["lora", "lora_bias"])
def test_lora_paths_match_reference(case: str, merge: bool, module: str, monkeypatch) -> None:
    merged, low_rank = _spy(monkeypatch, "lora_merged"), _spy(monkeypatch, "lora")
    ours, ref = twin(Tiny(), {**SPECS[case], "target_modules": [module]}, fused_merged=merge)
    ours.eval()
    _grads_match(ours, ref, module, np.random.default_rng(0).normal(size=(2, 3, WIDTH[module])))
    assert (bool(merged), bool(low_rank)) == (merge, not merge)


@pytest.mark.parametrize("module", sorted(WIDTH))
@pytest.mark.parametrize(
    ("form_limit", "merge", "expect_merged"),
    [(None, False, True), (0, True, True), (0, False, False)],
    ids=["formed_for_norm", "formed_by_cost", "low_rank"],
)
def test_dora_paths_match_reference(form_limit, merge, expect_merged, module, monkeypatch) -> None:
    """W′ serves the product when the norm formed it, or when the cost rule asks for it; else the low-rank path."""
    if form_limit is not None:
        monkeypatch.setattr(mlx_dora, "FORM_LIMIT", form_limit)
    calls = _spy(monkeypatch, "dora")
    ours, ref = twin(Tiny(), {**SPECS["dora"], "target_modules": [module]}, fused_merged=merge)
    ours.eval()
    _grads_match(ours, ref, module, np.random.default_rng(0).normal(size=(2, 3, WIDTH[module])))
    assert [merged for _, merged in calls] == [expect_merged]


def test_dora_reused_norm_takes_the_low_rank_path_with_the_same_output(monkeypatch) -> None:
    """A second call with unchanged arrays reuses n and (where forming W′ does not pay) runs x Wᵀ + s·(x Aᵀ) Bᵀ."""
    monkeypatch.setattr(fused, "merge_pays", lambda *args: False)  # the cost rule itself (fused_merged unset)
    calls = _spy(monkeypatch, "dora")
    ours, ref = twin(Tiny(), {**SPECS["dora"], "target_modules": ["q_proj"]})
    ours.eval()
    layer = ours.engine.layer("q_proj")
    x = np.random.default_rng(0).normal(size=(4, 16))
    y_ref, _ = ref.engine.layer_forward("q_proj", x)
    for _ in range(2):
        assert rel_err(np.array(layer(mx.array(x, mx.float32))), y_ref) <= TOL
    assert [merged for _, merged in calls] == [True, False]


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "low_rank"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_unfrozen_base_gets_its_gradient(dora: bool, merge: bool, monkeypatch) -> None:
    """dW = (g ⊙ dy)ᵀ x and db = Σ dy (g = 1 for LoRA; n held constant for DoRA), from float64 NumPy."""
    if not merge:  # DoRA would otherwise form W′ for its norm
        monkeypatch.setattr(mlx_dora, "FORM_LIMIT", 0)
    spec = {**SPECS["dora" if dora else "lora"], "target_modules": ["q_proj"]}
    ours, _ = twin(Tiny(), spec, fused_merged=merge)
    ours.eval()
    layer = ours.engine.layer("q_proj")
    state = {k: np.array(v, np.float64) for k, v in ours.state_dict().items()}
    w = np.array(layer.weight, np.float64)
    a, bb = state["q_proj.lora_A.weight"], state["q_proj.lora_B.weight"]
    rng = np.random.default_rng(2)
    x, dy = rng.normal(size=(5, 16)), rng.normal(size=(5, 12))
    g = np.ones(12)
    if dora:
        g = state["q_proj.lora_magnitude_vector"] / np.linalg.norm(w + 2.0 * bb @ a, axis=1)
    base = layer.base_layer.parameters()

    def loss(params):
        layer.base_layer.update(params)
        return mx.sum(layer(mx.array(x, mx.float32)) * mx.array(dy, mx.float32))

    try:
        grads = mx.grad(loss)(base)
    finally:
        layer.base_layer.update(base)
    assert rel_err(np.array(grads["weight"]), (g * dy).T @ x) <= TOL
    assert rel_err(np.array(grads["bias"]), dy.sum(axis=0)) <= TOL


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "low_rank"])
@pytest.mark.parametrize("case", ["lora", "dora"])
def test_compiled_training_step_matches_reference(case: str, merge: bool, monkeypatch) -> None:
    """One value_and_grad under mx.compile, called on two token counts and then a bfloat16 input (each a new
    trace); the bfloat16 call takes the general path and its output is held to 2e-2."""
    ours, ref = twin(Tiny(), {**SPECS[case], "target_modules": ["q_proj"]}, fused_merged=merge)
    ours.train()
    layer = ours.engine.layer("q_proj")
    params = layer.trainable_parameters()

    def loss(p, inputs, dy):
        layer.update(p)
        out = layer(inputs)
        return mx.sum(out.astype(mx.float32) * dy), out

    step = mx.compile(mx.value_and_grad(loss, argnums=(0, 1)))
    rng = np.random.default_rng(3)
    for tokens, dtype in ((3, mx.float32), (5, mx.float32), (5, mx.bfloat16)):
        x = rng.normal(size=(tokens, 16))
        x_mx = mx.array(x, dtype)
        y_ref, tape = ref.engine.layer_forward("q_proj", np.array(x_mx.astype(mx.float32)))
        dy = rng.normal(size=y_ref.shape)
        try:
            (value, y), (param_grads, input_grad) = step(params, x_mx, mx.array(dy, mx.float32))
        finally:
            layer.update(params)
        if dtype == mx.bfloat16:
            assert rel_err(np.array(y.astype(mx.float32)), y_ref) <= 2e-2
            continue
        grads_ref = ref.engine.layer_backward("q_proj", tape, dy)
        assert rel_err(np.array(y), y_ref) <= TOL
        assert rel_err(np.array(value), np.sum(y_ref * dy)) <= TOL
        assert rel_err(np.array(input_grad), grads_ref["input"]) <= TOL
        got = {f"q_proj.{k.split('.', 2)[2]}": np.array(v) for k, v in tree_flatten(param_grads)}
        assert set(got) == {k for k, v in grads_ref.items() if v is not None and k != "input"}
        for key, value_ in got.items():
            assert rel_err(value_, grads_ref[key]) <= TOL, key


def test_dropout_draws_differ_between_calls_of_a_compiled_step() -> None:
    """With the model's state passed through mx.compile (as mlx-lm's trainer does; it holds the engine's key),
    training-mode dropout draws a new mask each call: two calls on the same input give different outputs, the
    same two an eager run draws; in eval mode they are equal."""
    spec = {**SPECS["lora"], "lora_dropout": 0.5, "target_modules": ["q_proj"]}
    ours, _ = twin(Tiny(), spec)
    layer = ours.engine.layer("q_proj")
    state = [ours.engine.model.state]
    step = mx.compile(lambda inputs: layer(inputs), inputs=state, outputs=state)
    x = mx.array(np.random.default_rng(4).normal(size=(4, 16)), mx.float32)
    ours.train()
    start = ours.get_rng_state()
    first, second = np.array(step(x)), np.array(step(x))
    assert rel_err(first, second) > 1e-3
    ours.set_rng_state(start)
    assert rel_err(np.array(layer(x)), first) == 0.0 and rel_err(np.array(layer(x)), second) == 0.0
    ours.eval()
    step = mx.compile(lambda inputs: layer(inputs), inputs=state, outputs=state)
    assert rel_err(np.array(step(x)), np.array(step(x))) == 0.0


@pytest.mark.parametrize("case", ["lora", "dora"])
def test_fused_option_off_takes_the_general_path(case: str, monkeypatch) -> None:
    """engine_options={"fused": False}: no fused function runs; outputs and gradients still match the reference."""
    calls = [_spy(monkeypatch, name) for name in ("lora_merged", "lora", "dora")]
    ours, ref = twin(Tiny(), {**SPECS[case], "target_modules": ["q_proj"]}, fused=False)
    ours.eval()
    _grads_match(ours, ref, "q_proj", np.random.default_rng(0).normal(size=(2, 3, 16)))
    assert calls == [[], [], []]

"""MLX adapters whose tensors are partly frozen: each tensor of an adapter is frozen by its own key, so the model's
trainable tree holds only trainable arrays and ``Module.update`` takes it back; MiCA (frozen ``lora_B``) and
MonteCLoRA (frozen sampler buffers beside trainable priors) against the float64 NumPy reference.

Tolerances: float32 MLX against the float64 reference, relative error ≤ 1e-5 for layer outputs, gradients and
merged weights; MonteCLoRA's sampler math (exp, softmax, sqrt in float32) ≤ 1e-5 as well, its regulariser's value
≤ 1e-5 and its gradients through the draw ≤ 1e-4 (float32 against float64 central differences). Frozen tensors after
an optimizer step: exactly equal.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import peftdecl
from peftdecl.monteclora_math import expert_weights, noise_columns, perturbed_a_grads, regulariser
from peftdecl.plan.kinds.monteclora import EXPERT_PRIOR, EXPERT_WEIGHTS, STD_PRIOR, VAR_PRIOR
from tests.conftest import rel_err
from tests.mlx_models import Tiny, assert_vjp_like_reference, mx, nn, tree_flatten, twin

optim = pytest.importorskip("mlx.optimizers")

TOL = 1e-5
IDS = mx.array([[1, 5, 9, 2, 7], [3, 3, 8, 0, 4]])
MICA = {"peft_type": "LORA", "r": 3, "lora_alpha": 6, "init_lora_weights": "mica"}
MONTECLORA = {
    "peft_type": "LORA",
    "r": 2,
    "lora_alpha": 4,
    "init_lora_weights": False,
    "target_modules": ["q_proj"],
    "monteclora_config": {"num_samples": 3, "sample_scaler": 0.5},
}


def flat_keys(tree: Any) -> set[str]:
    return {k for k, _ in tree_flatten(tree)}


def test_adapter_params_freeze_each_tensor_by_its_own_key() -> None:
    from peftdecl_mlx.layer import AdapterParams

    names = ("lora_A.weight", "lora_B.weight", "sampler.prior", "sampler.buffer", "flat")
    params = AdapterParams({n: mx.ones((2,)) for n in names})
    params.set_trainable(["lora_A.weight", "sampler.prior"])
    tree = params.trainable_parameters()
    assert flat_keys(tree) == {"lora_A.weight", "sampler.prior"}
    params.update(tree)  # a frozen leaf must not come back in an array's place
    params.set_trainable([])
    assert flat_keys(params.trainable_parameters()) == set()
    params.update(params.trainable_parameters())
    assert flat_keys(params.parameters()) == set(names)
    assert set(params.tensors()) == set(names)


def test_a_frozen_adapter_leaves_no_leaf_in_the_trainable_tree() -> None:
    lora = {"peft_type": "LORA", "r": 2, "init_lora_weights": False}
    model = peftdecl.attach(Tiny(), {**lora, "target_modules": ["q_proj"]}, seed=1)
    model.add_adapter("other", {**lora, "target_modules": ["down_proj"]}, seed=2)
    mlx_model = model.engine.model
    assert flat_keys(mlx_model.trainable_parameters()) == {
        "q_proj.adapters.default.lora_A.weight",
        "q_proj.adapters.default.lora_B.weight",
    }
    mlx_model.update(mlx_model.trainable_parameters())


@pytest.mark.parametrize("module", ["q_proj", "embed_tokens"])
def test_mica_layer_and_merge_match_reference(module: str) -> None:
    ours, ref = twin(Tiny(), {**MICA, "target_modules": [module]})
    x = (
        np.array([[1, 4, 7]])
        if module == "embed_tokens"
        else np.random.default_rng(3).normal(size=(2, 3, 16)).astype(np.float32)
    )
    # gradients of lora_A (or lora_embedding_A) and the input only: B is frozen on both sides
    assert_vjp_like_reference(ours, ref, module, x, TOL)
    before = np.array(ours.engine.model(IDS))
    ours.merge()
    ref.merge()
    assert rel_err(ours.engine.base_weight(module), ref.engine.base_weight(module)) <= TOL
    assert rel_err(np.array(ours.engine.model(IDS)), before) <= TOL


def sgd_step(model: peftdecl.AdaptedModel, compiled: bool = False) -> dict[str, np.ndarray]:
    """One SGD step on next-token cross-entropy through ``nn.value_and_grad``; returns the gradients by path."""
    mlx_model = model.engine.model
    grads_seen: dict[str, Any] = {}

    def loss_fn(ids: mx.array) -> mx.array:
        return nn.losses.cross_entropy(mlx_model(ids[:, :-1]), ids[:, 1:]).mean()

    value_and_grad = nn.value_and_grad(mlx_model, loss_fn)
    opt = optim.SGD(learning_rate=0.5)
    opt.init(mlx_model.trainable_parameters())

    def step(ids: mx.array) -> Any:
        _, grads = value_and_grad(ids)
        opt.update(mlx_model, grads)
        return grads

    if compiled:
        state = [mlx_model.state, opt.state]
        step = mx.compile(step, inputs=state, outputs=state)
    grads_seen = dict(tree_flatten(step(IDS)))
    mx.eval(mlx_model.state, opt.state, grads_seen)
    return {k: np.array(v) for k, v in grads_seen.items()}


def test_mica_training_step_moves_a_and_leaves_b() -> None:
    model = peftdecl.attach(Tiny(), {**MICA, "target_modules": ["q_proj", "embed_tokens"]}, seed=1)
    assert set(model.trainable_parameters()) == {"q_proj.lora_A.weight", "embed_tokens.lora_embedding_A"}
    before = model.state_dict()
    grads = sgd_step(model)
    assert set(grads) == {
        "q_proj.adapters.default.lora_A.weight",
        "embed_tokens.adapters.default.lora_embedding_A",
    }
    after = model.state_dict()
    for key in ("q_proj.lora_B.weight", "embed_tokens.lora_embedding_B"):
        np.testing.assert_array_equal(after[key], before[key])
    for key in ("q_proj.lora_A.weight", "embed_tokens.lora_embedding_A"):
        assert np.abs(after[key] - before[key]).max() > 0, key


def numpy_draws(n: int, in_features: int, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(r, r))
    return rng.normal(size=(n, in_features, r)), x @ x.T, rng.normal(size=n)


def as_mlx(draws: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[Any, Any, Any]:
    z_mvn, wishart, z_dirichlet = draws
    return (
        mx.array(z_mvn.astype(np.float32)),
        mx.array(np.diag(wishart).astype(np.float32)),
        mx.array(z_dirichlet.astype(np.float32)),
    )


def test_monteclora_perturbed_a_and_its_gradients_match_numpy_math() -> None:
    from peftdecl_mlx.kinds.monteclora import perturbed_a

    rng = np.random.default_rng(0)
    r, n, width, scaler = 3, 4, 5, 0.7
    a, std, prior = rng.normal(size=(r, width)), rng.uniform(size=r), rng.uniform(size=n)
    cotangent = rng.normal(size=(r, width))
    draws = numpy_draws(n, width, r)
    var, noise = noise_columns(std, draws[1], draws[0], scaler)
    weights = expert_weights(prior, draws[2])
    expected = np.einsum("n,nij->ij", weights, a.T[None] + noise).T
    g = mx.array(cotangent.astype(np.float32))

    def loss(a_, std_, prior_):
        a_eff, v, w = perturbed_a(a_, std_, prior_, as_mlx(draws), scaler)
        return mx.sum(a_eff * g), (a_eff, v, w)

    args = [mx.array(t.astype(np.float32)) for t in (a, std, prior)]
    (_, (a_eff, v, w)), grads = mx.value_and_grad(loss, argnums=(0, 1, 2))(*args)
    assert rel_err(np.array(a_eff), expected) <= TOL
    assert rel_err(np.array(v), np.diag(var)) <= TOL
    assert rel_err(np.array(w), weights) <= TOL
    for got, want in zip(grads, perturbed_a_grads(a, cotangent, std, prior, draws, scaler), strict=True):
        assert rel_err(np.array(got), want) <= TOL


def shared_monteclora_draws(monkeypatch: pytest.MonkeyPatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same fixed draws per width in the NumPy reference's and the MLX backend's MonteCLoRA; returns those of
    q_proj (r 2, 3 samples, in 16)."""
    import peftdecl_mlx.kinds.monteclora as mlx_kind
    import peftdecl_numpy.kinds.monteclora as numpy_kind

    monkeypatch.setattr(numpy_kind, "draw_noise", lambda rng, n, width, r: numpy_draws(n, width, r))
    monkeypatch.setattr(mlx_kind, "draw", lambda generator, n, width, r: as_mlx(numpy_draws(n, width, r)))
    return numpy_draws(3, 16, 2)


def test_monteclora_training_layer_matches_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    draws = shared_monteclora_draws(monkeypatch)
    ours, ref = twin(Tiny(), MONTECLORA)
    ours.train()
    ref.train()
    x = np.random.default_rng(3).normal(size=(2, 3, 16)).astype(np.float32)
    # dL/dx, A, B and both priors (through the noise and the sample weights) against the explicit backward
    assert_vjp_like_reference(ours, ref, "q_proj", x, TOL)
    mine, theirs = ours.state_dict(), ref.state_dict()
    std, prior = theirs[f"q_proj.{STD_PRIOR}"], theirs[f"q_proj.{EXPERT_PRIOR}"]
    var, _ = noise_columns(std, draws[1], draws[0], 0.5)
    for key, want in ((VAR_PRIOR, var), (EXPERT_WEIGHTS, expert_weights(prior, draws[2]))):
        assert rel_err(mine[f"q_proj.{key}"], want) <= TOL, key  # the buffers keep the draw
        assert rel_err(mine[f"q_proj.{key}"], theirs[f"q_proj.{key}"]) <= TOL, key
    ours.eval()
    ref.eval()
    assert_vjp_like_reference(ours, ref, "q_proj", x, TOL)  # evaluation: LoRA's output, no draw


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_monteclora_training_step_trains_priors_not_buffers(
    monkeypatch: pytest.MonkeyPatch, compiled: bool
) -> None:
    draws = shared_monteclora_draws(monkeypatch)
    model = peftdecl.attach(Tiny(), MONTECLORA, seed=1)
    model.train()
    sampler = "q_proj.adapters.default.lora_monteclora_sampler"
    before = model.state_dict()
    grads = sgd_step(model, compiled)
    assert set(grads) == {
        "q_proj.adapters.default.lora_A.weight",
        "q_proj.adapters.default.lora_B.weight",
        f"{sampler}.std_prior",
        f"{sampler}.expert_weights_prior",
    }
    assert all(np.abs(g).max() > 0 for g in grads.values())
    after = model.state_dict()
    # the frozen buffers are no optimizer's business: they hold the step's draw, computed from the priors before it
    var, _ = noise_columns(before[f"q_proj.{STD_PRIOR}"], draws[1], draws[0], 0.5)
    assert rel_err(after[f"q_proj.{VAR_PRIOR}"], var) <= TOL
    weights = expert_weights(before[f"q_proj.{EXPERT_PRIOR}"], draws[2])
    assert rel_err(after[f"q_proj.{EXPERT_WEIGHTS}"], weights) <= TOL


def test_monteclora_noise_comes_from_the_engine_generator() -> None:
    model = peftdecl.attach(Tiny(), MONTECLORA, seed=1)
    model.train()
    state = model.engine.get_rng_state()
    first, second = np.array(model.engine.model(IDS)), np.array(model.engine.model(IDS))
    assert np.abs(first - second).max() > 0  # a new draw per call
    model.engine.set_rng_state(state)
    np.testing.assert_array_equal(np.array(model.engine.model(IDS)), first)
    model.eval()
    np.testing.assert_array_equal(np.array(model.engine.model(IDS)), np.array(model.engine.model(IDS)))


def test_monteclora_loss_and_its_gradients_through_the_draw(monkeypatch: pytest.MonkeyPatch) -> None:
    shared_monteclora_draws(monkeypatch)
    spec = {**MONTECLORA, "target_modules": ["q_proj", "down_proj"]}
    spec["monteclora_config"] = {**spec["monteclora_config"], "use_entropy": True, "kl_loss_weight": 0.3}
    model = peftdecl.attach(Tiny(), spec, seed=1)
    model.train()
    config = model.spec().monteclora_config
    start = {k: v.astype(np.float64) for k, v in model.state_dict().items()}
    widths = {"q_proj": 16, "down_proj": 12}

    def reference(priors: dict[str, np.ndarray]) -> float:
        """The mean over layers of the NumPy regulariser of each layer's draw, from the priors (float64)."""
        total = 0.0
        for module, width in widths.items():
            z_mvn, wishart, z_dirichlet = numpy_draws(3, width, 2)
            std, prior = priors[f"{module}.{STD_PRIOR}"], priors[f"{module}.{EXPERT_PRIOR}"]
            var, _ = noise_columns(std, wishart, z_mvn, 0.5)
            weights = expert_weights(prior, z_dirichlet)
            total += regulariser(std, prior, var, weights, 0.3, config.dirichlet_prior, True)
        return total / len(widths)

    mlx_model = model.engine.model

    def loss_fn(ids: mx.array) -> mx.array:
        out = mlx_model(ids)  # the training forward draws; the loss reads that draw
        return 0.0 * mx.sum(out) + model._get_monteclora_loss()

    value, grads = nn.value_and_grad(mlx_model, loss_fn)(IDS)
    by_path = dict(tree_flatten(grads))
    priors = {k: v for k, v in start.items() if k.endswith(("std_prior", "expert_weights_prior"))}
    assert rel_err(np.array(value), reference(priors)) <= TOL
    step = 1e-6
    for key, tensor in priors.items():
        numeric = np.zeros_like(tensor)
        for i in range(tensor.size):
            shift = np.zeros_like(tensor)
            shift.flat[i] = step
            up, down = {**priors, key: tensor + shift}, {**priors, key: tensor - shift}
            numeric.flat[i] = (reference(up) - reference(down)) / (2 * step)
        module, tensor_name = key.split(".", 1)
        got = np.array(by_path[f"{module}.adapters.default.{tensor_name}"])
        assert rel_err(got, numeric) <= 1e-4, key
    model.eval()
    assert model._get_monteclora_loss() == 0.0

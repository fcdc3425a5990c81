"""Tiny MLX models for the MLX backend tests (mlx[cpu] is slow on Linux: every size here is tiny)."""

from __future__ import annotations

from typing import Any

import numpy as np

mx = __import__("pytest").importorskip("mlx.core")
nn = __import__("pytest").importorskip("mlx.nn")
tree_flatten = __import__("pytest").importorskip("mlx.utils").tree_flatten

import peftdecl  # noqa: E402
from peftdecl.equiv import perturbed  # noqa: E402
from peftdecl_mlx.inventory import numpy_model  # noqa: E402


class Tiny(nn.Module):
    """embed_tokens 13×16 -> q_proj 16→12 (bias) -> down_proj 12→16 -> lm_head 16→13."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        mx.random.seed(seed)
        self.embed_tokens = nn.Embedding(13, 16)
        self.q_proj = nn.Linear(16, 12, bias=True)
        self.down_proj = nn.Linear(12, 16, bias=False)
        self.lm_head = nn.Linear(16, 13, bias=False)
        mx.eval(self.parameters())

    def __call__(self, ids: mx.array) -> mx.array:
        return self.lm_head(self.down_proj(self.q_proj(self.embed_tokens(ids))))


def tiny_llama(seed: int = 0, **overrides: Any) -> Any:
    """An mlx-lm Llama: hidden 32, 2 layers, 4 heads / 2 KV heads, vocab 64."""
    from mlx_lm.models import llama

    mx.random.seed(seed)
    fields = dict(
        model_type="llama",
        hidden_size=32,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=64,
        tie_word_embeddings=False,
    )
    model = llama.Model(llama.ModelArgs(**{**fields, **overrides}))
    mx.eval(model.parameters())
    return model


def twin(
    model: Any, spec: Any, seed: int = 1, scale: float = 0.1, name: str = "default", **engine_options: Any
) -> tuple[Any, Any]:
    """(MLX adapted model with ``engine_options``, NumPy reference) holding the same adapter numbers: the
    reference's seeded initialisation with its trainable tensors perturbed (so zero-initialised factors are
    exercised)."""
    state, layer_types, facts = numpy_model(model)
    ref = peftdecl.attach(state, spec, name=name, seed=seed, layer_types=layer_types, **facts)
    trainable = {k for k, p in ref.plan(name).param_specs().items() if p.role == "trainable"}
    arrays = perturbed(ref.state_dict(name), trainable, scale, seed)
    ref.delete_adapter(name)
    ref.add_adapter(name, spec, arrays=arrays, activate=True)
    ours = peftdecl.attach(model, spec, name=name, seed=seed, engine_options=engine_options)
    ours.delete_adapter(name)
    ours.add_adapter(name, spec, arrays=arrays, activate=True)
    return ours, ref


def shared_draws(monkeypatch: Any, seed: int) -> np.random.Generator:
    """Make the MLX engines' generators draw from a NumPy generator seeded like the reference's."""
    from peftdecl_mlx.generator import Generator

    rng = np.random.default_rng(seed)
    monkeypatch.setattr(
        Generator, "uniform", lambda self, shape: mx.array(rng.random(tuple(shape)), mx.float32)
    )
    monkeypatch.setattr(Generator, "permutation", lambda self, n: [int(i) for i in rng.permutation(n)])
    monkeypatch.setattr(Generator, "integers", lambda self, high: int(rng.integers(high)))
    return rng


def assert_vjp_like_reference(
    ours: Any, ref: Any, module: str, x: np.ndarray, tol: float, seed: int = 1
) -> None:
    """One layer's output and the gradients of its inputs and adapter tensors for a random cotangent (``seed``):
    the MLX engine's vector-Jacobian product against the NumPy reference's explicit backward, relative ≤ ``tol``."""
    from tests.conftest import rel_err

    y_ref, tape = ref.engine.layer_forward(module, x)
    dy = np.random.default_rng(seed).normal(size=y_ref.shape)
    grads_ref = ref.engine.layer_backward(module, tape, dy)
    y, grads = ours.engine.layer_vjp(module, x, dy)
    assert rel_err(y, y_ref) <= tol
    expected = {k for k, v in grads_ref.items() if v is not None}
    assert set(grads) == expected
    for key in expected:
        assert rel_err(grads[key], grads_ref[key]) <= tol, key


class Mlp(nn.Module):
    """lin0 (in → hidden), ReLU, lin1 (hidden → out): the small MLP of the initialisation tests."""

    def __init__(self, sizes: tuple[int, int, int]) -> None:
        super().__init__()
        self.lin0 = nn.Linear(sizes[0], sizes[1])
        self.lin1 = nn.Linear(sizes[1], sizes[2])

    def __call__(self, x: mx.array) -> mx.array:
        return self.lin1(nn.relu(self.lin0(x)))


def mlx_mlp(sizes: tuple[int, int, int] = (12, 16, 10), seed: int = 0) -> tuple[Mlp, dict[str, np.ndarray]]:
    """A seeded :class:`Mlp` and its parameters as a float64 state dict (the NumPy reference's twin)."""
    mx.random.seed(seed)
    model = Mlp(sizes)
    return model, {k: np.array(v, dtype=np.float64) for k, v in tree_flatten(model.parameters())}

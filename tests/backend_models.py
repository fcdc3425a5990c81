"""One layer description (tests/layer_cases.py's ``Layer``: base tensor shapes, layer type, input shape) built as
each backend's base model, and what the kind tests need from each backend through public API only: a forward
and the gradients of the layer output for a given cotangent.

NumPy: the state dict itself (plus ``layer_types``), gradients by the engine's explicit ``layer_forward`` /
``layer_backward``. torch: a module with one child per adapted module (``nn.Linear``, ``nn.Embedding``,
``nn.Conv1d``/``nn.Conv2d``, transformers' GPT-2 ``Conv1D``), gradients by autograd. MLX: ``nn.Linear`` /
``nn.Embedding`` children, gradients by ``mx.value_and_grad``. Every driver imports its framework only when used,
so this module loads with only NumPy installed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import numpy as np
import pytest

import peftdecl
from tests.layer_cases import Layer, outer_modules

Grads = dict[str, np.ndarray]
"""dL/d(tensor) by the tensor's key in ``trainable_parameters()`` (``"input"``: dL/dx; none for token ids)."""


def modules(layer: Layer) -> list[str]:
    """The adapted modules of a layer description (``m``, and VeRA's second layer ``n``)."""
    return outer_modules(layer.shapes)


def layer_type(layer: Layer) -> str:
    """The IR layer type name (``linear`` when the description leaves it to the weight's rank)."""
    kind = layer.layer_type
    return "linear" if kind is None else kind if isinstance(kind, str) else kind["type"]


def float32_state(layer: Layer, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random base tensors that float32 represents exactly, so a float32 backend starts from the same numbers."""
    return {k: v.astype(np.float32).astype(np.float64) for k, v in layer.random_state(rng).items()}


def float32_input(layer: Layer, rng: np.random.Generator) -> np.ndarray:
    x = layer.random_input(rng)
    return x if layer_type(layer) == "embedding" else x.astype(np.float32).astype(np.float64)


class NumpyDriver:
    """The reference's own backend: the base model is the state dict."""

    dtypes = ("float64",)

    def base(self, layer: Layer, state: Mapping[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
        return dict(state)

    def options(self, layer: Layer) -> dict[str, Any]:
        return {"layer_types": layer.layer_types()}

    def forward(self, model: peftdecl.AdaptedModel, x: np.ndarray, dtype: str) -> np.ndarray:
        return np.asarray(model("m", x))

    def vjp(
        self, model: peftdecl.AdaptedModel, x: np.ndarray, dy: np.ndarray, dtype: str
    ) -> tuple[np.ndarray, Grads]:
        y, tape = model.engine.layer_forward("m", x)
        return y, model.engine.layer_backward("m", tape, dy)


class TorchDriver:
    dtypes = ("float32", "float64")

    def __init__(self) -> None:
        self.torch = pytest.importorskip("torch")

    def _layer(self, layer: Layer, module: str, state: Mapping[str, np.ndarray]) -> Any:
        nn = self.torch.nn
        kind = layer_type(layer)
        if kind == "mha":
            heads = cast(dict, layer.layer_type)["num_heads"]
            return nn.MultiheadAttention(state[f"{module}.in_proj_weight"].shape[1], heads)
        weight, bias = state[f"{module}.weight"], f"{module}.bias" in state
        desc = layer.layer_type if isinstance(layer.layer_type, dict) else {}
        if kind == "linear":
            return nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
        if kind == "embedding":
            return nn.Embedding(*weight.shape)
        if kind == "gpt2_conv1d":
            conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
            return conv1d(weight.shape[1], weight.shape[0])  # weight stored [in, out]
        groups = desc.get("groups", 1)
        conv = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}[kind]
        return conv(
            weight.shape[1] * groups,
            weight.shape[0],
            weight.shape[2:],
            stride=desc.get("stride", 1),
            padding=desc.get("padding", 0),
            dilation=desc.get("dilation", 1),
            groups=groups,
            bias=bias,
        )

    def base(self, layer: Layer, state: Mapping[str, np.ndarray], dtype: str) -> Any:
        torch = self.torch

        attention = layer_type(layer) == "mha"

        class Holder(torch.nn.Module):
            def forward(self, x: Any) -> Any:
                return self.m(x, x, x, need_weights=False)[0] if attention else self.m(x)

        holder = Holder()
        for module in modules(layer):
            setattr(holder, module, self._layer(layer, module, state))
        # strict=False: GPT-2's Conv1D always has a bias; one the description lacks stays zero (its initial value)
        holder.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=False)
        return holder.to(getattr(torch, dtype))

    def options(self, layer: Layer) -> dict[str, Any]:
        return {}

    def _input(self, x: np.ndarray, dtype: str) -> Any:
        if not np.issubdtype(x.dtype, np.floating):
            return self.torch.tensor(x)
        return self.torch.tensor(x, dtype=getattr(self.torch, dtype), requires_grad=True)

    def forward(self, model: peftdecl.AdaptedModel, x: np.ndarray, dtype: str) -> np.ndarray:
        with (
            self.torch.no_grad()
        ):  # inference may take other paths (e.g. LoRA's merged weight on many tokens)
            return model(self._input(x, dtype)).double().numpy()

    def vjp(
        self, model: peftdecl.AdaptedModel, x: np.ndarray, dy: np.ndarray, dtype: str
    ) -> tuple[np.ndarray, Grads]:
        xt = self._input(x, dtype)
        y = model(xt)
        assert str(y.dtype) == f"torch.{dtype}"
        params = model.trainable_parameters()
        for param in params.values():
            param.grad = None
        y.backward(self.torch.tensor(dy, dtype=y.dtype))
        grads = {k: p.grad.double().numpy() for k, p in params.items() if p.grad is not None}
        if xt.is_floating_point():
            grads["input"] = xt.grad.double().numpy()
        return y.detach().double().numpy(), grads

    def sgd(self, model: peftdecl.AdaptedModel, x: np.ndarray, dy: np.ndarray, lr: float, dtype: str) -> None:
        _, grads = self.vjp(model, x, dy, dtype)
        with self.torch.no_grad():
            for key, param in model.trainable_parameters().items():
                param -= lr * self.torch.tensor(grads[key], dtype=param.dtype)


class MlxDriver:
    dtypes = ("float32",)

    def __init__(self) -> None:
        self.mx = pytest.importorskip("mlx.core")
        self.nn = pytest.importorskip("mlx.nn")
        self.tree_flatten = pytest.importorskip("mlx.utils").tree_flatten

    def base(self, layer: Layer, state: Mapping[str, np.ndarray], dtype: str) -> Any:
        mx, nn = self.mx, self.nn

        class Holder(nn.Module):
            def __call__(self, x: Any) -> Any:
                return self.m(x)

        holder = Holder()
        for module in modules(layer):
            weight = state[f"{module}.weight"]
            if layer_type(layer) == "embedding":
                child = nn.Embedding(*weight.shape)
            else:
                child = nn.Linear(weight.shape[1], weight.shape[0], bias=f"{module}.bias" in state)
            setattr(holder, module, child)
        holder.load_weights([(k, mx.array(v, mx.float32)) for k, v in state.items()])
        mx.eval(holder.parameters())
        return holder

    def options(self, layer: Layer) -> dict[str, Any]:
        return {}

    def _input(self, x: np.ndarray) -> Any:
        return (
            self.mx.array(x) if not np.issubdtype(x.dtype, np.floating) else self.mx.array(x, self.mx.float32)
        )

    def forward(self, model: peftdecl.AdaptedModel, x: np.ndarray, dtype: str) -> np.ndarray:
        return np.array(model(self._input(x)), dtype=np.float64)

    def _grads(
        self, model: peftdecl.AdaptedModel, x: np.ndarray, dy: np.ndarray, restore: bool = True
    ) -> Any:
        """(the parameters differentiated, y, (their gradients, dL/dx or None)); ``restore=False`` leaves the
        module as the forward left it (COFT's forward stores its projection, as nn.value_and_grad leaves it)."""
        mx, holder = self.mx, model.base_model
        xa, dya = self._input(x), mx.array(dy, mx.float32)
        params = holder.trainable_parameters()
        wants_input = np.issubdtype(x.dtype, np.floating)

        def loss(p: Any, inputs: Any) -> tuple[Any, Any]:
            holder.update(p)
            out = holder(inputs)
            return mx.sum(out * dya), out

        try:  # one call: dropout draws are made once
            (_, y), grads = mx.value_and_grad(loss, argnums=(0, 1) if wants_input else 0)(params, xa)
        finally:
            if restore:
                holder.update(params)
        return params, y, grads if wants_input else (grads, None)

    def vjp(
        self, model: peftdecl.AdaptedModel, x: np.ndarray, dy: np.ndarray, dtype: str
    ) -> tuple[np.ndarray, Grads]:
        params, y, (param_grads, input_grad) = self._grads(model, x, dy)
        # the engine's flat {key: array} holds the very arrays of the module tree: name each gradient by identity
        keys = {id(value): key for key, value in model.trainable_parameters().items()}
        paths = dict(self.tree_flatten(params))
        grads = {keys[id(paths[path])]: np.array(g, np.float64) for path, g in self.tree_flatten(param_grads)}
        if input_grad is not None:
            grads["input"] = np.array(input_grad, np.float64)
        return np.array(y, np.float64), grads

    def sgd(self, model: peftdecl.AdaptedModel, x: np.ndarray, dy: np.ndarray, lr: float, dtype: str) -> None:
        from mlx.utils import tree_map

        _, _, (param_grads, _) = self._grads(model, x, dy, restore=False)
        holder = model.base_model
        holder.update(tree_map(lambda p, g: p - lr * g, holder.trainable_parameters(), param_grads))


class CupyDriver:
    """The CuPy backend (on a CUDA device): the state dict as for NumPy, computed in the dtype of the run
    (``base`` keeps it for ``options``); inputs go in as NumPy, results come back as NumPy."""

    dtypes = ("float32", "float64")

    def __init__(self) -> None:
        self.cupy = pytest.importorskip("cupy")
        self.dtype = "float32"

    def base(self, layer: Layer, state: Mapping[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
        self.dtype = dtype
        return dict(state)

    def options(self, layer: Layer) -> dict[str, Any]:
        return {"layer_types": layer.layer_types(), "dtype": self.dtype}

    def forward(self, model: peftdecl.AdaptedModel, x: np.ndarray, dtype: str) -> np.ndarray:
        return np.asarray(self.cupy.asnumpy(model("m", x)), dtype=np.float64)

    def vjp(
        self, model: peftdecl.AdaptedModel, x: np.ndarray, dy: np.ndarray, dtype: str
    ) -> tuple[np.ndarray, Grads]:
        y, tape = model.engine.layer_forward("m", x)
        grads = model.engine.layer_backward("m", tape, dy)
        host = {
            k: np.asarray(self.cupy.asnumpy(v), dtype=np.float64) for k, v in grads.items() if v is not None
        }
        return np.asarray(self.cupy.asnumpy(y), dtype=np.float64), host

    def sgd(self, model: peftdecl.AdaptedModel, x: np.ndarray, dy: np.ndarray, lr: float, dtype: str) -> None:
        _, grads = self.vjp(model, x, dy, dtype)
        for key, param in model.trainable_parameters().items():
            param -= lr * self.cupy.asarray(grads[key], dtype=param.dtype)


Driver = NumpyDriver | TorchDriver | MlxDriver | CupyDriver
DRIVERS: dict[str, type[Driver]] = {
    "numpy": NumpyDriver,
    "torch": TorchDriver,
    "mlx": MlxDriver,
    "cupy": CupyDriver,
}


def driver(backend: str) -> Driver:
    """The driver of ``backend`` (a skip when its framework is not installed or it has no driver here)."""
    if backend not in DRIVERS:
        pytest.skip(f"tests/backend_models.py has no driver for the {backend} backend")
    return DRIVERS[backend]()

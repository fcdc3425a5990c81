"""Looking inside an MLX engine: each adapted layer's input and output on a model call (``peftdecl equiv``) and one
layer's gradients by ``mx.value_and_grad`` (the tests hold them against the NumPy reference's explicit backward)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np
import numpy.typing as npt

from peftdecl.backend import LayerCapture, trainable_key
from peftdecl_mlx.inventory import ParameterTree, flatten

if TYPE_CHECKING:
    from peftdecl_mlx.engine import MlxEngine
    from peftdecl_mlx.layer import AdaptedLayer


def to_numpy(value: mx.array) -> np.ndarray:
    """A concrete NumPy copy (bfloat16, which NumPy cannot hold, widened to float32)."""
    if value.dtype == mx.bfloat16:
        value = value.astype(mx.float32)
    return np.array(value)


def capture(engine: MlxEngine, input_ids: np.ndarray) -> tuple[np.ndarray | None, LayerCapture]:
    """Run the model on ``input_ids`` and return (logits, {adapted module: (its first input, its first output)})."""
    layers = engine.layers
    for layer in layers.values():
        layer.adapter_state.capture = []
    try:
        out = engine.forward(mx.array(np.asarray(input_ids)))
        records = {m: layer.adapter_state.capture for m, layer in layers.items()}
        mx.eval(out, [pair for rec in records.values() for pair in rec or ()])
    finally:
        for layer in layers.values():
            layer.adapter_state.capture = None
    found = {m: (to_numpy(rec[0][0]), to_numpy(rec[0][1])) for m, rec in records.items() if rec}
    logits = to_numpy(out) if isinstance(out, mx.array) else None
    return logits, found


def layer_vjp(
    engine: MlxEngine, layer: AdaptedLayer, x: npt.ArrayLike, dy: npt.ArrayLike, active: tuple[str, ...]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(y, grads) of one adapted layer for the loss Σ y ⊙ dy: ``"input"`` -> dL/dx (not for embeddings) and each
    trainable tensor's full IR key (``"<adapter>/<key>"`` while several are ``active``, as the NumPy engine keys
    them) -> its gradient."""
    if layer.layer_type == "embedding":
        inputs = mx.array(np.asarray(x))
    else:
        inputs = mx.array(np.asarray(x), dtype=engine.adapter_dtype)
    cotangent = mx.array(np.asarray(dy), dtype=mx.float32)
    original = layer.trainable_parameters()
    wants_input = layer.layer_type != "embedding"

    def loss(params: ParameterTree, xs: mx.array) -> tuple[mx.array, mx.array]:
        layer.update(params)
        out = layer(xs)
        return mx.sum(out.astype(mx.float32) * cotangent), out

    try:  # one call, so that dropout draws are made once
        (_, y), grads = mx.value_and_grad(loss, argnums=(0, 1) if wants_input else 0)(original, inputs)
    finally:
        layer.update(original)
    param_grads, input_grad = grads if wants_input else (grads, None)
    out = {}
    for path, value in flatten(param_grads):
        _, name, tensor = path.split(".", 2)  # adapters.<name>.<IR tensor name>
        out[trainable_key(name, f"{layer.module_name}.{tensor}", active)] = value
    if input_grad is not None:
        out["input"] = input_grad
    mx.eval(y, list(out.values()))
    return to_numpy(y), {k: to_numpy(v) for k, v in out.items()}

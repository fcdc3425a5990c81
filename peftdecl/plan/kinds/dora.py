"""DoRA layout: LoRA's A and B plus a magnitude m per output row, initialised to m = ‖W + s·B A‖_row.

The row norm never forms B·A: ‖W + sBA‖²_o = ‖W_o‖² + 2s·Σ_r B_or (W Aᵀ)_or + s²·Σ_r B_or (B (A Aᵀ))_or, which
needs only ‖W‖², W·Aᵀ (out × r) and A·Aᵀ (r × r).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from peftdecl.init import register_external_source
from peftdecl.plan.ir import Init, LayerInfo, LayerPlan, ModelInfo, ParamSpec
from peftdecl.plan.kinds import KindLayout
from peftdecl.plan.kinds.lora import build_lora_layer
from peftdecl.spec.lora import LoraSpec

MAGNITUDE = "lora_magnitude_vector"
MAGNITUDE_SOURCE = "dora_magnitude"


def magnitude_shape(layer: LayerInfo) -> tuple[int, ...]:
    """HF PEFT's shape of m: (out,) for Linear/Conv1D, (dim,) for Embedding, (1, out, 1, ...) for ConvNd."""
    if layer.is_conv:
        return (1, layer.out_features, *(1,) * len(layer.kernel_size))
    return (layer.out_features,)


def direction_rows(
    layer: LayerInfo, weight: np.ndarray, p: Mapping[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """2-D views (W [rows, cols], A [r, cols], B [rows, r]) whose rows are the directions DoRA normalises.

    Convolutions flatten every axis but the output channel; an embedding's rows are its dimensions, so the
    norm runs over the vocabulary (W = Eᵀ, since the IR stores E as [num_embeddings, dim])."""
    if layer.type == "embedding":
        return weight.T, p["lora_embedding_A"], p["lora_embedding_B"]
    a, b = p["lora_A.weight"], p["lora_B.weight"]
    r = a.shape[0]
    return weight.reshape(weight.shape[0], -1), a.reshape(r, -1), b.reshape(b.shape[0], r)


def factored_row_norm(w: np.ndarray, a: np.ndarray, b: np.ndarray, scaling: float) -> np.ndarray:
    """‖W + s·B A‖ per row of 2-D W, without forming B A (memory O(rows·r) beyond W itself).

    Cancellation limits the precision to about eps·‖W_o‖²/n_o² relative; a sum that rounds below zero is 0."""
    squared: np.ndarray = (
        np.einsum("oi,oi->o", w, w)
        + 2.0 * scaling * np.einsum("or,or->o", b, w @ a.T)
        + scaling * scaling * np.einsum("or,or->o", b, b @ (a @ a.T))
    )
    norm: np.ndarray = np.sqrt(np.maximum(squared, 0.0))
    return norm


def grouped_norm_direction(a: np.ndarray, b: np.ndarray, rows: int) -> np.ndarray:
    """HF PEFT's "B A" of a grouped conv's norm: (B as [−1, r]) · (A as [r, −1]) laid out as [rows, −1].

    B is [out, r/G, 1, ...], so this is not ΔW / s (which connects all of ``in`` to each output channel and has
    no grouped layout); PEFT 0.21 normalises with it all the same, so m and the outputs follow it."""
    r = a.shape[0]
    product: np.ndarray = (b.reshape(-1, r) @ a.reshape(r, -1)).reshape(rows, -1)
    return product


def dora_weight_norm(lp: LayerPlan, weight: np.ndarray, p: Mapping[str, np.ndarray]) -> np.ndarray:
    """n = ‖W + s·ΔW‖ per direction row of the layer (a flat vector, one entry per entry of m); on a grouped
    conv ΔW is :func:`grouped_norm_direction` (as HF PEFT)."""
    if lp.layer.is_conv and lp.layer.groups > 1:
        w = weight.reshape(weight.shape[0], -1)
        delta = grouped_norm_direction(p["lora_A.weight"], p["lora_B.weight"], w.shape[0])
        direction = w + lp.scaling * delta
        norm: np.ndarray = np.linalg.norm(direction, axis=1)
        return norm
    w, a, b = direction_rows(lp.layer, weight, p)
    return factored_row_norm(w, a, b, lp.scaling)


def _initial_magnitude(weight: np.ndarray, lp: LayerPlan, own: Mapping[str, np.ndarray]) -> np.ndarray:
    # m starts at the norm of the adapted weight with the drawn A and B, so the adapter starts as plain LoRA
    return dora_weight_norm(lp, weight, own).reshape(lp.param(MAGNITUDE).shape)


register_external_source(MAGNITUDE_SOURCE, _initial_magnitude)


def build_dora_layer(spec: LoraSpec, module: str, layer: LayerInfo, info: ModelInfo) -> LayerPlan:
    """LoRA's layer plan with the magnitude tensor added and the execution kind set to ``dora``."""
    lora = build_lora_layer(spec, module, layer, info)
    magnitude = ParamSpec(
        MAGNITUDE, magnitude_shape(layer), "trainable", Init("external", source=MAGNITUDE_SOURCE)
    )
    return LayerPlan(
        module=module,
        layer=layer,
        kind="dora",
        params=(*lora.params, magnitude),
        r=lora.r,
        alpha=lora.alpha,
        scaling=lora.scaling,
        options=lora.options,
    )


LAYOUT = KindLayout(
    kind="dora",
    build_layer=build_dora_layer,
)

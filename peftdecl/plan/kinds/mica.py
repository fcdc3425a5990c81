"""MiCA layout (Minor Component Adaptation, HF PEFT's ``init_lora_weights="mica"``): LoRA's tensors with
B = the r left singular vectors of W with the smallest singular values, frozen, and A = 0.

W = U S Vᵀ (thin SVD, S descending, W the [out, in] weight; an embedding's W is Eᵀ, [dim, vocab]): B = U[:, −r:],
A = 0, so B A = 0 and the base weight is left as it is. Forward and merge are LoRA's (ΔW = s·B A); only A trains.
The sign of each column of U is LAPACK's choice; since B is saved with the adapter, a loaded adapter keeps its own.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from peftdecl.errors import TargetError
from peftdecl.init import register_external_source
from peftdecl.plan.ir import Init, LayerInfo, LayerPlan, ModelInfo, ParamSpec
from peftdecl.plan.kinds import KindLayout
from peftdecl.plan.kinds.lora import build_lora_layer
from peftdecl.spec.lora import LoraSpec

MINOR_SOURCE = "mica_minor_left_singular"


def minor_left_singular_vectors(weight: np.ndarray, r: int) -> np.ndarray:
    """U[:, −r:] of the thin SVD W = U S Vᵀ: the r left singular vectors of the smallest singular values."""
    u = np.linalg.svd(np.asarray(weight, dtype=np.float64), full_matrices=False)[0]
    return u[:, -r:]


def _projection(layer: LayerInfo, weight: np.ndarray) -> np.ndarray:
    # the matrix B multiplies from the left: W [out, in], or Eᵀ [dim, vocab] for an embedding (IR: E [vocab, dim])
    return weight.T if layer.type == "embedding" else weight.reshape(weight.shape[0], -1)


def _initial_b(weight: np.ndarray, lp: LayerPlan, own: Mapping[str, np.ndarray]) -> np.ndarray:
    return minor_left_singular_vectors(_projection(lp.layer, weight), lp.r)


register_external_source(MINOR_SOURCE, _initial_b)


def check_mica_layer(module: str, layer: LayerInfo, r: int) -> None:
    """MiCA needs a float weight (for its SVD) and r ≤ min(out, in), as in HF PEFT (the kind's declared layer
    types, linear, GPT-2 Conv1D and embedding, are PEFT's)."""
    if layer.quantization is not None:
        raise TargetError(
            f"{module}: init_lora_weights='mica' needs the float weight for its SVD, not a {layer.quantization} one"
        )
    limit = min(layer.in_features, layer.out_features)
    if r > limit:
        raise TargetError(
            f"{module}: init_lora_weights='mica' needs r <= min(in, out) = {limit} (B is r singular vectors of "
            f"the weight), got r={r}; lower $.r or this module's $.rank_pattern entry"
        )


def build_mica_layer(spec: LoraSpec, module: str, layer: LayerInfo, info: ModelInfo) -> LayerPlan:
    """LoRA's layer plan with A = 0, B the weight's minor left singular vectors (frozen), kind ``mica``."""
    lora = build_lora_layer(spec, module, layer, info)
    check_mica_layer(module, layer, lora.r)
    a_name, b_name = (
        ("lora_embedding_A", "lora_embedding_B")
        if layer.type == "embedding"
        else ("lora_A.weight", "lora_B.weight")
    )
    params = []
    for param in lora.params:
        if param.name == a_name:
            param = ParamSpec(a_name, param.shape, "trainable", Init("zeros"))
        elif param.name == b_name:
            param = ParamSpec(b_name, param.shape, "frozen", Init("external", source=MINOR_SOURCE))
        params.append(param)
    return LayerPlan(
        module=module,
        layer=layer,
        kind="mica",
        params=tuple(params),
        r=lora.r,
        alpha=lora.alpha,
        scaling=lora.scaling,
        options=lora.options,
    )


LAYOUT = KindLayout(kind="mica", build_layer=build_mica_layer)

"""KaSA (Wang et al., 2024) in the NumPy reference: y = W' x + b + s · B diag(d) A dropout(x), ΔW = s · B diag(d) A,
W' the base truncated to rank k − r when the adapter was attached (:mod:`peftdecl.lora_variants_init`).

It is LoRA with A' = diag(d) A: the forward runs LoRA's, and the chain rule through A' gives
dL/dA = diag(d) dL/dA' and dL/dd_i = Σ_j (dL/dA')_ij A_ij.
"""

from __future__ import annotations

import numpy as np

from peftdecl.plan import LayerPlan
from peftdecl.plan.kinds.kasa import DIAG
from peftdecl_numpy.kinds.base import Params, Tape
from peftdecl_numpy.kinds.lora import LoraOps
from peftdecl_numpy.layers import BaseLayer
from peftdecl_numpy.xp_ops import Array, namespace


def scaled_a(p: Params) -> dict[str, Array]:
    """The layer's tensors with A replaced by diag(d) A."""
    a, d = p["lora_A.weight"], p[DIAG]
    return {**p, "lora_A.weight": namespace(a).reshape(d, (-1, 1)) * a}


class KasaOps(LoraOps):
    kind = "kasa"

    def delta_record(self, lp: LayerPlan, layer: BaseLayer, p: Params, x: Array) -> tuple[Array, Tape]:
        return super().delta_record(lp, layer, scaled_a(p), x)

    def delta_backward(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, tape: Tape, d_delta: Array
    ) -> tuple[Array | None, Params]:
        dx, grads = super().delta_backward(lp, layer, scaled_a(p), tape, d_delta)
        grads = dict(grads)
        da_scaled = grads["lora_A.weight"]
        a, d = p["lora_A.weight"], p[DIAG]
        xp = namespace(a)
        grads[DIAG] = xp.sum(da_scaled * a, axis=1)
        grads["lora_A.weight"] = xp.reshape(d, (-1, 1)) * da_scaled
        return dx, grads

    def delta_weight(self, lp: LayerPlan, layer: BaseLayer, p: Params) -> Array:
        return super().delta_weight(lp, layer, scaled_a(p))


def torch_truncated(weight: np.ndarray, r: int) -> np.ndarray | None:
    """W without its r smallest singular components by torch's float32 SVD, HF PEFT's computation (None: torch is
    not installed). Imports torch only when called."""
    try:
        import torch
    except ImportError:
        return None
    u, s, vh = torch.linalg.svd(torch.from_numpy(np.asarray(weight)).to(torch.float32), full_matrices=False)
    keep = min(weight.shape) - r
    result: np.ndarray = ((u[:, :keep] * s[:keep]) @ vh[:keep]).double().numpy()
    return result


OPS = KasaOps()

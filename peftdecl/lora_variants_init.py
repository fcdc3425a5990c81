"""KaSA's rewrite of the base weight (HF PEFT 0.21): W = U S Vᵀ (thin SVD) loses its r smallest singular
components, W ← U_{:k−r} S_{:k−r} V_{:k−r}ᵀ with k = min(in, out). It runs when a KaSA adapter is attached and
again when one is loaded (PEFT saves only the adapter, so the base a loaded adapter expects is rebuilt)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

import numpy as np

from peftdecl.errors import PeftdeclError
from peftdecl.plan.ir import Plan

TORCH_SVD = "peftdecl_numpy.kinds.kasa:torch_truncated"
"""HF PEFT truncates with torch's float32 SVD; where torch is installed that very computation is used (as VeRA's
projections are drawn by torch), so a loaded adapter sees PEFT's base to the bit; NumPy's float64 SVD otherwise."""


def truncated(weight: np.ndarray, r: int) -> np.ndarray:
    """W without its r smallest singular components: torch's float32 SVD as HF PEFT runs it, else NumPy's."""
    module, _, name = TORCH_SVD.partition(":")
    try:
        via_torch = getattr(importlib.import_module(module), name)(weight, r)
    except ImportError:
        via_torch = None
    if via_torch is not None:
        found: np.ndarray = via_torch
        return found
    u, s, vh = np.linalg.svd(np.asarray(weight, dtype=np.float64), full_matrices=False)
    keep = min(weight.shape) - r
    result: np.ndarray = (u[:, :keep] * s[:keep]) @ vh[:keep]
    return result


def kasa_truncated_bases(plan: Plan, base_weight: Callable[[str], np.ndarray]) -> dict[str, np.ndarray]:
    """``<module>.weight`` -> the truncated base weight (IR layout) of every layer of a KaSA plan; {} otherwise."""
    if plan.kind != "kasa":
        return {}
    return {f"{lp.module}.weight": truncated(base_weight(lp.module), lp.r) for lp in plan.layers}


def check_kasa_alone(attached: Mapping[str, Plan], plan: Plan) -> None:
    """Refuse mixing KaSA and non-KaSA adapters on one model, as HF PEFT does: KaSA rewrites the base weights, so
    every other adapter would see a different base depending on the order they were added in."""
    for name, other in attached.items():
        if (other.kind == "kasa") != (plan.kind == "kasa"):
            new = "uses" if plan.kind == "kasa" else "does not use"
            raise PeftdeclError(
                f"KaSA rewrites the base weights, so it cannot share a model with adapters that do not use it: the "
                f"new adapter {new} KaSA ($.kasa_config) and adapter {name!r} is {other.kind}"
            )

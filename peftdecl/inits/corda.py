"""CorDA (Yang et al. 2024): LoRA factors from the SVD of the weight times the covariance of its inputs, as HF PEFT
0.21 builds them.

With C the mean over calibration calls of XᵀX (X a call's inputs, in × samples as rows, divided by |max X|):
C' = C + λ·mean(diag C)·I, λ the first of 0.01, 0.02, 0.04, ... for which ‖C' C'⁻¹ − I‖_F < 0.05;
W C' = U S Vhᵀ (thin SVD), V = (Vh C'⁻¹)ᵀ, so W = U S Vᵀ. ``ipm`` keeps the first r triplets, ``kpm`` the last r.
Then, with s the layer's scale, A = √(S/s) Vᵀ (r × in), B = U √(S/s) (out × r) and W ← W − s·B A.

PEFT works in float32; here λ is chosen in float32 as PEFT chooses it (so that both pick the same damping) and the
rest is float64. The covariances are collected by the backend (``backends/peftdecl_torch/calibration.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from peftdecl.errors import SpecError, TargetError
from peftdecl.plan.ir import LayerPlan, Plan
from peftdecl.spec.loftq_corda import CordaConfig

CORDA_LAYER_TYPES = ("linear", "gpt2_conv1d")
"""The layers PEFT's preprocessing collects covariances for (nn.Linear and GPT-2's Conv1D)."""


@dataclass
class CordaEigens:
    """The kept singular triplets of W C': ``s`` (r), ``u`` (out × r), ``v`` (in × r, already times C'⁻¹)."""

    s: np.ndarray
    u: np.ndarray
    v: np.ndarray


def corda_settings(spec: object) -> CordaConfig:
    """The spec's ``corda_config``, or PEFT's defaults when it is null."""
    given = getattr(spec, "corda_config", None)
    return given if isinstance(given, CordaConfig) else CordaConfig()


def _damped(covariance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C', C'⁻¹) with the smallest damping 0.01·2^k whose float32 inverse is good to 0.05 (PEFT's rule and
    precision, so that the same λ is chosen), both in float64."""
    c32 = covariance.astype(np.float32)
    size = c32.shape[0]
    mean_diag = np.float32(np.mean(np.diag(c32), dtype=np.float32))
    damp = 0.01
    for _ in range(200):
        fixed = c32 + np.eye(size, dtype=np.float32) * np.float32(mean_diag * np.float32(damp))
        inverse = np.linalg.inv(fixed)
        if float(np.linalg.norm(fixed @ inverse - np.eye(size, dtype=np.float32))) < 0.05:
            fixed64 = np.asarray(covariance, dtype=np.float64) + np.eye(size) * float(mean_diag) * damp
            return fixed64, np.linalg.inv(fixed64)
        damp *= 2
    raise TargetError(f"CorDA: the covariance ({size}×{size}) stays singular however it is damped")


def corda_eigens(weight: np.ndarray, covariance: np.ndarray, rank: int, method: str) -> CordaEigens:
    """The ``rank`` triplets CorDA keeps for W (out × in) and its input covariance C (in × in): the largest
    (``ipm``) or the smallest (``kpm``) singular values of W C'."""
    if method not in ("ipm", "kpm"):
        raise SpecError([("$.corda_config.corda_method", f"must be 'ipm' or 'kpm', got {method!r}")])
    w = np.asarray(weight, dtype=np.float64)
    if covariance.shape != (w.shape[1], w.shape[1]):
        raise TargetError(
            f"CorDA: covariance of shape {list(covariance.shape)} does not fit a weight of shape {list(w.shape)}"
        )
    if not np.isfinite(covariance).all():
        raise TargetError("CorDA: the input covariance holds inf or NaN; check the calibration data")
    fixed, inverse = _damped(np.asarray(covariance, dtype=np.float64))
    u, s, vh = np.linalg.svd(w @ fixed, full_matrices=False)
    v = (vh @ inverse).T
    keep = slice(None, rank) if method == "ipm" else slice(-rank, None)
    return CordaEigens(s=s[keep].copy(), u=u[:, keep].copy(), v=v[:, keep].copy())


def corda_factors(eigens: CordaEigens, scaling: float) -> tuple[np.ndarray, np.ndarray]:
    """A = √(S/s) Vᵀ (r × in) and B = U √(S/s) (out × r), so that s·B A = U S Vᵀ restricted to the kept triplets."""
    root = np.sqrt(np.asarray(eigens.s, dtype=np.float64) / scaling)
    a = root[:, None] * np.asarray(eigens.v, dtype=np.float64).T
    b = np.asarray(eigens.u, dtype=np.float64) * root[None, :]
    return a, b


def check_eigens(layer: LayerPlan, eigens: CordaEigens) -> None:
    """The eigens fit the layer (a cache built for another model or rank does not)."""
    info, r = layer.layer, layer.r
    expected = {"u": (info.out_features, r), "s": (r,), "v": (info.in_features, r)}
    for name, shape in expected.items():
        got = tuple(np.shape(getattr(eigens, name)))
        if got != shape:
            raise TargetError(
                f"{layer.module}: CorDA's {name.upper()} has shape {list(got)}, the layer (r={r}) needs "
                f"{list(shape)}; preprocess_corda (or its cache_file) was built for another model or rank"
            )
        if not np.isfinite(np.asarray(getattr(eigens, name))).all():
            raise TargetError(f"{layer.module}: CorDA's {name.upper()} holds inf or NaN")


def corda_targets(plan: Plan) -> list[LayerPlan]:
    """The plan's layers CorDA initialises (PEFT collects covariances for Linear and Conv1D only)."""
    return [layer for layer in plan.layers if layer.layer.type in CORDA_LAYER_TYPES]


def eigens_for_plan(
    plan: Plan,
    covariances: Mapping[str, np.ndarray],
    base_weight: Callable[[str], np.ndarray],
    method: str,
) -> dict[str, CordaEigens]:
    """Each CorDA layer's eigens from its covariance and current base weight (IR layout), at the layer's rank."""
    found: dict[str, CordaEigens] = {}
    for layer in corda_targets(plan):
        if layer.module not in covariances:
            raise TargetError(f"{layer.module}: no input covariance collected for this layer")
        weight = np.asarray(base_weight(layer.module), dtype=np.float64)
        found[layer.module] = corda_eigens(weight, np.asarray(covariances[layer.module]), layer.r, method)
    return found

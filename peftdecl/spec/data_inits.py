"""Sub-configurations of LoRA's data-driven initialisations: ``eva_config`` (EVA) and ``lora_ga_config``
(LoRA-GA), with HF PEFT 0.21's field names, defaults and bounds (``EvaConfig``, ``LoraGAConfig``)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from peftdecl.spec.limits import MAX_DIM


class EvaConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Explained Variance Adaptation: A = the top right singular vectors of each layer's inputs, ranks
    redistributed across layers by explained variance (budget Σ r, at most round(rho·r) per layer)."""

    rho: Annotated[
        float,
        Meta(
            ge=1.0, le=1e9, description="A layer may receive up to round(rho·r) ranks (1: no redistribution)."
        ),
    ] = 2.0
    tau: Annotated[
        float,
        Meta(
            ge=0.0,
            le=1.0,
            description="A component has converged when its cosine similarity between two batches is >= tau.",
        ),
    ] = 0.99
    use_label_mask: Annotated[
        bool, Meta(description="Leave out the positions whose label is label_mask_value.")
    ] = True
    label_mask_value: int = -100
    whiten: Annotated[bool, Meta(description="Divide each component by the root of its singular value.")] = (
        False
    )
    adjust_scaling_factors: Annotated[
        bool, Meta(description="alpha × new_r / r where a layer's rank changes, so that s stays the same.")
    ] = True


class LoraGAConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """LoRA-GA: A and B from the SVD of each layer's averaged gradient G = U S Vᵀ (top 2r), W ← W − s·BA."""

    direction: Annotated[
        Literal["ArBr", "A2rBr", "ArB2r", "random"],
        Meta(
            description="Which of the 2r singular pairs go to A (rows of Vᵀ) and B (columns of U·S): ArBr odd/even, "
            "A2rBr [r:2r]/[:r], ArB2r [:r]/[r:2r], random: r of the 2r, the same for both."
        ),
    ] = "ArB2r"
    scale: Annotated[
        Literal["stable", "weight_svd", "gd_scale", "unit"],
        Meta(
            description="stable: B × out^(1/4)/√gamma; weight_svd: B × σ₁(W)/S_B[0]; gd_scale: A, B ÷ s; unit: none."
        ),
    ] = "stable"
    stable_gamma: Annotated[int, Meta(ge=1, le=MAX_DIM, description="gamma of the 'stable' scale.")] = 16

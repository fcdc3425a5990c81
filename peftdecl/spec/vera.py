"""VeRA: y = W x + λ_b ⊙ B (λ_d ⊙ A x), with A and B random, frozen and shared by every layer."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta

from peftdecl.spec._base import (
    Finite,
    LayersPattern,
    LayersToTransform,
    Probability,
    Rank,
    SpecBase,
    TargetModules,
    bias_help,
    targeting_problems,
)
from peftdecl.spec.limits import MAX_INT64, MIN_INT


class VeraSpec(SpecBase, tag="VERA", frozen=True):
    """Vector-based random matrix adaptation: only the scaling vectors λ_d ∈ R^r and λ_b ∈ R^out train."""

    r: Annotated[Rank, Meta(description="Rank of the shared projections.")] = 256
    target_modules: TargetModules = None
    projection_prng_key: Annotated[
        int, Meta(ge=MIN_INT, le=MAX_INT64, description="Seed of torch's CPU generator for A and B.")
    ] = 0
    save_projection: Annotated[bool, Meta(description="Store A and B in the adapter file.")] = True
    vera_dropout: Probability = 0.0
    d_initial: Annotated[Finite, Meta(description="Initial value of λ_d.")] = 0.1
    fan_in_fan_out: bool = False
    bias: Annotated[Literal["none", "all", "vera_only"], Meta(description=bias_help("vera_only"))] = "none"
    init_weights: Annotated[
        bool, Meta(description="true: λ_b = 0 (a no-op); false: λ_b = 1, λ_d random.")
    ] = True
    layers_to_transform: LayersToTransform = None
    layers_pattern: LayersPattern = None

    def cross_field_problems(self) -> list[tuple[str, str]]:
        return targeting_problems(self)

"""OFT and BOFT: a learned block-orthogonal rotation of the layer's input, y = W (R x) + b."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta

from peftdecl.spec._base import (
    ExcludeModules,
    LayersPattern,
    LayersToTransform,
    Probability,
    SpecBase,
    TargetModules,
    bias_help,
    targeting_problems,
)
from peftdecl.spec.limits import MAX_BUTTERFLY, MAX_FINITE, MAX_NEUMANN_TERMS, MAX_RANK


class OFTSpec(SpecBase, tag="OFT", frozen=True):
    """Orthogonal fine-tuning: R = blockdiag(R_1..R_n), each R_i the Cayley transform of a skew matrix."""

    r: Annotated[
        int,
        Meta(
            ge=0,
            le=MAX_RANK,
            description="Number of blocks; exactly one of r and oft_block_size is non-zero.",
        ),
    ] = 0
    oft_block_size: Annotated[
        int, Meta(ge=0, le=MAX_RANK, description="Block size; r · oft_block_size = in_features.")
    ] = 32
    module_dropout: Annotated[Probability, Meta(description="Replaces whole blocks by the identity.")] = 0.0
    target_modules: TargetModules = None
    fan_in_fan_out: bool = False
    bias: Annotated[Literal["none", "all", "oft_only"], Meta(description=bias_help("oft_only"))] = "none"
    exclude_modules: ExcludeModules = None
    init_weights: Annotated[bool, Meta(description="true: R = I (a no-op); false: random skew blocks.")] = (
        True
    )
    layers_to_transform: LayersToTransform = None
    layers_pattern: LayersPattern = None
    coft: Annotated[bool, Meta(description="Constrained OFT: project each block into ‖Q‖_F ≤ eps.")] = False
    eps: Annotated[float, Meta(gt=0.0, le=MAX_FINITE, description="COFT's bound on ‖Q‖_F.")] = 6e-05
    block_share: Annotated[bool, Meta(description="One rotation block shared by all blocks.")] = False
    use_cayley_neumann: Annotated[
        bool,
        Meta(
            description="Approximate the Cayley transform by a Neumann series (gives the transpose rotation)."
        ),
    ] = True
    num_cayley_neumann_terms: Annotated[
        int, Meta(ge=0, le=MAX_NEUMANN_TERMS, description="Terms of the Neumann series (0 and 1 give R = I).")
    ] = 5

    def cross_field_problems(self) -> list[tuple[str, str]]:
        found = targeting_problems(self)
        if (self.r == 0) == (self.oft_block_size == 0):
            found.append(("$.r", "exactly one of r and oft_block_size must be non-zero (set the other to 0)"))
        return found


class BOFTSpec(SpecBase, tag="BOFT", frozen=True):
    """Butterfly OFT: R = B_{N−1} ⋯ B_0, each B_i a permuted block-diagonal orthogonal matrix."""

    boft_block_size: Annotated[
        int, Meta(ge=0, le=MAX_RANK, description="Block size (exclusive with boft_block_num).")
    ] = 4
    boft_block_num: Annotated[
        int, Meta(ge=0, le=MAX_RANK, description="Number of blocks (exclusive with boft_block_size).")
    ] = 0
    boft_n_butterfly_factor: Annotated[
        int, Meta(ge=1, le=MAX_BUTTERFLY, description="Butterfly factors; 1 is plain OFT.")
    ] = 1
    target_modules: TargetModules = None
    exclude_modules: ExcludeModules = None
    boft_dropout: Annotated[Probability, Meta(description="Replaces whole blocks by the identity.")] = 0.0
    fan_in_fan_out: bool = False
    bias: Annotated[Literal["none", "all", "boft_only"], Meta(description=bias_help("boft_only"))] = "none"
    init_weights: Annotated[bool, Meta(description="true: R = I, s = 1 (a no-op); false: random.")] = True
    layers_to_transform: LayersToTransform = None
    layers_pattern: LayersPattern = None

    def cross_field_problems(self) -> list[tuple[str, str]]:
        found = targeting_problems(self)
        if (self.boft_block_size == 0) == (self.boft_block_num == 0):
            found.append(
                ("$.boft_block_size", "exactly one of boft_block_size and boft_block_num must be non-zero")
            )
        return found

"""LoHa and LoKr (the LyCORIS family): ΔW = (w1a w1b) ⊙ (w2a w2b) · alpha/r, or kron(w1, w2) · alpha/r."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta

from peftdecl.spec._base import (
    Alpha,
    AlphaPattern,
    ExcludeModules,
    LayersPattern,
    LayersToTransform,
    Probability,
    Rank,
    RankPattern,
    SpecBase,
    TargetModules,
    targeting_problems,
)
from peftdecl.spec.limits import MAX_RANK


class LycorisSpec(SpecBase, frozen=True):
    """The fields LoHa and LoKr share (not a kind itself: it has no ``peft_type``).

    ``init_weights`` is declared here with every value either kind accepts, so it keeps its place among the
    fields in both; LoHa narrows it to a bool.
    """

    rank_pattern: RankPattern = {}
    alpha_pattern: AlphaPattern = {}
    r: Annotated[Rank, Meta(description="Rank of each factor.")] = 8
    alpha: Annotated[Alpha, Meta(description="Scale numerator: s = alpha / r.")] = 8
    rank_dropout: Annotated[Probability, Meta(description="Drops rows of ΔW while training.")] = 0.0
    module_dropout: Annotated[Probability, Meta(description="Skips the whole adapter while training.")] = 0.0
    use_effective_conv2d: Annotated[
        bool, Meta(description="Conv kernels > 1 use CP-decomposed tensors (hada_t1, hada_t2).")
    ] = False
    target_modules: TargetModules = None
    exclude_modules: ExcludeModules = None
    init_weights: bool | Literal["lycoris"] = True
    layers_to_transform: LayersToTransform = None
    layers_pattern: LayersPattern = None

    def cross_field_problems(self) -> list[tuple[str, str]]:
        return targeting_problems(self)


class LoHaSpec(LycorisSpec, tag="LOHA", frozen=True):
    """Low-rank Hadamard product: ΔW = ((w1a · w1b) ⊙ (w2a · w2b)) · alpha / r."""

    init_weights: Annotated[bool, Meta(description="true: w2b = 0 (a no-op); false: all random.")] = True


class LoKrSpec(LycorisSpec, tag="LOKR", frozen=True):
    """Low-rank Kronecker product: ΔW = kron(w1, w2) · alpha / r, each factor full or low-rank."""

    decompose_both: Annotated[
        bool, Meta(description="Also factor w1 = w1_a w1_b when r is small enough.")
    ] = False
    decompose_factor: Annotated[
        int, Meta(ge=-1, le=MAX_RANK, description="Preferred first factor of each dimension; -1: near √dim.")
    ] = -1
    rank_dropout_scale: Annotated[
        bool, Meta(description="Renormalise the rank-dropout mask by its mean.")
    ] = False
    init_weights: Annotated[
        bool | Literal["lycoris"],
        Meta(description="true: w1 = 0; 'lycoris': w2 = 0; false: all random."),
    ] = True

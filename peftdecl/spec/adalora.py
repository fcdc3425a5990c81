"""AdaLoRA: ΔW = P (Λ ⊙ Q) · alpha / init_r, with singular-value triplets pruned by a rank budget while training."""

from __future__ import annotations

from typing import Annotated, ClassVar

from msgspec import Meta

from peftdecl.spec._base import Rank
from peftdecl.spec.limits import MAX_FINITE, MAX_STEPS
from peftdecl.spec.lora import LowRankSpec
from peftdecl.spec.lora_variants import VARIANT_FIELDS


class AdaLoraSpec(LowRankSpec, tag="ADALORA", frozen=True):
    """SVD-shaped LoRA whose per-layer rank shrinks from ``init_r`` to a total budget of ``target_r`` per layer."""

    rank_pattern: Annotated[
        dict[str, tuple[bool, ...]] | None,
        Meta(description="Written by training: the kept-rank mask of each layer's lora_E."),
    ] = None
    target_r: Annotated[Rank, Meta(description="Average rank per layer after pruning.")] = 8
    init_r: Annotated[Rank, Meta(description="Rank every layer starts with.")] = 12
    tinit: Annotated[int, Meta(ge=0, le=MAX_STEPS, description="Warm-up steps before pruning starts.")] = 0
    tfinal: Annotated[
        int, Meta(ge=0, le=MAX_STEPS, description="Final steps trained at the target budget.")
    ] = 0
    deltaT: Annotated[int, Meta(ge=1, le=MAX_STEPS, description="Steps between two budget allocations.")] = 1
    beta1: Annotated[float, Meta(ge=0.0, le=1.0, description="EMA factor of the sensitivity.")] = 0.85
    beta2: Annotated[float, Meta(ge=0.0, le=1.0, description="EMA factor of the uncertainty.")] = 0.85
    orth_reg_weight: Annotated[
        float, Meta(ge=0.0, le=MAX_FINITE, description="Weight of the orthogonality regulariser.")
    ] = 0.5
    total_step: Annotated[
        Annotated[int, Meta(ge=1, le=MAX_STEPS)] | None,
        Meta(description="Total training steps (required, > 0)."),
    ] = None

    UNSUPPORTED: ClassVar[dict[str, object]] = {
        **LowRankSpec.UNSUPPORTED,
        "use_dora": False,
        **dict.fromkeys(VARIANT_FIELDS),  # LoRA variants: AdaLoRA has none
    }

    @property
    def kind(self) -> str:
        return "adalora"

    def cross_field_problems(self) -> list[tuple[str, str]]:
        found = [p for p in super().cross_field_problems() if not p[0].startswith("$.rank_pattern")]
        if self.total_step is None or self.total_step <= 0:
            found.append(("$.total_step", "AdaLoRA needs total_step > 0 (the length of training)"))
        elif self.tinit >= self.total_step - self.tfinal:
            found.append(
                (
                    "$.tinit",
                    f"must be < total_step - tfinal = {self.total_step - self.tfinal} to leave pruning steps",
                )
            )
        return found

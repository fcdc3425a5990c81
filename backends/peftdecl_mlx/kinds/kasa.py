"""KaSA on MLX: LoRA with A' = diag(d) A, ΔW = s · B diag(d) A (the base truncated when the adapter was attached)."""

from __future__ import annotations

from peftdecl.plan import LayerPlan
from peftdecl.plan.kinds.kasa import DIAG
from peftdecl_mlx.kinds._additive import Params
from peftdecl_mlx.kinds._substituted import SubstitutedLora


class KasaOps(SubstitutedLora):
    kind = "kasa"

    def substitute(self, lp: LayerPlan, p: Params) -> Params:
        return {**p, "lora_A.weight": p[DIAG][:, None] * p["lora_A.weight"]}


OPS = KasaOps()

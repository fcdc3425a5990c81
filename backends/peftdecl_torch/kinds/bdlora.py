"""BD-LoRA (Wang et al., 2025) on torch: LoRA whose A or B is block-diagonal; the blocked factor is stored as its
n diagonal blocks stacked along the rows ([r, in / n] or [out, r / n]) and expanded with ``torch.block_diag``, so
autograd returns the gradient of the blocks only."""

from __future__ import annotations

import torch

from peftdecl.plan import LayerPlan
from peftdecl_torch.kinds._additive import Params
from peftdecl_torch.kinds._substituted import SubstitutedLora

_NAMES = {"A": "lora_A.weight", "B": "lora_B.weight"}


class BdLoraOps(SubstitutedLora):
    kind = "bdlora"

    def substitute(self, lp: LayerPlan, p: Params) -> Params:
        blocked = lp.options["blocked"]
        if not blocked:
            return p
        name = _NAMES[blocked]
        return {**p, name: torch.block_diag(*torch.chunk(p[name], lp.options["nblocks"], dim=0))}


OPS = BdLoraOps()

"""MiCA on torch: LoRA's math (y = W x + s · B A x, ΔW = s · B A); only the initial values and B's role differ,
and those come from the layout (peftdecl.plan.kinds.mica)."""

from __future__ import annotations

from peftdecl_torch.kinds.lora import LoraOps


class MicaOps(LoraOps):
    kind = "mica"


OPS = MicaOps()

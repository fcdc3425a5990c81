"""MiCA on MLX: LoRA's math (y = W x + s · B A x, ΔW = s · B A); only the initial values and B's frozen role
differ, and those come from the layout (peftdecl.plan.kinds.mica). B stays out of the trainable tree because
:class:`peftdecl_mlx.layer.AdapterParams` freezes each tensor by its own key."""

from __future__ import annotations

from peftdecl_mlx.kinds.lora import LoraOps


class MicaOps(LoraOps):
    kind = "mica"


OPS = MicaOps()

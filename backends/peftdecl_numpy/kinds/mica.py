"""MiCA on the NumPy reference: LoRA's math (y = W x + s · B A x, ΔW = s · B A); only the initial values and B's
frozen role differ, and those come from the layout (peftdecl.plan.kinds.mica)."""

from __future__ import annotations

from peftdecl.plan import LayerPlan
from peftdecl_numpy.kinds.base import Params, Tape
from peftdecl_numpy.kinds.lora import LoraOps
from peftdecl_numpy.layers import BaseLayer
from peftdecl_numpy.xp_ops import Array


class MicaOps(LoraOps):
    kind = "mica"

    def delta_backward(
        self, lp: LayerPlan, layer: BaseLayer, p: Params, tape: Tape, d_delta: Array
    ) -> tuple[Array | None, Params]:
        """LoRA's gradients of the trainable tensors only: B is frozen, so dL/dB is not one of them."""
        dx, grads = super().delta_backward(lp, layer, p, tape, d_delta)
        trainable = {spec.name for spec in lp.params if spec.role == "trainable"}
        return dx, {name: grad for name, grad in grads.items() if name in trainable}


OPS = MicaOps()

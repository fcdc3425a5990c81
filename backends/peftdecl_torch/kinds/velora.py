"""VeLoRA (Miles et al., 2024) on torch: LoRA's forward; while training with gradients on, u = h Aᵀ runs as
:class:`VeloraShrink`, which keeps for the backward only one number per group of input features (c_k = h_k · v)
instead of h, and rebuilds h_k ≈ scale · c_k v for dL/dA. dL/dh = dL/du A and dL/dB are exact. The math of the
compression and of the projection v is the NumPy reference's (:mod:`peftdecl_numpy.kinds.velora`).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F  # noqa: N812  (the torch idiom)

from peftdecl.plan import LayerPlan
from peftdecl.plan.kinds.velora import EMBED
from peftdecl_torch.kinds._additive import Params
from peftdecl_torch.kinds.lora import LoraOps, _add_expand

if TYPE_CHECKING:
    from peftdecl_torch.layer import AdaptedLayer


def sub_tokens(h: torch.Tensor, num_groups: int) -> torch.Tensor:
    """h [..., in] as [T, G, ⌈in / G⌉], the last group zero-padded."""
    width = h.shape[-1]
    g = -(-width // num_groups)
    return F.pad(h.reshape(-1, width), (0, num_groups * g - width)).reshape(-1, num_groups, g)


def unit(v: torch.Tensor) -> torch.Tensor:
    """v / ‖v‖ in float32 (the all-ones direction for v = 0), as HF PEFT normalises it."""
    v = v.float()
    norm = torch.linalg.vector_norm(v)
    if norm == 0:
        v = torch.ones_like(v)
        norm = torch.linalg.vector_norm(v)
    result: torch.Tensor = v / norm
    return result


class VeloraShrink(torch.autograd.Function):
    """u = h Aᵀ, saving c = groups(h) · v [T, G] rather than h; dA = duᵀ · scale · (c ⊗ v)[:, :in]."""

    @staticmethod
    def forward(
        ctx: Any, h: torch.Tensor, a: torch.Tensor, embed: torch.Tensor, num_groups: int, scale: float
    ) -> torch.Tensor:
        ctx.h_shape, ctx.scale = h.shape, scale
        compressed = sub_tokens(h, num_groups) @ embed.to(h.dtype)
        ctx.save_for_backward(compressed, a, embed)
        return F.linear(h, a)

    @staticmethod
    def backward(ctx: Any, du: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        compressed, a, embed = ctx.saved_tensors
        du2 = du.reshape(-1, du.shape[-1])
        dh = da = None
        if ctx.needs_input_grad[0]:
            dh = (du2 @ a.to(du2.dtype)).reshape(ctx.h_shape)
        if ctx.needs_input_grad[1]:
            in_features = ctx.h_shape[-1]
            rebuilt = (compressed.to(du2.dtype).unsqueeze(-1) * embed.to(du2.dtype)).reshape(
                compressed.shape[0], -1
            )
            da = (du2.T @ (ctx.scale * rebuilt[:, :in_features])).to(a.dtype)
        return dh, da, None, None, None


class _Seen:
    """Projection tensors already set from a batch ('batch_average_once'), held weakly by identity."""

    def __init__(self) -> None:
        self._seen: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()

    def __contains__(self, tensor: torch.Tensor) -> bool:
        return self._seen.get(id(tensor)) is tensor

    def add(self, tensor: torch.Tensor) -> None:
        self._seen[id(tensor)] = tensor


class VeloraOps(LoraOps):
    """LoRA's ops; in training with gradients on, the unfused path with :class:`VeloraShrink` for A."""

    kind = "velora"

    def __init__(self) -> None:
        self.seen = _Seen()

    def forward(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor) -> torch.Tensor:
        if layer.training and torch.is_grad_enabled():
            return self.unfused(lp, layer, p, x)
        return super().forward(lp, layer, p, x)

    def _apply(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor, result: torch.Tensor | None
    ) -> torch.Tensor:
        if not (layer.training and torch.is_grad_enabled()):
            return super()._apply(lp, layer, p, x, result)
        h = layer.dropout(x, lp.options["dropout"])
        a, b, embed = p["lora_A.weight"], p["lora_B.weight"], p[EMBED]
        h = h.to(a.dtype)
        self.update_projection(lp, h, embed)
        u = VeloraShrink.apply(h, a, embed, lp.options["num_groups"], lp.options["velora_scale"])
        if "lora_B.bias" in p:
            delta = lp.scaling * F.linear(u, b, p["lora_B.bias"])
            return delta if result is None else result + delta
        return _add_expand(result, u, b, lp.scaling)

    def update_projection(self, lp: LayerPlan, h: torch.Tensor, embed: torch.Tensor) -> None:
        """Set v in place from the batch's mean sub-token where the init type asks for it."""
        init = lp.options["init_type"]
        if init == "random" or (init == "batch_average_once" and embed in self.seen):
            return
        with torch.no_grad():
            mean = sub_tokens(h.detach(), lp.options["num_groups"]).reshape(-1, embed.shape[0]).mean(dim=0)
            embed.copy_(unit(mean).to(embed.dtype))
        self.seen.add(embed)


OPS = VeloraOps()

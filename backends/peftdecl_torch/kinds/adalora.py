"""AdaLoRA (Zhang et al., 2023) on torch: y = W x + b + s · P (Q ⊙ Λ) dropout(x), s = α / (init_r + 1e-5).

P = lora_B, Λ = lora_E (times the plan's kept-rank mask), Q = lora_A. On a conv2d Q is r × in·k·k and the adapter
is one convolution with ΔW = s · P (Q ⊙ Λ) reshaped to the kernel. ``orthogonal_regularizer`` is HF PEFT's
training-loss term w · mean over {Q, P} of ‖Q Qᵀ − I‖_F and ‖Pᵀ P − I‖_F, differentiable by autograd.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol, cast

import torch
import torch.nn.functional as F  # noqa: N812  (the torch idiom)

from peftdecl.plan import LayerPlan, Plan
from peftdecl.spec.adalora import AdaLoraSpec
from peftdecl_torch import cuda_kernels
from peftdecl_torch.kinds import _fused as fused
from peftdecl_torch.kinds._additive import AddedProduct, Params
from peftdecl_torch.kinds.lora import _add_expand, lora_linear

if TYPE_CHECKING:
    from peftdecl.model import AdaptedModel
    from peftdecl_torch.layer import AdaptedLayer


def singular_values(lp: LayerPlan, p: Params) -> torch.Tensor:
    """Λ with the triplets outside the rank mask removed."""
    mask = lp.options.get("rank_mask")
    e = p["lora_E"]
    return e if mask is None else e * torch.tensor(mask, dtype=e.dtype, device=e.device).reshape(-1, 1)


class AdaLoraOps(AddedProduct):
    """AdaLoRA's :class:`peftdecl.backend.AdditiveOps`: Δ(x) = s · P (Q ⊙ Λ) dropout(x)."""

    kind = "adalora"
    additive = True
    half_compute = True  # the fused Function may run float32 adapters in a half base dtype (_fused)

    @cuda_kernels.replaces("adalora_forward")
    def forward(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor) -> torch.Tensor:
        if fused.fusable(lp, layer, x, p["lora_A"].dtype, lp.options["dropout"], half_compute=True):
            return lora_linear(lp, layer, x, p["lora_A"] * singular_values(lp, p), p["lora_B"])
        return self.unfused(lp, layer, p, x)

    def _apply(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor, result: torch.Tensor | None
    ) -> torch.Tensor:
        h = layer.dropout(x, lp.options["dropout"])
        if lp.layer.is_conv:
            delta = layer.functional(h, self.delta_weight(lp, layer, p), None)
            return delta if result is None else result + delta
        qe = p["lora_A"] * singular_values(lp, p)
        return _add_expand(result, F.linear(h, qe), p["lora_B"], lp.scaling)

    def delta_weight(self, lp: LayerPlan, layer: AdaptedLayer, p: Params) -> torch.Tensor:
        delta = lp.scaling * (p["lora_B"] @ (p["lora_A"] * singular_values(lp, p)))
        return delta.reshape(lp.layer.weight_shape)


def orthogonal_regularizer(
    plan: Plan, params: Mapping[str, torch.Tensor], weight: float | None = None
) -> torch.Tensor:
    """w · mean(‖Q Qᵀ − I‖_F, ‖Pᵀ P − I‖_F over every layer), as HF PEFT adds to the training loss.

    ``params`` maps full keys to the live tensors (``AdaptedModel.trainable_parameters()``); triplets outside a
    layer's rank mask are left out, as in the pruned modules PEFT loads.
    """
    w = float(cast(AdaLoraSpec, plan.spec).orth_reg_weight if weight is None else weight)
    terms = []
    for lp in plan.layers:
        mask = lp.options.get("rank_mask")
        for name, rows in (("lora_A", True), ("lora_B", False)):
            key = lp.key(name)
            if key not in params:
                raise KeyError(f"orthogonal_regularizer: no tensor {key} among the parameters given")
            value = params[key]
            if mask is not None:
                kept = torch.tensor(mask, dtype=torch.bool, device=value.device)
                value = value[kept] if rows else value[:, kept]
            gram = value @ value.t() if rows else value.t() @ value
            eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            terms.append(torch.linalg.norm(gram - eye))
    return w * torch.stack(terms).mean() if terms else torch.zeros(())


OPS = AdaLoraOps()


RankPattern = dict[str, list[bool]]
"""``<module>.lora_E`` -> which of its init_r triplets are kept (HF PEFT's ``rank_pattern``)."""


class RankAllocating(Protocol):
    """A rank allocator over a backend's own arrays (the NumPy reference's ``RankAllocator`` is one)."""

    def update_and_allocate(
        self, step: int, params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor]
    ) -> tuple[int, RankPattern | None]: ...


def update_and_allocate(
    model: AdaptedModel, allocator: RankAllocating, step: int
) -> tuple[int, RankPattern | None]:
    """HF PEFT's ``update_and_allocate`` for a torch-backed AdaLoRA adapter: call it after ``backward()`` and before
    the gradients are cleared.

    ``allocator`` is a rank allocator over the backend's own arrays by full key, ``update_and_allocate(step,
    params, grads) -> (budget, mask)``, which zeroes the masked Λ entries of ``params`` in place (the NumPy
    reference's ``RankAllocator``, written against an array namespace, is one). The live tensors and their
    gradients are handed over as detached views on their own device and in their own dtype: nothing is copied,
    and the zeros land in the live ``lora_E`` parameters.
    """
    params: dict[str, torch.Tensor] = model.trainable_parameters()
    with torch.no_grad():
        live = {k: p.detach() for k, p in params.items()}
        grads = {k: (torch.zeros_like(p) if p.grad is None else p.grad).detach() for k, p in params.items()}
        return allocator.update_and_allocate(step, live, grads)

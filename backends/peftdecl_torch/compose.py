"""Several adapters active on one layer of the torch backend, combined by the rules of :mod:`peftdecl.composition`.

y = f(x; W') + b with W' the input-side adapters' weight maps applied to W (``compose_weight``), then each additive
adapter (y ← y + Δ(x), through its ``accumulate`` fast path where it has one) and each output-side adapter
(``compose_output``) in active order. Every adapter computes in its own dtype; the result has the base output's.
Plain torch ops throughout: autograd differentiates the composition.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, cast

import torch

from peftdecl.backend import AdditiveOps, ComposingOps, KindOps, Params
from peftdecl.composition import ADD, INPUT, role, weight_map_order
from peftdecl.plan import LayerPlan

if TYPE_CHECKING:
    from peftdecl_torch.layer import AdaptedLayer


class Running(NamedTuple):
    """One running adapter on the layer: its name, layer plan, kind ops, dtype and tensors."""

    name: str
    lp: LayerPlan
    ops: KindOps[AdaptedLayer]
    dtype: torch.dtype
    params: dict[str, torch.Tensor]


def forward(layer: AdaptedLayer, x: torch.Tensor, running: list[Running]) -> torch.Tensor:
    """The output of ``layer`` with every adapter of ``running`` (in active order) applied."""
    maps = weight_map_order(running, lambda e: (e.ops, e.lp))
    if maps:
        weight = layer.weight_ir()
        for entry in maps:
            composing = cast("ComposingOps[AdaptedLayer]", entry.ops)
            weight = composing.compose_weight(entry.lp, layer, entry.params, weight.to(entry.dtype))
        out_dtype = x.dtype if x.is_floating_point() else layer.base_weight.dtype
        bias = None if layer.bias is None else layer.bias.to(weight.dtype)
        result = layer.functional(x.to(weight.dtype) if x.is_floating_point() else x, weight, bias)
    else:
        result = layer.base_forward(x)
        out_dtype = result.dtype
    for entry in running:
        kind_role = role(entry.ops, entry.lp)
        if kind_role == INPUT:
            continue
        xa = x.to(entry.dtype) if x.is_floating_point() and x.dtype != entry.dtype else x
        if kind_role == ADD:
            result = accumulate(entry.ops, entry.lp, layer, entry.params, xa, result.to(entry.dtype))
        else:
            composing = cast("ComposingOps[AdaptedLayer]", entry.ops)
            result = composing.compose_output(entry.lp, layer, entry.params, xa, result.to(entry.dtype))
    return result.to(out_dtype)


def accumulate(
    ops: KindOps[AdaptedLayer],
    lp: LayerPlan,
    layer: AdaptedLayer,
    p: Params,
    x: torch.Tensor,
    result: torch.Tensor,
) -> torch.Tensor:
    """result + Δ(x) of an additive kind: its optional ``accumulate`` fast path, else ``result + delta(...)``."""
    fast = getattr(ops, "accumulate", None)
    out: torch.Tensor = (
        fast(lp, layer, p, x, result)
        if fast is not None
        else result + cast("AdditiveOps[AdaptedLayer]", ops).delta(lp, layer, p, x)
    )
    return out

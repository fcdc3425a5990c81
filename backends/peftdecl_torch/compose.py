"""Several adapters active on one layer of the torch backend, combined by the rules of :mod:`peftdecl.composition`.

y = f(x; W') + b with W' the input-side adapters' weight maps applied to W (``compose_weight``), then each additive
adapter (y ← y + Δ(x), through its ``accumulate`` fast path where it has one) and each output-side adapter
(``compose_output``) in active order. Every adapter computes in its own dtype; the result has the base output's.
Plain torch ops throughout: autograd differentiates the composition.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from peftdecl.backend import KindOps, Params
from peftdecl.composition import ADD, INPUT, role, weight_map_order
from peftdecl.plan import LayerPlan


class Running(NamedTuple):
    """One running adapter on the layer: its name, layer plan, kind ops, dtype and tensors."""

    name: str
    lp: LayerPlan
    ops: Any  # a KindOps; Any because ComposingOps/AdditiveOps methods are called by role
    dtype: torch.dtype
    params: dict[str, torch.Tensor]


def forward(layer: Any, x: torch.Tensor, running: list[Running]) -> torch.Tensor:
    """The output of ``layer`` (an AdaptedLayer) with every adapter of ``running`` (in active order) applied."""
    maps = weight_map_order(running, lambda e: (e.ops, e.lp))
    if maps:
        weight = layer.weight_ir()
        for entry in maps:
            weight = entry.ops.compose_weight(entry.lp, layer, entry.params, weight.to(entry.dtype))
        out_dtype = x.dtype if x.is_floating_point() else layer.base_layer.weight.dtype
        bias = None if layer.bias is None else layer.bias.to(weight.dtype)
        result = layer.functional(x.to(weight.dtype) if x.is_floating_point() else x, weight, bias)
    else:
        result = layer.base_layer(x)
        out_dtype = result.dtype
    for entry in running:
        kind_role = role(entry.ops, entry.lp)
        if kind_role == INPUT:
            continue
        xa = x.to(entry.dtype) if x.is_floating_point() and x.dtype != entry.dtype else x
        if kind_role == ADD:
            result = accumulate(entry.ops, entry.lp, layer, entry.params, xa, result.to(entry.dtype))
        else:
            result = entry.ops.compose_output(entry.lp, layer, entry.params, xa, result.to(entry.dtype))
    return result.to(out_dtype)


def accumulate(
    ops: KindOps[Any], lp: LayerPlan, layer: Any, p: Params, x: torch.Tensor, result: torch.Tensor
) -> torch.Tensor:
    """result + Δ(x) of an additive kind: its optional ``accumulate`` fast path, else ``result + delta(...)``."""
    fast = getattr(ops, "accumulate", None)
    if fast is not None:
        return fast(lp, layer, p, x, result)
    return result + ops.delta(lp, layer, p, x)  # type: ignore[attr-defined]

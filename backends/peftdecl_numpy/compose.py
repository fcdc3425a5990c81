"""Several adapters active on one layer, combined by the rules of :mod:`peftdecl.composition`, with explicit
gradients.

The layer computes y = f(x; W') + b with W' the input-side adapters' weight maps applied to W, then each
additive or output-side adapter in active order. An OUTPUT kind provides ``output_map(lp, base, p, x, y, ctx) ->
(y', cache)`` and ``output_map_backward(lp, base, p, cache, dy') -> (dy, dx | None, grads)``; an INPUT kind
``weight_map(lp, base, p, w, ctx) -> (w', cache)`` and ``weight_map_backward(lp, base, p, cache, dw') -> (dw,
grads)``. An additive kind's Δ is its own forward minus the base output.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from peftdecl.composition import ADD, OUTPUT, role, weight_map_order
from peftdecl.plan import LayerPlan
from peftdecl_numpy.kinds import Context
from peftdecl_numpy.layers import BaseLayer

Params = dict[str, np.ndarray]


class Running(NamedTuple):
    """One running adapter on the layer: its name, layer plan, kind ops and tensors."""

    name: str
    lp: LayerPlan
    ops: Any
    params: Params


def forward(
    base: BaseLayer, running: list[Running], x: np.ndarray, ctx: Context
) -> tuple[np.ndarray, dict[str, Any]]:
    """(y, tape) of the layer with every adapter of ``running`` (in active order) applied."""
    weight, maps = base.weight, []
    for entry in weight_map_order(running, lambda e: (e.ops, e.lp)):
        weight, cache = entry.ops.weight_map(entry.lp, base, entry.params, weight, ctx)
        maps.append((entry, cache))
    y = base.forward(x, weight=weight)
    outputs = []
    for entry in running:
        kind_role = role(entry.ops, entry.lp)
        if kind_role == ADD:
            y_alone, cache = entry.ops.forward(entry.lp, base, entry.params, x, ctx)
            y = y + (y_alone - base.forward(x))
        elif kind_role == OUTPUT:
            y, cache = entry.ops.output_map(entry.lp, base, entry.params, x, y, ctx)
        else:
            continue
        outputs.append((entry, cache))
    return y, {"x": x, "weight": weight, "maps": maps, "outputs": outputs}


def backward(
    base: BaseLayer, tape: dict[str, Any], dy: np.ndarray
) -> tuple[np.ndarray | None, dict[str, Params]]:
    """(dL/dx, adapter name -> dL/dp by tensor name) for a tape of :func:`forward`."""
    x, grads = tape["x"], {}
    dx_parts = []
    for entry, cache in reversed(tape["outputs"]):
        if role(entry.ops, entry.lp) == ADD:
            dx_alone, own = entry.ops.backward(entry.lp, base, entry.params, cache, dy)
            # the kind's own backward includes the base layer's input gradient; its delta's is the rest
            dx_own = None if dx_alone is None else dx_alone - base.input_grad(x, dy)
        else:
            dy, dx_own, own = entry.ops.output_map_backward(entry.lp, base, entry.params, cache, dy)
        dx_parts.append(dx_own)
        grads[entry.name] = own
    dx = base.input_grad(x, dy, weight=tape["weight"])
    if tape["maps"]:
        dw = base.weight_grad(x, dy)
        for entry, cache in reversed(tape["maps"]):
            dw, grads[entry.name] = entry.ops.weight_map_backward(entry.lp, base, entry.params, cache, dw)
    if dx is not None:
        dx = dx + sum(part for part in dx_parts if part is not None)
    return dx, grads

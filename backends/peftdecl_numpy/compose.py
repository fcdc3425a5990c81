"""Several adapters active on one layer, combined as HF PEFT combines them, with explicit gradients.

Every kind says how it composes (:func:`role`):

- ``ADD`` (the additive kinds): y ← y + Δ(x); Δ is the kind's own forward minus the base output;
- ``OUTPUT``: the running output is transformed, y ← φ(x, y): DoRA's magnitude rescales it (g ⊙ (y − b) + b +
  g ⊙ s·B A x, so it also rescales what earlier adapters added), IA3 on an attention layer scales it, OFT on an
  embedding rotates it;
- ``INPUT``: the input the base layer reads is transformed, written as a map of the base weight (x ↦ x R is
  W ↦ W Rᵀ, which also covers a convolution's patches): OFT, BOFT, feed-forward IA3.

The layer computes y = f(x; W') + b with W' the input-side maps applied to W, then each output-side adapter in
active order. Input-side order (``ops.input_order``): ``"active"`` transforms the input in active order,
x ↦ x R_1 R_2 ⋯ (OFT), ``"reversed"`` in the opposite order, x ↦ x M_k ⋯ M_1 (BOFT, whose HF PEFT layer
multiplies the rotations that way). A kind with role OUTPUT provides ``output_map(lp, base, p, x, y, ctx) ->
(y', cache)`` and ``output_map_backward(lp, base, p, cache, dy') -> (dy, dx | None, grads)``; one with role INPUT
provides ``weight_map(lp, base, p, w, ctx) -> (w', cache)`` and ``weight_map_backward(lp, base, p, cache, dw') ->
(dw, grads)``.
"""

from __future__ import annotations

from collections import deque
from typing import Any, NamedTuple

import numpy as np

from peftdecl.plan import LayerPlan
from peftdecl_numpy.kinds import Context
from peftdecl_numpy.layers import BaseLayer

ADD, OUTPUT, INPUT = "add", "output", "input"
Params = dict[str, np.ndarray]


class Running(NamedTuple):
    """One running adapter on the layer: its name, layer plan, kind ops and tensors."""

    name: str
    lp: LayerPlan
    ops: Any
    params: Params


def role(ops: Any, lp: LayerPlan) -> str:
    """How the adapter of ``lp`` composes with the others on its layer: ADD, OUTPUT or INPUT."""
    return ADD if ops.additive else ops.composition(lp)


def weight_map_order(running: list[Running]) -> list[Running]:
    """The input-side adapters in the order their weight maps apply to W (the input transform T gives W' = W Tᵀ:
    an adapter that acts on the input after the others, T ← T R, maps W first)."""
    order: deque[Running] = deque()
    for entry in running:
        if role(entry.ops, entry.lp) == INPUT:
            if entry.ops.input_order == "active":
                order.appendleft(entry)
            else:
                order.append(entry)
    return list(order)


def forward(
    base: BaseLayer, running: list[Running], x: np.ndarray, ctx: Context
) -> tuple[np.ndarray, dict[str, Any]]:
    """(y, tape) of the layer with every adapter of ``running`` (in active order) applied."""
    weight, maps = base.weight, []
    for entry in weight_map_order(running):
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

"""Several adapters active on one layer, combined by the rules of :mod:`peftdecl.composition`, with explicit
gradients.

The layer computes y = f(x; W') + b with W' the INPUT adapters' ``compose_weight`` applied to W, then each
additive adapter's Δ(x) (``delta_record``) or OUTPUT adapter's φ(x, y) (``compose_output_record``) in active
order; the backward walks the tapes in reverse (``delta_backward``, ``compose_output_backward``,
``compose_weight_backward``).
"""

from __future__ import annotations

from typing import NamedTuple, TypedDict, cast

from peftdecl.composition import ADD, OUTPUT, role, weight_map_order
from peftdecl.plan import LayerPlan
from peftdecl_numpy.kinds.base import NumpyAdditiveOps, NumpyComposingOps, NumpyOps, Params, Tape
from peftdecl_numpy.layers import BaseLayer
from peftdecl_numpy.xp_ops import Array


class Running(NamedTuple):
    """One running adapter on the layer: its name, layer plan, kind ops and tensors."""

    name: str
    lp: LayerPlan
    ops: NumpyOps
    params: Params


class ComposedTape(TypedDict):
    """What :func:`backward` reads: the input, the mapped weight W' and each adapter's own tape."""

    x: Array
    weight: Array
    maps: list[tuple[Running, Tape]]
    """The INPUT adapters in the order their maps applied to W."""
    outputs: list[tuple[Running, Tape]]
    """The ADD and OUTPUT adapters in active order."""


def forward(layer: BaseLayer, running: list[Running], x: Array) -> tuple[Array, ComposedTape]:
    """(y, tape) of the layer with every adapter of ``running`` (in active order) applied."""
    weight, maps = layer.weight, []
    for entry in weight_map_order(running, lambda e: (e.ops, e.lp)):
        weight, tape = _composing(entry).compose_weight_record(entry.lp, layer, entry.params, weight)
        maps.append((entry, tape))
    y = layer.forward(x, weight=weight)
    outputs = []
    for entry in running:
        kind_role = role(entry.ops, entry.lp)
        if kind_role == ADD:
            delta, tape = _additive(entry).delta_record(entry.lp, layer, entry.params, x)
            y = y + delta
        elif kind_role == OUTPUT:
            y, tape = _composing(entry).compose_output_record(entry.lp, layer, entry.params, x, y)
        else:
            continue
        outputs.append((entry, tape))
    return y, {"x": x, "weight": weight, "maps": maps, "outputs": outputs}


def backward(layer: BaseLayer, tape: ComposedTape, dy: Array) -> tuple[Array | None, dict[str, Params]]:
    """(dL/dx, adapter name -> dL/dp by tensor name) for a tape of :func:`forward`."""
    x, grads = tape["x"], {}
    dx_parts = []
    for entry, own_tape in reversed(tape["outputs"]):
        if role(entry.ops, entry.lp) == ADD:
            dx_own, own = _additive(entry).delta_backward(entry.lp, layer, entry.params, own_tape, dy)
        else:
            dy, dx_own, own = _composing(entry).compose_output_backward(
                entry.lp, layer, entry.params, own_tape, dy
            )
        dx_parts.append(dx_own)
        grads[entry.name] = own
    dx = layer.input_grad(x, dy, weight=tape["weight"])
    if tape["maps"]:
        dw = layer.weight_grad(x, dy, weight=tape["weight"])
        for entry, own_tape in reversed(tape["maps"]):
            dw, grads[entry.name] = _composing(entry).compose_weight_backward(
                entry.lp, layer, entry.params, own_tape, dw
            )
    if dx is not None:
        for part in dx_parts:
            if part is not None:
                dx = dx + part
    return dx, grads


def _additive(entry: Running) -> NumpyAdditiveOps:
    # role() said ADD: the kind is additive (built-in or not, it need not subclass AdditiveKind)
    return cast("NumpyAdditiveOps", entry.ops)


def _composing(entry: Running) -> NumpyComposingOps:
    # role() said OUTPUT or INPUT: a composing kind's ops
    return cast("NumpyComposingOps", entry.ops)

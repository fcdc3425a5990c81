"""Several adapters active on one layer of the MLX backend, combined by the rules of :mod:`peftdecl.composition`.

y = f(x; W') + b with W' the input-side adapters' weight maps applied to W (``compose_weight``), then each additive
adapter's Δ(x) (``delta``) and each output-side adapter (``compose_output``) in active order, in the adapter dtype;
the result has the input's dtype (an embedding's: the base weight's). ``mx.value_and_grad`` differentiates it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, cast

import mlx.core as mx

from peftdecl.composition import ADD, INPUT, role, weight_map_order
from peftdecl.plan import LayerPlan

if TYPE_CHECKING:
    from peftdecl_mlx.kinds._protocols import MlxAdditiveOps, MlxComposingOps, MlxOps, Params
    from peftdecl_mlx.layer import AdaptedLayer


class Running(NamedTuple):
    """One running adapter on the layer: its layer plan, kind ops and tensors."""

    lp: LayerPlan
    ops: MlxOps
    params: Params


def forward(layer: AdaptedLayer, x: mx.array, running: list[Running]) -> mx.array:
    """The output of ``layer`` with every adapter of ``running`` (in active order) applied."""
    xa = layer.adapter_input(x)
    maps = weight_map_order(running, lambda e: (e.ops, e.lp))
    if maps:
        weight = layer.weight.astype(layer.adapter_dtype)
        for entry in maps:
            weight = _composing(entry).compose_weight(entry.lp, layer, entry.params, weight)
        y = layer.base_forward(xa, weight=weight)
    else:
        y = layer.base_layer(x)
    for entry in running:
        kind_role = role(entry.ops, entry.lp)
        if kind_role == ADD:
            delta = _additive(entry).delta(entry.lp, layer, entry.params, xa)
            y = y + (delta if delta.dtype == y.dtype else delta.astype(y.dtype))
        elif kind_role != INPUT:
            y = _composing(entry).compose_output(entry.lp, layer, entry.params, xa, y)
    return y if layer.layer_type == "embedding" or y.dtype == x.dtype else y.astype(x.dtype)


def _additive(entry: Running) -> MlxAdditiveOps:
    # role() said ADD: the kind is additive (built-in or not, it need not subclass AdditiveKind)
    return cast("MlxAdditiveOps", entry.ops)


def _composing(entry: Running) -> MlxComposingOps:
    # role() said OUTPUT or INPUT: a composing kind's ops
    return cast("MlxComposingOps", entry.ops)

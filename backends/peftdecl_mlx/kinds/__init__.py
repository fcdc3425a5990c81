"""Per-kind math of the MLX backend: one module per adapter kind, the same equations as the NumPy reference.

A kind module exposes ``OPS`` with ``kind``, ``additive`` and:

- ``delta(lp, layer, p, x) -> Δy`` (additive kinds): the adapter's contribution to the layer output, computed in
  the adapter dtype (``x`` already cast); the layer adds it to the base output;
- ``forward(lp, layer, p, x) -> y`` (other kinds): the whole output, base included;
- ``alone(lp, layer, node, x) -> y | None`` (optional, additive kinds): the whole output when the adapter runs
  alone, where that is faster than base + delta; None falls back to ``delta``. ``node`` is the adapter's
  parameter tree (``node["lora_A"]["weight"]``), read without building ``p``;
- ``delta_weight(lp, layer, p)``: ΔW in the IR layout (additive kinds);
- ``merge(lp, layer, p, cache) -> (W, b)`` / ``unmerge(lp, layer, p, cache) -> (W, b)``: the base weight (IR
  layout) and bias with the adapter folded in or taken out; ``cache`` lives from a merge to its unmerge.

``layer`` is the :class:`peftdecl_mlx.layer.AdaptedLayer` (training flag, base weights, random draws); ``p`` maps
the layer's tensor names (``lora_A.weight``) to ``mx.array``, shared tensors (VeRA's) included.

The kinds this backend runs and their layer types are read from :mod:`peftdecl.kinds` (no mlx import).
"""

from __future__ import annotations

from typing import Any

from peftdecl import kinds


def ops_for(kind: str) -> Any:
    """The mlx ops object of an execution kind, as its :class:`peftdecl.kinds.KindDecl` names it (``Any``: each
    caller uses the part of the kind-ops Protocols it needs)."""
    return kinds.ops_for(kind, "mlx")

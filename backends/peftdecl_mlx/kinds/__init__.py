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

This module must not import mlx: the backend's static Capabilities are read from the table below.
"""

from __future__ import annotations

from peftdecl.backend import KindModules

_LINEAR = ("linear",)
_BOTH = ("linear", "embedding")

# execution kind -> (module of this package, layer types it runs on); a module not written yet is not offered.
# mlx-lm models hold nn.Linear and nn.Embedding only, so these are the layer types the backend wraps.
_KIND_MODULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "lora": ("lora", _BOTH),
    "dora": ("dora", _BOTH),
    "adalora": ("adalora", _LINEAR),
    "ia3": ("ia3", _LINEAR),
    "loha": ("loha", _LINEAR),
    "lokr": ("lokr", _LINEAR),
    "oft": ("oft", _BOTH),
    "boft": ("boft", _LINEAR),
    "vera": ("vera", _LINEAR),
    "prefix_tuning": ("prompt", ()),
    "prompt_tuning": ("prompt", ()),
}

ADDITIVE_KINDS = ("lora", "adalora", "loha", "lokr", "vera")
"""Kinds whose output is base(x) + Δ(x): they take part in mixed batches."""


_KINDS = KindModules(__name__, _KIND_MODULES, backend="mlx")
supported_kinds = _KINDS.supported_kinds
"""Execution kind -> layer types, for every kind module present (checked without importing it)."""
ops_for = _KINDS.ops_for
"""The ops object of an execution kind."""

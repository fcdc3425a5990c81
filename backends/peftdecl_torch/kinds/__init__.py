"""Per-kind math of the torch backend: one module per adapter kind, the same equations as the NumPy reference.

A kind module exposes ``OPS`` with ``kind``, ``additive`` and:

- ``forward(lp, layer, p, x, result) -> y``: for an additive kind ``result`` is the layer's output so far (the base
  output plus earlier adapters, already in the adapter dtype) and the kind returns it plus its own contribution;
  for any other kind ``result`` is None and the kind computes the whole output (calling ``layer.base_forward`` or
  ``layer.functional``);
- ``delta_weight(lp, layer, p)``: ΔW in the IR layout (additive kinds);
- ``merge(lp, layer, p, cache) -> (W, b)`` / ``unmerge(lp, layer, p, cache) -> (W, b)``: the base weight (IR
  layout) and bias with the adapter folded in or taken out; ``cache`` is a per-(layer, adapter) dict that lives
  from a merge to its unmerge.

A non-additive kind also says how it composes with other adapters active on the same layer
(:mod:`peftdecl.composition`): ``composition(lp)`` is OUTPUT, with ``compose_output(lp, layer, p, x, result)``
(the output so far, transformed), or INPUT, with ``compose_weight(lp, layer, p, weight)`` (the weight the base
operation runs with) and an ``input_order``.

``layer`` is the :class:`peftdecl_torch.layer.AdaptedLayer` (its ``training`` flag, base layer and helpers);
``p`` maps the layer's tensor names (``lora_A.weight``) to tensors, shared tensors (VeRA's) included.

This module must not import torch: the backend's static Capabilities are read from the table below.
"""

from __future__ import annotations

from peftdecl.backend import KindModules

_ALL = ("linear", "embedding", "conv1d", "conv2d", "gpt2_conv1d")

# execution kind -> (module of this package, layer types it runs on); a module not written yet is not offered
_KIND_MODULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "lora": ("lora", _ALL),
    "dora": ("dora", _ALL),
    "adalora": ("adalora", ("linear", "conv2d", "gpt2_conv1d")),
    "ia3": ("ia3", ("linear", "conv2d", "gpt2_conv1d")),
    "loha": ("loha", ("linear", "conv1d", "conv2d")),
    "lokr": ("lokr", ("linear", "conv1d", "conv2d")),
    "oft": ("oft", ("linear", "embedding", "conv2d")),
    "boft": ("boft", ("linear", "conv2d")),
    "vera": ("vera", ("linear", "gpt2_conv1d")),
    "prefix_tuning": ("prompt", ()),
    "prompt_tuning": ("prompt", ()),
}

ADDITIVE_KINDS = ("lora", "adalora", "loha", "lokr", "vera")
"""Kinds whose output is base(x) + Δ(x): they take part in mixed batches."""


_KINDS = KindModules(__name__, _KIND_MODULES, backend="torch")
supported_kinds = _KINDS.supported_kinds
"""Execution kind -> layer types, for every kind module present (checked without importing it)."""
ops_for = _KINDS.ops_for
"""The ops object of an execution kind."""

"""Per-kind math of the NumPy reference: one module per adapter kind, each reading like its paper's equation.

A kind module exposes ``OPS``, an object with ``kind``, ``additive`` and:

- ``forward(lp, base, p, x, ctx) -> (y, cache)``: the whole layer's output (base included);
- ``backward(lp, base, p, cache, dy) -> (dx, grads)``: dL/dx and dL/dp for every trainable tensor, by name;
- ``delta_weight(lp, base, p)``: ΔW in the IR layout (additive kinds);
- ``merge(lp, base, p) -> (W, b)`` and ``unmerge(lp, base, p) -> (W, b)``: the base weights with the
  adapter folded in or taken out again (``base`` holds the current weights).

A non-additive kind also says how it composes with other adapters active on the same layer
(:mod:`peftdecl.composition`): ``composition(lp)`` is OUTPUT (with ``output_map`` and its backward) or INPUT (with
``weight_map``, its backward and an ``input_order``); :mod:`peftdecl_numpy.compose` runs them.

``p`` maps the layer's tensor names (``lora_A.weight``) to float64 arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from peftdecl.backend import KindModules

# execution kind -> module of this package (a module that does not exist yet is simply not offered)
_KIND_MODULES = {
    "lora": "lora",
    "dora": "dora",
    "adalora": "adalora",
    "ia3": "ia3",
    "loha": "loha",
    "lokr": "lokr",
    "oft": "oft",
    "boft": "boft",
    "vera": "vera",
    "prefix_tuning": "prompt",
    "prompt_tuning": "prompt",
}


@dataclass
class Context:
    """Per-call state: training mode and the generator that draws dropout masks."""

    training: bool = False
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))


_KINDS = KindModules(__name__, _KIND_MODULES)
ops_for = _KINDS.ops_for
"""The ops object of an execution kind."""
supported_kinds = _KINDS.supported_kinds
"""Execution kind -> layer types, for every kind module present (each declares ``LAYER_TYPES``)."""

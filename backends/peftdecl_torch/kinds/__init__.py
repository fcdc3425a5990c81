"""Per-kind math of the torch backend: one module per adapter kind, the same equations as the NumPy reference.

A kind module exposes ``OPS``, which implements the kind-ops Protocols of :mod:`peftdecl.backend` with the same
names and arguments as every other backend: :class:`~peftdecl.backend.KindOps` (``forward(lp, layer, p, x)``, the
whole output with this adapter alone; ``delta_weight``; ``merge``/``unmerge(lp, layer, p, cache) -> (W, b)``) and
either :class:`~peftdecl.backend.AdditiveOps` (``delta(lp, layer, p, x)``, plus the optional fast path
``accumulate(lp, layer, p, x, result)`` = result + Δ(x)) or :class:`~peftdecl.backend.ComposingOps`
(``composition``, ``compose_output``, ``compose_weight``, ``input_order``; :mod:`peftdecl.composition`).

``layer`` is the :class:`peftdecl_torch.layer.AdaptedLayer` (its ``training`` flag, base layer, the engine's
options and helpers; every random draw goes through its ``dropout``/``random``/``permutation``/``integers``, which
use the engine's seeded generators);
``p`` maps the layer's tensor names (``lora_A.weight``) to tensors, shared tensors (VeRA's) included.

The kinds this backend runs and their layer types are read from :mod:`peftdecl.kinds` (no torch import).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from peftdecl import kinds
from peftdecl.backend import KindOps

if TYPE_CHECKING:
    from peftdecl_torch.layer import AdaptedLayer


def ops_for(kind: str) -> KindOps[AdaptedLayer]:
    """The torch ops object of a layer kind, as its :class:`peftdecl.kinds.KindDecl` names it; callers narrow it to
    :class:`~peftdecl.backend.AdditiveOps` or :class:`~peftdecl.backend.ComposingOps` by its ``additive`` flag.
    (Prompt learning's ops only mark their kind: callers read no more than ``additive`` of them.)"""
    return cast("KindOps[AdaptedLayer]", kinds.ops_for(kind, "torch"))

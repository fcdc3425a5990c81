"""Per-kind math of the NumPy reference: one module per adapter kind, each reading like its paper's equation.

A kind module exposes ``OPS``, which implements the kind-ops Protocols of :mod:`peftdecl.backend`: ``KindOps``
with ``AdditiveOps`` (additive kinds) or ``ComposingOps``, and ``ExplicitGradientOps`` (``record`` / ``backward``
and the tape variants ``delta_record``, ``compose_output_record``, ``compose_weight_record`` with their
``*_backward``); :mod:`peftdecl_numpy.kinds.base` derives the tape-free methods. ``layer`` is a
:class:`peftdecl_numpy.layers.BaseLayer` (base weights, training flag, the engine's generator) and ``p`` maps the
layer's tensor names (``lora_A.weight``) to arrays of the engine's namespace.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from peftdecl import kinds

if TYPE_CHECKING:
    from peftdecl_numpy.kinds.base import NumpyOps


def ops_for(kind: str) -> NumpyOps:
    """The NumPy ops object of an execution kind, as its :class:`peftdecl.kinds.KindDecl` names it; the registry
    holds it untyped, so this says what every NumPy kind provides (callers narrow to the additive or composing
    part by ``additive`` or :func:`peftdecl.composition.role`)."""
    return cast("NumpyOps", kinds.ops_for(kind, "numpy"))

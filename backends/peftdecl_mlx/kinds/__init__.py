"""Per-kind math of the MLX backend: one module per adapter kind, the same equations as the NumPy reference.

A kind module exposes ``OPS``, which implements :class:`peftdecl.backend.KindOps` and either
:class:`peftdecl.backend.AdditiveOps` (``delta``; the shared ``forward`` and merges come from
:class:`peftdecl_mlx.kinds._additive.AdditiveKind`, LoRA adds the optional ``alone`` fast path) or
:class:`peftdecl.backend.ComposingOps`. ``layer`` is the :class:`peftdecl_mlx.layer.AdaptedLayer` (training flag,
base weights, engine options, the engine's generator); ``p`` maps the layer's tensor names (``lora_A.weight``) to
``mx.array``, shared tensors (VeRA's) included. Prompt learning's module has model-level functions instead.

The kinds this backend runs and their layer types are read from :mod:`peftdecl.kinds` (no mlx import).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from peftdecl import kinds

if TYPE_CHECKING:
    from peftdecl_mlx.kinds._protocols import MlxOps


def ops_for(kind: str) -> MlxOps:
    """The mlx ops object of an execution kind, as its :class:`peftdecl.kinds.KindDecl` names it; the registry
    holds it untyped, so this says what every MLX kind provides (callers narrow to the additive or composing part
    by ``additive`` or :func:`peftdecl.composition.role`)."""
    return cast("MlxOps", kinds.ops_for(kind, "mlx"))

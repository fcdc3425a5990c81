"""A static check, never imported: mypy verifies that the built-in kinds' ops provide the Protocols that
:func:`peftdecl_mlx.kinds.ops_for` and :mod:`peftdecl_mlx.compose` cast the registry's objects to."""

from __future__ import annotations

from peftdecl_mlx.kinds import adalora, boft, dora, ia3, loha, lokr, lora, oft, vera
from peftdecl_mlx.kinds._protocols import MlxAdditiveOps, MlxComposingOps

ADDITIVE: tuple[MlxAdditiveOps, ...] = (adalora.OPS, loha.OPS, lokr.OPS, lora.OPS, vera.OPS)
COMPOSING: tuple[MlxComposingOps, ...] = (boft.OPS, dora.OPS, ia3.OPS, oft.OPS)

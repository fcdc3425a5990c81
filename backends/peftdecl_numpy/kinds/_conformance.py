"""A static check, never imported: mypy verifies that the built-in kinds' ops provide the Protocols that
:func:`peftdecl_numpy.kinds.ops_for` and :mod:`peftdecl_numpy.compose` cast the registry's objects to.

LoHa and LoKr are left out: their ops are frozen ``WeightDeltaOps`` dataclasses, whose read-only ``kind`` the
Protocols' plain attribute (as :class:`peftdecl.backend.KindOps` declares it) does not admit."""

from __future__ import annotations

from peftdecl_numpy.kinds import adalora, boft, dora, ia3, lora, oft, vera
from peftdecl_numpy.kinds.base import NumpyAdditiveOps, NumpyComposingOps

ADDITIVE: tuple[NumpyAdditiveOps, ...] = (adalora.OPS, lora.OPS, vera.OPS)
COMPOSING: tuple[NumpyComposingOps, ...] = (boft.OPS, dora.OPS, ia3.OPS, oft.OPS)

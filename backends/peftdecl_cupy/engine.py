"""The CuPy engine: the NumPy reference engine on CuPy arrays, its kind ops fronted by the kernel table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy.typing as npt

from peftdecl.adapter_book import AdapterBook
from peftdecl.options import EngineOptions
from peftdecl.plan import ModelInfo
from peftdecl_cupy.dispatch import KernelOps, KernelTable, kernel_ops
from peftdecl_cupy.table import MIXED
from peftdecl_numpy.engine import LayerTape, NumpyEngine
from peftdecl_numpy.kinds import ops_for
from peftdecl_numpy.kinds.base import NumpyOps
from peftdecl_numpy.layers import BaseLayer
from peftdecl_numpy.xp_ops import Array, Namespace


def default_kernels() -> KernelTable:
    """The real kernels (CuPy; compiled at their first use)."""
    from peftdecl_cupy.dora import CupyDora
    from peftdecl_cupy.lowrank import CupyLowRank
    from peftdecl_cupy.mixed import CupyMixed
    from peftdecl_cupy.table import kernel_table

    low = CupyLowRank()
    return kernel_table(low, CupyMixed(), CupyDora(low))


class CupyEngine(NumpyEngine):
    """The reference engine whose kind ops run ``kernels`` first (:mod:`peftdecl_cupy.dispatch`); any namespace
    works (the tests run it on NumPy with fake kernels), CuPy is what the backend creates it with. Without a
    ``kernels`` table it takes the real kernels, or none when ``options.fused`` is off."""

    def __init__(
        self,
        state_dict: Mapping[str, npt.ArrayLike],
        info: ModelInfo,
        book: AdapterBook | None = None,
        options: EngineOptions | None = None,
        *,
        xp: Namespace | None = None,
        dtype: str = "float32",
        kernels: KernelTable | None = None,
    ) -> None:
        super().__init__(state_dict, info, book, options, xp=xp, dtype=dtype)
        # EngineOptions.fused = False (PEFTDECL_FUSED=0): the reference's CuPy expressions everywhere, no kernels
        if kernels is None:
            kernels = default_kernels() if self.options.fused else {}
        self.kernels = kernels
        self._fronted: dict[str, NumpyOps | KernelOps] = {}
        self.mixed_calls = {"kernel": 0, "reference": 0}

    def kind_ops(self, kind: str) -> NumpyOps:
        ops = self._fronted.get(kind)
        if ops is None:
            ops = self._fronted[kind] = kernel_ops(ops_for(kind), self.kernels, kind)
        return ops  # a KernelOps has every NumpyOps method (through the reference)

    def _asarray(self, value: Array | npt.ArrayLike, copy: bool = True) -> Array:
        # a CuPy array stays on its device (the reference's path goes through a host copy)
        if type(value).__module__.split(".")[0] == "cupy":
            import cupy

            return cupy.array(value, dtype=self.dtype_name, copy=copy)
        return super()._asarray(value, copy)

    def _mixed_forward(
        self, module: str, layer: BaseLayer, x: Array, names: list[str]
    ) -> tuple[Array, LayerTape]:
        forward: Any = self.kernels.get(MIXED, {}).get("forward")
        if forward is not None:
            result = forward(self, module, layer, x, names)
            if result is not NotImplemented:
                self.mixed_calls["kernel"] += 1
                return result  # type: ignore[no-any-return]
        self.mixed_calls["reference"] += 1
        return super()._mixed_forward(module, layer, x, names)

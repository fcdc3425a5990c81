"""peftdecl's CuPy backend: the NumPy reference run on CuPy arrays (``xp=cupy``), with raw CUDA kernels in front
of its hot paths (LoRA/AdaLoRA shrink and expand, mixed-adapter batches, DoRA's norm and output pass).

Nothing heavy is imported here: listing the backends reads :attr:`CupyBackend.capabilities` and asks
:func:`CupyBackend.unavailable_reason`, which imports CuPy only where the CUDA driver counts a device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from peftdecl.adapter_book import AdapterBook
from peftdecl.backend import Capabilities
from peftdecl.kinds import BackendKinds
from peftdecl.options import EngineOptions
from peftdecl.plan import LAYER_TYPES, ModelInfo
from peftdecl_numpy import NumpyBackend

if TYPE_CHECKING:
    from peftdecl_cupy.dispatch import KernelTable
    from peftdecl_cupy.engine import CupyEngine
    from peftdecl_numpy.xp_ops import Namespace

# the reference's kinds: every kind runs (the ones without a kernel on the reference's CuPy path)
_KINDS = BackendKinds("numpy", (*LAYER_TYPES, "parameter"))


class CupyBackend:
    """Runs plans on a state dict (names to NumPy or CuPy arrays) on the current CUDA device, in float32 unless
    ``dtype=`` says otherwise, with the reference's explicit gradients; kernels replace its hot paths
    (:mod:`peftdecl_cupy.table`) and the reference runs wherever a kernel does not cover the case."""

    name = "cupy"
    capabilities = dataclasses.replace(
        Capabilities.of_kinds(
            _KINDS,
            "explicit",
            dequantizes=True,
            devices=("cuda",),
            dtypes=("float32", "float64"),
            requires=("cupy",),
            fused_kernels=("lora", "adalora", "dora", "mixed_batch"),
            quantizations=("bnb_4bit", "bnb_8bit", "mlx_affine"),
        ),
        name="cupy",
    )

    @staticmethod
    def unavailable_reason() -> str:
        """ "" when CuPy imports and a CUDA device is present, else why not (read by ``peftdecl.backends()``)."""
        from peftdecl_cupy._device import unavailable_reason

        return unavailable_reason()

    def accepts(self, model: object) -> bool:
        """A state dict of CuPy arrays (a NumPy one goes to the NumPy backend unless ``backend="cupy"``)."""
        return (
            isinstance(model, Mapping)
            and len(model) > 0
            and all(_is_cupy(v) for v in list(model.values())[:8])
        )

    def inventory(self, model: Mapping[str, Any], **options: Any) -> ModelInfo:
        """The NumPy backend's inventory (``kernels``, like ``xp`` and ``dtype``, is the engine's)."""
        options.pop("kernels", None)
        return NumpyBackend().inventory(on_host(model), **options)

    def create(
        self,
        model: Mapping[str, Any],
        info: ModelInfo,
        book: AdapterBook,
        options: EngineOptions,
        *,
        dtype: str = "float32",
        kernels: KernelTable | None = None,
        xp: Namespace | None = None,
        **model_options: object,
    ) -> CupyEngine:
        """An engine on CuPy arrays in ``dtype``; ``kernels`` (a table of fakes) and ``xp`` (NumPy) are for the
        tests that check the dispatch without a device."""
        from peftdecl_cupy.engine import CupyEngine

        if xp is None:
            import cupy

            xp = cupy
        return CupyEngine(on_host(model), info, book, options, xp=xp, dtype=dtype, kernels=kernels)


def _is_cupy(value: object) -> bool:
    return type(value).__module__.split(".")[0] == "cupy"  # by type: listing must not import CuPy


def on_host(model: Mapping[str, Any]) -> dict[str, Any]:
    """The state dict with its CuPy arrays copied to NumPy (the engine reads it once, at creation, as the
    reference does; the weights go back to the device in the engine's dtype)."""
    return {k: v.get() if _is_cupy(v) else v for k, v in model.items()}


__all__ = ["CupyBackend"]

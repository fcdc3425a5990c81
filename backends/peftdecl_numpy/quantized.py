"""Quantised base layers of the NumPy reference: the stored codes behind a layer whose weight the engine computes
with in float (its dequantised weight, exactly as the library dequantises it).

A merge into such a layer does what HF PEFT does on a bitsandbytes layer: dequantise, add the adapter's update,
re-quantise (in float32, with the same codec and layout, warning of the rounding), and compute with the
re-quantised weight from then on. The full-precision merged weight is kept beside it for
``unload(dequantize=True)``. Unmerging restores the codes the layer was loaded with, exactly (PEFT re-quantises
again there, which drifts by a rounding step).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from peftdecl.plan import LayerInfo
from peftdecl.quant.layouts import quantize, quantized_from_tensors, tensors_from_quantized
from peftdecl.quant.requantize import warn_requantized
from peftdecl.quant.scheme import Quantized


@dataclass
class StoredWeight:
    """A quantised layer's codes: as loaded (``original``), as held now (``current``: re-quantised by merges),
    and the full-precision merged weight (``full``, engine namespace; None while nothing is merged)."""

    original: Quantized
    current: Quantized
    full: object | None = None

    @property
    def merged(self) -> bool:
        return self.current is not self.original

    def keys(self, module: str) -> set[str]:
        """The state-dict keys the library stores this layer's quantised weight under."""
        own = set(tensors_from_quantized(module, self.original))
        return own | {f"{module}.weight_format"} if self.original.scheme.kind == "int8" else own


def read_stored(state_dict: Mapping[str, npt.ArrayLike], module: str, info: LayerInfo) -> StoredWeight | None:
    """The stored codes of a quantised layer the inventory described (None when it could not read them)."""
    scheme = info.quant_scheme
    if info.quantization is None or scheme is None:
        return None
    q = quantized_from_tensors(
        state_dict,
        module,
        info.quantization,
        bits=scheme.bits,
        group_size=scheme.group_size,
        threshold=scheme.threshold,
    )
    return StoredWeight(q, q)


def requantize(module: str, q: Quantized, weight: np.ndarray, *, warn: bool = True) -> Quantized:
    """``weight`` quantised as ``q`` was (scheme, dtype), from its float32 values as PEFT re-quantises a merged
    bitsandbytes weight. int8 goes the way of bitsandbytes' ``Int8Params``: rounded to float16 first, and no
    outlier threshold applied to the weight; the record keeps the layer's scheme."""
    scheme, dtype = q.scheme, q.dtype
    if scheme.kind == "int8":
        scheme, dtype = dataclasses.replace(scheme, threshold=0.0), "float16"
    if warn:
        warn_requantized(module, q.scheme.name)
    fresh = quantize(np.asarray(weight, np.float32), scheme, dtype=dtype)
    return dataclasses.replace(fresh, scheme=q.scheme)

"""How a base weight is quantised: one frozen record shared by the IR, the codecs and every backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

QuantKind = Literal["nf4", "fp4", "int8", "affine"]


@dataclass(frozen=True)
class QuantScheme:
    """A quantisation scheme.

    - ``nf4``/``fp4`` (bitsandbytes 4-bit): ``block_size`` weights share one absmax; with ``double_quant`` the
      absmax values are themselves quantised to 8 bits in blocks of ``nested_block_size`` after subtracting
      their mean (bitsandbytes' ``compress_statistics``).
    - ``int8`` (bitsandbytes LLM.int8): one absmax per output row (``SCB``); ``threshold`` > 0 marks outlier
      input columns kept in 16 bits at run time.
    - ``affine`` (MLX): ``bits`` ∈ {1, 2, 3, 4, 5, 6, 8} per weight, a scale and a bias per ``group_size`` weights
      along the input dimension.
    """

    kind: QuantKind
    block_size: int = 64
    double_quant: bool = False
    nested_block_size: int = 256
    threshold: float = 0.0
    bits: int = 4
    group_size: int = 64

    @property
    def name(self) -> str:
        """The short name the IR's ``LayerInfo.quantization`` uses (``bnb_4bit``, ``bnb_8bit``, ``mlx_affine``)."""
        if self.kind in ("nf4", "fp4"):
            return "bnb_4bit"
        return "bnb_8bit" if self.kind == "int8" else "mlx_affine"


@dataclass(frozen=True)
class Quantized:
    """A quantised weight as its library stores it (NumPy arrays; shapes and dtypes exactly the library's).

    ``codes``: the packed or unpacked integer codes; ``scales``: absmax / SCB / MLX scales (float32, or uint8 codes
    with double quantisation); ``extras``: the rest (``nested_absmax``, ``offset``, ``biases``, ...); ``shape``:
    the dequantised weight's shape; ``dtype``: the float dtype the scales stand for (``float32``, ``float16``,
    ``bfloat16``; NumPy holds bfloat16 values in float32 arrays)."""

    scheme: QuantScheme
    codes: np.ndarray
    scales: np.ndarray
    shape: tuple[int, ...]
    extras: dict[str, np.ndarray]
    dtype: str = "float32"

"""MLX's quantised layers (``nn.QuantizedLinear``, ``nn.QuantizedEmbedding``) as the MLX backend reads and writes
them: in affine mode each group of ``group_size`` input columns stores W = scale · q + bias with ``bits``-bit codes q.

The base output is the layer's own call (``mx.quantized_matmul``); a kind that reads W gets it from
:func:`dequantize`, a temporary that is never kept; a merge writes W′ back with :func:`requantize` (the layer's bits,
group size and mode, as mlx-lm's ``fuse`` does); :func:`dequantized_layer` is the float layer holding W.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeGuard

import mlx.core as mx
import mlx.nn as nn

QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding)
QuantizedLayer = nn.QuantizedLinear | nn.QuantizedEmbedding
CODE_KEYS = ("weight", "scales", "biases")
"""The arrays that hold a quantised weight (``biases`` is absent in the floating-point modes)."""


def is_quantized(module: object) -> TypeGuard[QuantizedLayer]:
    """Whether ``module`` is one of MLX's quantised layers."""
    return isinstance(module, QUANTIZED)


def mode(module: QuantizedLayer) -> str:
    """The layer's quantisation mode (``affine``; ``mxfp4``, ``nvfp4``, ``mxfp8`` in newer MLX)."""
    return str(getattr(module, "mode", "affine"))


def quantization_name(module: QuantizedLayer) -> str:
    """``LayerInfo.quantization`` of the layer: ``mlx_<mode>``."""
    return f"mlx_{mode(module)}"


def codes(module: QuantizedLayer) -> dict[str, mx.array]:
    """The layer's code arrays (weight, scales and, in affine mode, biases): MLX arrays are values, so holding
    them keeps this very weight whatever is assigned to the layer later."""
    return {key: module[key] for key in CODE_KEYS if module.get(key) is not None}


def element_count(module: QuantizedLayer) -> int:
    """The number of weights the codes stand for (rows × unpacked columns)."""
    rows, packed = module.weight.shape
    return int(rows * (packed * 32 // module.bits))


def dequantize(module: QuantizedLayer, held: Mapping[str, mx.array] | None = None) -> mx.array:
    """W = scale · q + bias per group, in the scales' dtype, [out, in] (an embedding's [num, dim]); ``held``: codes
    kept by :func:`codes` instead of the layer's current ones."""
    arrays = codes(module) if held is None else held
    weight: mx.array = mx.dequantize(
        arrays["weight"],
        arrays["scales"],
        arrays.get("biases"),
        group_size=module.group_size,
        bits=module.bits,
        mode=mode(module),
    )
    return weight


def requantize(module: QuantizedLayer, weight: mx.array) -> None:
    """Store ``weight`` (cast to the scales' dtype) in the layer as codes of its own bits, group size and mode."""
    quantized = mx.quantize(
        weight.astype(module.scales.dtype), group_size=module.group_size, bits=module.bits, mode=mode(module)
    )
    module.weight, module.scales = quantized[0], quantized[1]
    if len(quantized) > 2 and quantized[2] is not None:
        module.biases = quantized[2]


def restore(module: nn.Module, arrays: Mapping[str, mx.array]) -> None:
    """Put arrays kept from the layer (codes, bias) back as they were."""
    for key, value in arrays.items():
        module[key] = value


def quantized_matmul(module: nn.QuantizedLinear, x: mx.array) -> mx.array:
    """x Wᵀ with the quantised W, without the layer's bias."""
    y: mx.array = mx.quantized_matmul(
        x,
        module["weight"],
        scales=module["scales"],
        biases=module.get("biases"),
        transpose=True,
        group_size=module.group_size,
        bits=module.bits,
        mode=mode(module),
    )
    return y


def dequantized_layer(module: QuantizedLayer) -> nn.Linear | nn.Embedding:
    """An ``nn.Linear`` (bias kept) or ``nn.Embedding`` holding the layer's dequantised weight, frozen as the
    quantised layer was."""
    weight = dequantize(module)
    rows, columns = weight.shape
    layer: nn.Linear | nn.Embedding
    if isinstance(module, nn.QuantizedEmbedding):
        layer = nn.Embedding(rows, columns)
    else:
        layer = nn.Linear(columns, rows, bias="bias" in module)
        if "bias" in module:
            layer.bias = module.bias
    layer.weight = weight
    layer.freeze()
    layer.train(module.training)
    return layer

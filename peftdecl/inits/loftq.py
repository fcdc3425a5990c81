"""LoftQ (Li et al. 2023): LoRA factors that absorb the quantisation error of the base weight, as HF PEFT 0.21.

Alternate T times, starting from R₀ = W: Q = dequant(quant(R)); E = W − Q; E ≈ B A by the rank-r truncated SVD
(A = √S_r V_rᵀ, B = U_r √S_r); R = W − B A. The base weight becomes Q (the float values of its quantised form) and
Q + B A ≈ W. As in PEFT, A and B carry no 1/s: the model computes Q + s·B A, equal to Q + B A when lora_alpha = r.

Quantisation is bitsandbytes' NF4 (block 64, no double quantisation) for 4 bits and its LLM.int8 row-wise codec
(of the float16-rounded weight) for 8 bits, through peftdecl's bit-identical NumPy codecs; PEFT calls
bitsandbytes for both. Everything else is float32 in PEFT and float64 here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from peftdecl.errors import SpecError, TargetError
from peftdecl.plan.ir import LayerPlan
from peftdecl.quant.bnb4 import dequantize_4bit, quantize_4bit
from peftdecl.quant.int8 import dequantize_int8, quantize_int8
from peftdecl.quant.scheme import QuantScheme

NF4_SCHEME = QuantScheme("nf4", block_size=64, double_quant=False)
INT8_SCHEME = QuantScheme("int8")


def loftq_settings(config: Mapping[str, Any]) -> tuple[int, int]:
    """(bits, iterations) of a checked ``loftq_config``."""
    bits, iters = int(config.get("loftq_bits", 4)), int(config.get("loftq_iter", 1))
    if bits not in (4, 8) or iters < 1:
        raise SpecError([("$.loftq_config", f"bits {bits} must be 4 or 8 and iterations {iters} at least 1")])
    return bits, iters


def quantization_roundtrip(weight: np.ndarray, bits: int) -> np.ndarray:
    """dequant(quant(W)) as float32, with bitsandbytes' NF4 (blocks of 64) or its int8 codec of float16(W)."""
    as_f32 = np.asarray(weight, dtype=np.float32)
    if bits == 4:
        return dequantize_4bit(quantize_4bit(as_f32, NF4_SCHEME))
    return dequantize_int8(quantize_int8(as_f32.astype(np.float16), INT8_SCHEME))


def truncated_factors(residual: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """A = √S_r V_rᵀ (r × in) and B = U_r √S_r (out × r): the best rank-r approximation B A of ``residual``."""
    u, s, vh = np.linalg.svd(residual, full_matrices=False)
    root = np.sqrt(s[:r])
    return root[:, None] * vh[:r], u[:, :r] * root[None, :]


def loftq_factors(
    weight: np.ndarray, r: int, bits: int, iterations: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, B, Q) of LoftQ for W (out × in): Q the dequantised weight of the last iteration, W − Q ≈ B A."""
    w = np.asarray(weight, dtype=np.float64)
    target = w
    a = b = q = np.zeros(0)
    for step in range(iterations):
        q = quantization_roundtrip(target, bits).astype(np.float64)
        a, b = truncated_factors(w - q, r)
        if step + 1 < iterations:
            target = w - b @ a
    return a, b, q


def check_loftq_layer(layer: LayerPlan) -> None:
    """Refuse what PEFT 0.21 cannot initialise with LoftQ: its embedding, convolution and raw-parameter layers
    call LoftQ without its config (a TypeError), GPT-2's Conv1D gets factors of the transposed weight, and a
    quantised base would be quantised again (PEFT: "do not pass a quantized model")."""
    info = layer.layer
    if info.type != "linear":
        raise TargetError(
            f"{layer.module}: init_lora_weights='loftq' works on linear layers only (HF PEFT fails on the others), "
            f"not on this {info.type} layer; leave it out of target_modules"
        )
    if info.quantization is not None:
        raise TargetError(
            f"{layer.module}: init_lora_weights='loftq' quantises the float weight itself; this base is already "
            f"quantised ({info.quantization}). Attach to the unquantised model, or attach a plain LoRA to the "
            "quantised one and call peftdecl.replace_lora_weights_loftq"
        )

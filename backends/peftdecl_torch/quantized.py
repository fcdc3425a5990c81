"""bitsandbytes base layers read and written as float weights: dequantise, re-quantise, replace by ``nn.Linear``.

4-bit (``Linear4bit``): W = code[q] · absmax per block of the flattened weight (``dequantize_4bit``), in the dtype
the weight was quantised from. On CPUs with AVX512-BF16 bitsandbytes rewrites a 4-bit weight in place on its first
eval-mode forward (nibbles reordered, block scales transposed and rounded to bfloat16); such a weight is unpacked
with bitsandbytes' own inverse and read with the bfloat16 scales it now computes with, never as raw bytes.
8-bit (``Linear8bitLt``, LLM.int8): W = CB · SCB / 127 per output row (``int8_vectorwise_dequant``), float32.

Re-quantising builds a new ``Params4bit`` / ``Int8Params`` from the float weight with the layer's own settings
(block size, quant type, double quantisation, storage), exactly as bitsandbytes quantises a checkpoint on load, so
a merge rounds to the codes bitsandbytes itself would give the merged float weight.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Literal, cast

import torch
from torch import nn

from peftdecl.errors import PeftdeclError
from peftdecl.quant.requantize import warn_requantized
from peftdecl_torch import cuda_kernels

BnbKind = Literal["4bit", "8bit"]


def bnb_kind(module: nn.Module) -> BnbKind | None:
    """Which bitsandbytes layer ``module`` is: ``"4bit"`` (``Linear4bit``), ``"8bit"`` (``Linear8bitLt`` holding
    int8 codes) or None (read by class name: asking never imports bitsandbytes)."""
    weight = getattr(module, "weight", None)
    name = type(weight).__name__
    if name == "Params4bit" and getattr(weight, "quant_state", None) is not None:
        return "4bit"
    if name == "Int8Params" and cast(torch.Tensor, weight).dtype == torch.int8:
        return "8bit"
    return None


def _bnb() -> Any:
    import bitsandbytes

    return bitsandbytes


def _unpacked_4bit(weight: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """(codes, quant state) in bitsandbytes' ordinary layout; a CPU-repacked weight is unpacked on a copy of its
    state, keeping the bfloat16 block scales its forward now uses (the layer itself is left as it is)."""
    state = weight.quant_state  # type: ignore[attr-defined]
    if not getattr(state, "packing_format_for_cpu", False):
        return weight.data, state
    functional = _bnb().functional
    inverse = getattr(functional, "_convert_weight_packed_for_cpu_inverse", None)
    if inverse is None:
        raise PeftdeclError(
            "a 4-bit weight is in bitsandbytes' AVX512-BF16 repacked CPU layout and this bitsandbytes version "
            "offers no inverse to read it; set support_avx512bf16_for_cpu = False on the layers before their "
            "first eval-mode forward"
        )
    scratch = copy.copy(state)
    scratch.original_nested = False  # keep the bfloat16 scales: re-quantising them would change the weight
    codes, _ = inverse(weight.data, scratch)
    absmax = state.absmax.t().reshape(-1).float()  # [K/block, N] -> row-major blocks of [N, K]
    plain = functional.QuantState(
        absmax=absmax,
        shape=state.shape,
        code=state.code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=state.original_dtype,
    )
    return codes, plain


@cuda_kernels.replaces("nf4_dequantize")
def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as floats [out, in] (a new tensor; the layer keeps its codes): 4-bit in the dtype it
    was quantised from, int8 in float32. A float weight is returned as it is."""
    kind = bnb_kind(module)
    weight = cast(torch.Tensor, module.weight)
    if kind is None:
        return weight
    functional = _bnb().functional
    if kind == "4bit":
        codes, state = _unpacked_4bit(weight)
        out: torch.Tensor = functional.dequantize_4bit(codes, state)
        return out
    scb = getattr(weight, "SCB", None)
    if scb is None:  # the first forward moves CB/SCB from the weight to the layer's state
        scb = cast(Any, module.state).SCB
    if scb is None:
        raise PeftdeclError(f"{type(module).__name__}: int8 weight without its row scales (SCB)")
    dequantized: torch.Tensor = functional.int8_vectorwise_dequant(weight.data, scb.to(weight.device))
    return dequantized


def float_dtype(module: nn.Module) -> torch.dtype:
    """The float dtype a bitsandbytes layer's weight dequantises to (:func:`dequantized_weight`)."""
    kind = bnb_kind(module)
    if kind == "4bit":
        state = cast(Any, module.weight).quant_state
        packed = getattr(state, "packing_format_for_cpu", False)
        return cast(torch.dtype, state.original_dtype if packed else state.dtype)
    if kind == "8bit":
        return torch.float32
    return cast(torch.Tensor, module.weight).dtype


def requantize(module: nn.Module, weight: torch.Tensor) -> None:
    """Store the float ``weight`` [out, in] in the bitsandbytes layer ``module``, quantised with its own scheme
    (a new parameter replaces the old one, on the same device)."""
    kind = bnb_kind(module)
    old = cast(torch.Tensor, module.weight)
    device = old.device
    nn_modules = _bnb().nn
    data = weight.detach().to("cpu").contiguous()
    if kind == "4bit":
        module.weight = nn_modules.Params4bit(
            data,
            requires_grad=False,
            blocksize=old.blocksize,  # type: ignore[attr-defined]
            compress_statistics=old.compress_statistics,  # type: ignore[attr-defined]
            quant_type=old.quant_type,  # type: ignore[attr-defined]
            quant_storage=old.quant_storage,  # type: ignore[attr-defined]
            module=module,
        ).to(device)
        return
    if kind == "8bit":
        module.weight = nn_modules.Int8Params(
            data,
            requires_grad=False,
            has_fp16_weights=old.has_fp16_weights,  # type: ignore[attr-defined]
        ).to(device)
        # the next forward takes CB/SCB from the new weight, not the old ones the layer's state still holds
        cast(Any, module.state).reset_grads()
        return
    raise PeftdeclError(f"{type(module).__name__} is not a quantised bitsandbytes layer")


def dequantized_linear(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    """A plain ``nn.Linear`` holding ``module``'s dequantised weight in ``dtype`` (default :func:`float_dtype`)
    and its bias, on the same device, in the same training mode."""
    weight = dequantized_weight(module).detach()
    dtype = dtype or weight.dtype
    bias = cast("torch.Tensor | None", getattr(module, "bias", None))
    linear = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=dtype
    )
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    linear.weight.requires_grad_(False)
    if bias is not None:
        linear.bias.requires_grad_(bias.requires_grad)
    linear.train(module.training)
    return linear


def model_float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first float parameter outside bitsandbytes layers (float32 if none): what an int8
    layer's input and output carry, so its dequantised ``nn.Linear`` takes that dtype."""
    for module in model.modules():
        if bnb_kind(module) is not None:
            continue
        for param in module.parameters(recurse=False):
            if param.is_floating_point():
                return param.dtype
    return torch.float32


def replace_quantized(model: nn.Module, int8_dtype: torch.dtype) -> list[str]:
    """Replace every quantised bitsandbytes layer of ``model`` by :func:`dequantized_linear` (4-bit in the dtype
    it was quantised from, int8 in ``int8_dtype``); the names replaced."""
    found = [(name, m) for name, m in model.named_modules() if bnb_kind(m) is not None]
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        dtype = int8_dtype if bnb_kind(module) == "8bit" else float_dtype(module)
        setattr(parent, child, dequantized_linear(module, dtype))
    return [name for name, _ in found]


def warn_merging(modules: Mapping[str, str]) -> None:
    """One :class:`peftdecl.quant.requantize.RequantizationWarning` for a merge that re-quantises ``modules``
    (name -> quantisation), naming the first and counting the others; nothing when there are none."""
    if not modules:
        return
    first, quantization = next(iter(modules.items()))
    more = len(modules) - 1
    warn_requantized(first + (f" and {more} more layer{'s' * (more > 1)}" if more else ""), quantization)

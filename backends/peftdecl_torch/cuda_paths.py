"""What each ``@cuda_kernels.replaces(name)`` hook runs: the kernel path for the cases its kernels cover, else
``NotImplemented`` (the torch function then runs). Each path is ``fn(kernels, *the hooked function's args)``.

Covered: tensors on the kernels' device, activations in ``kernels.dtypes`` (float32, bfloat16), rotations, scales
and VeRA factors in ``kernels.param_dtypes`` (float32); rotation blocks up to ``kernels.max_block`` wide, LoHa
ranks up to ``kernels.max_rank``; linear layers (IA3, VeRA), matrices (LoHa without the CP form, LoKr with 2-D
factors); 4-bit bitsandbytes weights in the ordinary (not CPU-repacked) layout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from peftdecl.plan import LayerPlan
from peftdecl.plan.kinds.oft import neumann_coefficients
from peftdecl_torch import cuda_functions as fn
from peftdecl_torch import cuda_lowrank, cuda_mixed
from peftdecl_torch.cuda_kernels import on_device
from peftdecl_torch.kinds import _fused as fused

if TYPE_CHECKING:
    from torch import nn

    from peftdecl_torch.cuda_functions import Kernels
    from peftdecl_torch.layer import AdaptedLayer

Params = dict[str, torch.Tensor]
_LINEAR = ("linear", "gpt2_conv1d")
MAX_GRID_ROWS = 65535  # the LoHa kernel runs one grid row per output row (CUDA's grid y limit)


def activations_ok(kern: Kernels, *tensors: torch.Tensor | None) -> bool:
    """Every tensor on the kernels' device, in an activation dtype they take."""
    return on_device(*tensors) and all(t is None or t.dtype in kern.dtypes for t in tensors)


def params_ok(kern: Kernels, *tensors: torch.Tensor) -> bool:
    """Every tensor on the kernels' device, in a parameter dtype they take."""
    return on_device(*tensors) and all(t.dtype in kern.param_dtypes for t in tensors)


def rotate_blocks(kern: Kernels, x: torch.Tensor, r: torch.Tensor) -> Any:
    """x · blockdiag(R) (OFT's input or weight rotation)."""
    if not activations_ok(kern, x) or not params_ok(kern, r) or r.shape[-1] > kern.max_block:
        return NotImplemented
    return fn.apply(fn.RotateBlocks, x, r, kern)


def butterfly(kern: Kernels, x: torch.Tensor, q: torch.Tensor, perms: list) -> Any:
    """x M through BOFT's factors; ``perms[i]`` is (p_i, p_i⁻¹) or None (identity)."""
    if not activations_ok(kern, x) or not params_ok(kern, q) or q.shape[-1] > kern.max_block:
        return NotImplemented
    idx = [None if pair is None else pair[1].to(torch.int32) for pair in perms]
    return fn.apply(fn.Butterfly, x, q, idx, kern)


def cayley(kern: Kernels, s: torch.Tensor) -> Any:
    """(I − S)(I + S)⁻¹ per block; the callers (OFT, BOFT) pass skew-symmetric S, which the kernel's unpivoted
    elimination needs."""
    if not params_ok(kern, s) or s.shape[-1] > kern.max_block or s.numel() == 0:
        return NotImplemented
    return fn.apply(fn.Cayley, s, kern)


def neumann(kern: Kernels, q: torch.Tensor, terms: int) -> Any:
    """HF PEFT's Neumann series per block."""
    if not params_ok(kern, q) or q.shape[-1] > kern.max_block or q.numel() == 0:
        return NotImplemented
    return fn.apply(fn.Neumann, q, neumann_coefficients(terms), kern)


def _scaled(kern: Kernels, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and (y.requires_grad or scale.requires_grad):
        return fn.apply(fn.ScaleColumns, y, scale, kern)
    if y.is_contiguous():  # inference: the fresh tensor scaled in place, as the torch path does
        return kern.scale_columns(y.view(-1, y.shape[-1]), scale, True).view(y.shape)
    return kern.scale_columns(y.reshape(-1, y.shape[-1]).contiguous(), scale, False).view(y.shape)


def ia3_forward(
    kern: Kernels, ops: object, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor
) -> Any:
    """IA3 on a linear layer: l ⊙ base(x), or base(l ⊙ x) for a feed-forward layer, the product one kernel pass."""
    scale = p["ia3_l"].reshape(-1)
    if lp.layer.type not in _LINEAR or not activations_ok(kern, x) or not params_ok(kern, scale):
        return NotImplemented
    if lp.options["feedforward"]:
        return layer.base_forward(_scaled(kern, x, scale))
    y = layer.base_forward(x)
    if not activations_ok(kern, y):  # e.g. a float16 output under autocast: the torch path's product
        return (y * scale).to(y.dtype)
    return _scaled(kern, y, scale)


def vera_forward(
    kern: Kernels, ops: object, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor
) -> Any:
    """VeRA on a linear layer with a frozen base: u = x Aᵀ and either the scaled expand added to y in one kernel
    pass or, for many tokens, one GEMM with the merged weight built in one kernel pass
    (:class:`peftdecl_torch.cuda_functions.VeraLinear`)."""
    from peftdecl_torch.kinds.vera import _projections

    a, b = _projections(lp, p)
    lam_d, lam_b = p["vera_lambda_d"], p["vera_lambda_b"]
    weight, bias = layer.base_weight, layer.bias
    if (
        lp.layer.type != "linear"
        or layer.quantized
        or (layer.training and lp.options["dropout"] > 0)
        or torch.is_autocast_enabled(x.device.type)
        or not activations_ok(kern, x, weight, bias)
        or weight.dtype != x.dtype
        or weight.requires_grad
        or (bias is not None and bias.requires_grad)
        or not params_ok(kern, a, b, lam_d, lam_b)
    ):
        return NotImplemented
    # fold the update into W from as many tokens as LoRA does (kinds/_fused.py), while training in float32 only
    merged = (
        fused.merge_for_training(lp, layer, x) if torch.is_grad_enabled() else fused.merge_pays(lp, layer, x)
    )
    return fn.apply(fn.VeraLinear, x, weight, bias, a, b, lam_d, lam_b, merged, kern)


def loha_delta(kern: Kernels, lp: LayerPlan, p: Params) -> Any:
    """ΔW = s · (w1a w1b) ⊙ (w2a w2b) in one kernel (not the CP form of an effective conv)."""
    if lp.options["effective_conv"]:
        return NotImplemented
    a1, b1, a2, b2 = (p[f"hada_w{i}_{side}"] for i in (1, 2) for side in "ab")
    if (
        not activations_ok(kern, a1, b1, a2, b2)
        or len({t.dtype for t in (a1, b1, a2, b2)}) != 1
        or max(a1.shape[1], a2.shape[1]) > kern.max_rank
        or a1.shape[0] > MAX_GRID_ROWS
    ):
        return NotImplemented
    delta = fn.apply(fn.LohaDelta, a1, b1, a2, b2, float(lp.scaling), kern)
    return delta.reshape(lp.layer.weight_shape)


def lokr_delta(kern: Kernels, lp: LayerPlan, p: Params) -> Any:
    """ΔW = s · kron(w1, w2) in one kernel, for matrix factors (linear layers)."""
    from peftdecl_torch.kinds.lokr import factor_w1, factor_w2

    if not on_device(*p.values()):  # before multiplying any factor out
        return NotImplemented
    w1, w2 = factor_w1(p), factor_w2(p)
    if w1.ndim != 2 or w2.ndim != 2 or w1.dtype != w2.dtype or not activations_ok(kern, w1, w2):
        return NotImplemented
    return fn.apply(fn.KronDelta, w1, w2, float(lp.scaling), kern).reshape(lp.layer.weight_shape)


def _four_bit(kern: Kernels, module: nn.Module) -> tuple[Any, torch.Tensor, torch.Tensor] | None:
    """(quant state, codes as bytes, float32 block scales) of a bitsandbytes 4-bit layer in the ordinary layout on
    the kernels' device, in a dtype they take; None otherwise."""
    from peftdecl_torch.quantized import bnb_kind

    if bnb_kind(module) != "4bit":
        return None
    weight: Any = module.weight
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False) or not on_device(weight.data):
        return None
    if state.dtype not in kern.dtypes:
        return None
    absmax = state.absmax
    if state.nested:  # absmax = code2[q] · absmax2[i // blocksize2] + offset
        nested = state.state2
        absmax = kern.absmax_dequant(
            absmax, nested.code.float(), nested.absmax.float(), 0.0, nested.blocksize
        )
        absmax = absmax + state.offset  # a device scalar: added by torch, no host round trip
    return state, weight.data.view(torch.uint8).reshape(-1), absmax.float().contiguous()


def nf4_dequantize(kern: Kernels, module: nn.Module) -> Any:
    """A bitsandbytes 4-bit weight dequantised in one kernel (double-quantised block scales decoded first)."""
    found = _four_bit(kern, module)
    if found is None:
        return NotImplemented
    state, codes, absmax = found
    out = torch.empty(tuple(state.shape), dtype=state.dtype, device=codes.device)
    return kern.nf4_dequant(codes, absmax, state.code.float(), state.blocksize, out)


def composed_forward(kern: Kernels, layer: AdaptedLayer, x: torch.Tensor, names: Sequence[str]) -> Any:
    """The layer's composed path (several adapters, or one whose dtype differs from the base's, e.g. any adapter
    over a quantised base): one LoRA adapter over a 4-bit base takes :func:`qlora_forward`."""
    if len(names) != 1:
        return NotImplemented
    lp = layer._plans[names[0]]
    if lp.kind != "lora":
        return NotImplemented
    return qlora_forward(kern, lp, layer, layer.tensors(names[0]), x)


def qlora_forward(kern: Kernels, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor) -> Any:
    """LoRA over a bitsandbytes 4-bit layer, at inference on many tokens (:func:`.kinds._fused.merge_pays`):
    W' = dequant(W) + s·B A in one kernel pass over the codes, then one GEMM — where bitsandbytes' own path
    dequantises and multiplies, and LoRA adds its shrink and expand products."""
    if (
        torch.is_grad_enabled()
        or not layer.quantized
        or lp.layer.type != "linear"
        or "lora_A.weight" not in p
        or "lora_B.bias" in p
        or (layer.training and lp.options["dropout"] > 0)
        or not activations_ok(kern, x)
        or not fused.merge_pays(lp, layer, x)
    ):
        return NotImplemented
    a, b = p["lora_A.weight"], p["lora_B.weight"]
    if not params_ok(kern, a, b) or a.shape[0] > kern.max_rank or b.shape[0] > MAX_GRID_ROWS:
        return NotImplemented
    found = _four_bit(kern, layer.base_layer)
    if found is None or found[0].dtype != x.dtype:
        return NotImplemented
    state, codes, absmax = found
    weight = torch.empty(tuple(state.shape), dtype=x.dtype, device=x.device)
    kern.nf4_lowrank(codes, absmax, state.code.float(), state.blocksize, b, a, float(lp.scaling), weight)
    bias = layer.bias
    return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))


PATHS: dict[str, Callable[..., Any]] = {
    "rotate_blocks": rotate_blocks,
    "butterfly": butterfly,
    "cayley": cayley,
    "neumann": neumann,
    "ia3_forward": ia3_forward,
    "vera_forward": vera_forward,
    "loha_delta": loha_delta,
    "lokr_delta": lokr_delta,
    "nf4_dequantize": nf4_dequantize,
    "composed_forward": composed_forward,
    "mixed_forward": cuda_mixed.mixed_forward,
    "lora_forward": cuda_lowrank.lora_forward,
    "adalora_forward": cuda_lowrank.adalora_forward,
    "dora_weight_norm": cuda_lowrank.dora_weight_norm,
    "dora_forward": cuda_lowrank.dora_forward,
}
"""Hook name -> kernel path."""

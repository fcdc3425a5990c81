"""When a kind may run a linear layer through its hand-written autograd Function instead of composed torch ops,
and which form of the Function pays for a given call.

The Functions assume a frozen base weight, one dtype throughout, no autocast and no dropout on the adapter input
(dropout masks would have to be kept for the backward pass); anything else takes the composed path, which
autograd differentiates as usual. The engine option ``fused=False`` (:class:`peftdecl.options.EngineOptions`)
forces the composed path (the tests run both).

Half-precision bases (LoRA, AdaLoRA, DoRA; OFT where it rotates the weight; LoHa/LoKr in _weight_delta): with float32
adapters on a bfloat16/float16 base, HF PEFT casts the input up and runs the adapter in float32 (a float32 copy of
every input and memory-bound float32 products). These kinds cast the adapter's small matrices down per call
instead and run in the base dtype with float32 accumulation, which is what PEFT computes under torch.autocast;
results differ from PEFT's float32 adapter path by half-precision rounding (≈ 2⁻⁸ relative), and the float32
parameters receive the gradients. The engine option ``half_compute=False`` restores the float32 adapter path.

Cost rules (x: T tokens × d_in, W: d_out × d_in, rank or block size r), as in dLoRA's "merge or don't":

- merge (LoRA, AdaLoRA): folding the update into the weight costs d_in·d_out·r once per call; applying it to
  the tokens costs T·r·(d_in + d_out). Merge from T·(d_in + d_out) ≥ d_in·d_out tokens (:func:`merge_pays`);
  while training only in float32/float64 (:func:`merge_for_training`: W + ΔW rounded to a half type would drop
  most of a small ΔW).
- rotate the weight (OFT): W·Rᵀ costs d_out·d_in·r, rotating the input T·d_in·r: from T ≥ d_out tokens
  (:func:`rotate_weight_pays`).

The engine option ``fused_merged`` overrides both rules (True: always merge / rotate the weight, False: never).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F  # noqa: N812  (the torch idiom)

from peftdecl.plan import LayerPlan

if TYPE_CHECKING:
    from peftdecl_torch.layer import AdaptedLayer

SPLIT_K = 8
"""Row slices of :func:`tn` on the CPU (see there)."""


class FunctionContext(Protocol):
    """The ``ctx`` torch hands this package's autograd Functions (its stubs leave it untyped), as backwards read it.

    ``saved_tensors`` returns what the forward passed to ``save_for_backward``, None where it passed None (a
    backward annotates such an entry as optional where it unpacks it). The Python values a forward stores on the
    ctx are declared by each Function's own context Protocol, derived from this one."""

    @property
    def saved_tensors(self) -> tuple[torch.Tensor, ...]: ...
    @property
    def needs_input_grad(self) -> tuple[bool, ...]: ...
    def save_for_backward(self, *tensors: torch.Tensor | None) -> None: ...


class WeightContext(FunctionContext, Protocol):
    """The ctx of a Function on a base weight stored as PEFT stores it (GPT-2 Conv1D: [in, out])."""

    stored_in_out: bool


class ScaledContext(WeightContext, Protocol):
    """The ctx of a Function that also scales a low-rank update by s."""

    scaling: float


HALF = (torch.bfloat16, torch.float16)


def fusable(
    lp: LayerPlan,
    layer: AdaptedLayer,
    x: torch.Tensor,
    dtype: torch.dtype,
    dropout: float = 0.0,
    half_compute: bool = False,
) -> bool:
    """True if ``layer`` (linear or GPT-2 Conv1D) can run this call through a fused Function: one dtype
    throughout, or with ``half_compute`` a half-precision base and input with float32 adapter tensors, which the
    caller casts to the base dtype (see :func:`compute_dtype`)."""
    options = layer.options
    if (
        not options.fused
        or layer.quantized  # its stored weight is codes (even when stored as floats: bnb_4bit_quant_storage)
        or lp.layer.type not in ("linear", "gpt2_conv1d")
        or (layer.training and dropout > 0)
    ):
        return False
    weight, bias = layer.base_weight, layer.bias
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return False  # the hand-written backward gives no gradient to the base weights
    if torch.is_autocast_enabled(x.device.type) or x.dtype != weight.dtype:
        return False
    return x.dtype == dtype or (
        half_compute and options.half_compute and x.dtype in HALF and dtype == torch.float32
    )


def compute_dtype(x: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` cast to the input's dtype: a no-op unless a half-precision base runs
    float32 adapters, whose products then run in the base dtype with float32 accumulation, as under autocast;
    autograd returns their gradients to the float32 parameters."""
    return tuple(None if t is None else t.to(x.dtype) for t in tensors)


def weight_ir(weight: torch.Tensor, stored_in_out: bool) -> torch.Tensor:
    """The weight as [out, in] (a view: GPT-2 Conv1D stores [in, out])."""
    return weight.t() if stored_in_out else weight


def linear(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x2 wᵀ + b for 2-D x2 and w [out, in] (any strides), the product torch's own linear layer computes."""
    return F.linear(x2, w, bias)


def tokens(x: torch.Tensor) -> int:
    return x.numel() // max(x.shape[-1], 1)


def merge_pays(lp: LayerPlan, layer: AdaptedLayer, x: torch.Tensor) -> bool:
    """Whether folding a low-rank update into the weight (out·in work) is cheaper than applying it to every
    token (tokens·(in + out) each): true beyond in·out / (in + out) tokens (or as ``fused_merged`` forces)."""
    forced = layer.options.fused_merged
    if forced is not None:
        return forced
    d_in, d_out = lp.layer.in_features, lp.layer.out_features
    return tokens(x) * (d_in + d_out) >= d_in * d_out


def merge_for_training(lp: LayerPlan, layer: AdaptedLayer, x: torch.Tensor) -> bool:
    """:func:`merge_pays` for a call that autograd records, float32/float64 only."""
    forced = layer.options.fused_merged
    if forced is not None:
        return forced
    return x.dtype in (torch.float32, torch.float64) and merge_pays(lp, layer, x)


def rotate_weight_pays(lp: LayerPlan, layer: AdaptedLayer, x: torch.Tensor) -> bool:
    """Whether rotating the weight (out·in·b work) is cheaper than rotating the input (tokens·in·b)."""
    forced = layer.options.fused_merged
    if forced is not None:
        return forced
    return tokens(x) >= lp.layer.out_features


def tn(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """leftᵀ·right for left [T, m], right [T, n] with m small (a rank): the adapter-weight gradients.

    On the CPU with many rows it runs as SPLIT_K independent products over row slices, summed: BLAS libraries
    spread one such thin product over their threads poorly, k independent ones well (docs/performance.md)."""
    rows, k = left.shape[0], SPLIT_K
    if left.device.type != "cpu" or rows < 128 * k or rows % k:
        return left.t() @ right
    slices = torch.bmm(left.reshape(k, rows // k, -1).transpose(1, 2), right.reshape(k, rows // k, -1))
    return slices.sum(0)

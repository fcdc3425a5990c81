"""Mixed-adapter batches (``adapter_names=``) on the CUDA kernels: the ``mixed_forward`` hook's path.

The torch path (:meth:`peftdecl_torch.layer.AdaptedLayer._mixed_forward`) runs the base layer, then each adapter
on its rows (``index_select``, the adapter's ``accumulate``, ``index_copy``). Here the base layer runs as before and
one launch of ``kernels/mixed_batch.cu`` (:class:`peftdecl_cupy.mixed.CupyMixed`) adds every row's update in place:
Y[t] += s_i (X[t] A_iᵀ) B_iᵀ over the batch's tokens, each with its row's adapter (or none: ``"__base__"`` rows
and adapters that do not target the layer), segmented for prefill and gathered for decode.

Covered: linear layers (``nn.Linear``, GPT-2's Conv1D) whose rows run plain LoRA (no ``lora_bias``) or AdaLoRA
(A passed as Q ⊙ Λ, the product its torch path forms too), at inference (no tensor requiring grad; no dropout in
training mode; no autocast), all adapters in one dtype the kernels take, on the kernels' device. As in the torch
path the update is computed in the adapters' dtype (the input and the base output cast to it where they differ)
and the sum cast back to the base output's dtype. Anything else returns ``NotImplemented``, and the torch loop
runs: other kinds among the rows (LoHa, LoKr, VeRA), embeddings and convolutions, a rank past the gathered
kernels' limit where they would run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from peftdecl_cupy import mixed, planning
from peftdecl_torch.cuda_kernels import on_device

if TYPE_CHECKING:
    from peftdecl_torch.cuda_functions import Kernels
    from peftdecl_torch.layer import AdaptedLayer
    from peftdecl_torch.mixed_batch import RowAdapters

_LINEAR = ("linear", "gpt2_conv1d")

Factors = tuple[torch.Tensor, torch.Tensor, float]


def _factors(layer: AdaptedLayer, name: str) -> Factors | None:
    """(A [r, in], B [out, r], s) of adapter ``name`` on ``layer`` where its update is s·B A x, else None."""
    lp = layer.plan(name)
    if lp.layer.type not in _LINEAR or (layer.training and lp.options.get("dropout", 0.0) > 0):
        return None
    p = layer.tensors(name)
    if lp.kind == "lora" and "lora_A.weight" in p and "lora_B.bias" not in p:
        return p["lora_A.weight"], p["lora_B.weight"], float(lp.scaling)
    if lp.kind == "adalora":
        from peftdecl_torch.kinds.adalora import singular_values

        return p["lora_A"] * singular_values(lp, p), p["lora_B"], float(lp.scaling)
    return None


def _needs_grad(layer: AdaptedLayer, x: torch.Tensor, factors: list[Factors]) -> bool:
    if not torch.is_grad_enabled():
        return False
    tensors = [x, *(t for a, b, _ in factors for t in (a, b)), *layer.base_layer.parameters()]
    return any(t.requires_grad for t in tensors)


def mixed_forward(kern: Kernels, layer: AdaptedLayer, x: torch.Tensor, row_adapters: RowAdapters) -> Any:
    """base(x) plus each row's adapter update, the updates in one mixed-batch launch."""
    if x.ndim < 2 or x.numel() == 0 or not x.is_floating_point() or torch.is_autocast_enabled(x.device.type):
        return NotImplemented
    rows = row_adapters.for_batch(x.shape[0], layer.module_name)
    found = planning.adapter_index(rows, layer.adapter_names)
    if not found.adapters:
        return NotImplemented  # every row runs the base layer: the torch path does only that
    factors = []
    for name in found.adapters:
        f = _factors(layer, name)
        if f is None:
            return NotImplemented
        factors.append(f)
    dtype = factors[0][0].dtype
    if (
        dtype not in kern.dtypes
        or any(a.dtype != dtype or b.dtype != dtype for a, b, _ in factors)
        or not on_device(x, *(t for a, b, _ in factors for t in (a, b)))
        or _needs_grad(layer, x, factors)
    ):
        return NotImplemented
    tokens_per_row = x[0].numel() // x.shape[-1]
    index = planning.token_index(found.rows, tokens_per_row)
    # the rank first: the segment planning behind gathered() runs again in the launch, so only where it decides
    if max(a.shape[0] for a, _, _ in factors) > kern.max_gather_rank and mixed.gathered(index):
        return NotImplemented
    result = layer.base_forward(x)
    y = result.to(dtype).reshape(-1, result.shape[-1])
    if not y.is_contiguous():
        y = y.contiguous()
    # the base layer's fresh output (or its cast) takes the updates in place
    xa = x.to(dtype).reshape(-1, x.shape[-1]).contiguous()
    kern.mixed(xa, y, [(a.contiguous(), b.contiguous(), s) for a, b, s in factors], index)
    return y.view(result.shape).to(result.dtype)

"""BOFT (Liu et al., 2024) on torch: y = ((x M) Wᵀ) ⊙ s + b, M = B_{N−1} ⋯ B_0,
B_i = P_i · blockdiag(Q_{i,1..D}) · P_iᵀ, Q = Cayley(S) = (I − S)(I + S)⁻¹, S = ½(R − Rᵀ).

A linear layer sends x through the butterfly factor by factor (gathers and one batched matmul each), never forming
M; a convolution runs with the kernel diag(s) W Mᵀ (M built from the rows of I). Merged: W' = diag(s) W Mᵀ,
unmerged with M⁻¹ = Mᵀ. Training-mode ``boft_dropout``: one random factor has int(p·D) random blocks set to I.
Several active adapters: y = ((x M_k ⋯ M_1) Wᵀ) ⊙ s_1 ⋯ s_k + b, HF PEFT's product, also their merge in turn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F  # noqa: N812  (the torch idiom)

from peftdecl.errors import BackendError
from peftdecl.kinds import compositions
from peftdecl.plan import LayerPlan
from peftdecl_torch.kinds._rotation import butterfly, butterfly_perms, cayley

if TYPE_CHECKING:
    from peftdecl_torch.layer import AdaptedLayer


Params = dict[str, torch.Tensor]


def perms(lp: LayerPlan, device: torch.device) -> list:
    o = lp.options
    return butterfly_perms(o["width"], o["block_num"], o["block_size"], o["n_butterfly_factor"], device)


def orthogonal_blocks(lp: LayerPlan, layer: AdaptedLayer, p: Params, training: bool) -> torch.Tensor:
    """Q of every factor's blocks [N, D, H, H], with training-mode block dropout applied (drawn from the engine's
    generator)."""
    r = p["boft_R"]
    q = cayley(0.5 * (r - r.transpose(-1, -2)))
    rate = lp.options["dropout"]
    if training and rate > 0.0:
        factors, blocks = q.shape[:2]
        dropped = torch.zeros(factors, blocks, dtype=torch.bool, device=q.device)
        chosen = layer.integers(factors)
        dropped[chosen, layer.permutation(blocks, q.device)[: int(rate * blocks)]] = True
        q = torch.where(dropped[..., None, None], torch.eye(q.shape[-1], dtype=q.dtype, device=q.device), q)
    return q


def butterfly_matrix(lp: LayerPlan, p: Params, q: torch.Tensor) -> torch.Tensor:
    """The dense M (rows of I sent through the butterfly), for convolutions and merging."""
    eye = torch.eye(lp.options["width"], dtype=q.dtype, device=q.device)
    return butterfly(eye, q, perms(lp, q.device))


class BoftOps:
    """BOFT's :class:`peftdecl.backend.ComposingOps` (INPUT): a map of the weight, W ↦ diag(s) W Mᵀ."""

    kind = "boft"
    additive = False
    # HF PEFT multiplies the active adapters' butterflies as M_k ⋯ M_1: the last one transforms the input first
    input_order = "reversed"

    def forward(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor) -> torch.Tensor:
        q = orthogonal_blocks(lp, layer, p, layer.training)
        scale = p["boft_s"].reshape(-1)
        bias = layer.bias
        if layer.quantized and not lp.layer.is_conv:
            # the quantised layer's own kernel on x M, then ⊙ s: no dense weight, as HF PEFT runs it
            rotated = butterfly(x.to(q.dtype), q, perms(lp, q.device)).to(x.dtype)
            y = layer.base_forward(rotated).to(q.dtype)
            y = y * scale if bias is None else (y - bias.to(q.dtype)) * scale + bias.to(q.dtype)
            return y.to(x.dtype)
        weight = layer.weight_ir()
        if lp.layer.is_conv:
            kernel = self._scaled_kernel(weight.to(q.dtype), butterfly_matrix(lp, p, q), scale)
            return layer.functional(x.to(q.dtype), kernel, None if bias is None else bias.to(q.dtype)).to(
                x.dtype
            )
        rotated = butterfly(x.to(q.dtype), q, perms(lp, q.device))
        y = F.linear(rotated, weight.to(q.dtype)) * scale
        if bias is not None:
            y = y + bias.to(q.dtype)
        return y.to(x.dtype)

    composition = staticmethod(compositions.boft)

    def compose_output(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        raise BackendError(f"{lp.module}: BOFT composes on the layer's weight, not on its output")

    def compose_weight(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, weight: torch.Tensor
    ) -> torch.Tensor:
        """diag(s) W Mᵀ (its merge): y = ((x M) Wᵀ) ⊙ s + b."""
        q = orthogonal_blocks(lp, layer, p, layer.training)
        return self._scaled_kernel(weight.to(q.dtype), butterfly_matrix(lp, p, q), p["boft_s"].reshape(-1))

    def delta_weight(self, lp: LayerPlan, layer: AdaptedLayer, p: Params) -> torch.Tensor:
        """W' − W (BOFT is multiplicative; provided for inspection)."""
        return self.merge(lp, layer, p, {})[0] - layer.weight_ir()

    def merge(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, cache: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = layer.weight_ir()
        q = orthogonal_blocks(lp, layer, p, False)
        merged = self._scaled_kernel(weight.to(q.dtype), butterfly_matrix(lp, p, q), p["boft_s"].reshape(-1))
        return merged.to(weight.dtype), None

    def unmerge(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, cache: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = layer.weight_ir()
        q = orthogonal_blocks(lp, layer, p, False)
        flat = weight.reshape(weight.shape[0], -1).to(q.dtype) / p["boft_s"].reshape(-1, 1)
        return (flat @ butterfly_matrix(lp, p, q)).reshape(weight.shape).to(weight.dtype), None

    @staticmethod
    def _scaled_kernel(weight: torch.Tensor, m: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        flat = weight.reshape(weight.shape[0], -1)
        return (scale[:, None] * (flat @ m.t())).reshape(weight.shape)


OPS = BoftOps()

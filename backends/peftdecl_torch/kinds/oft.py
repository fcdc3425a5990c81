"""OFT (Qiu et al., 2023) on torch: y = base(x · R), R = blockdiag(R_1..R_n), R_i = Cayley(Q_i), Q_i = U_i − U_iᵀ.

Linear layers rotate the input blockwise (one batched matmul, no d × d matrix); an embedding rotates its output,
y = E[x] R; a convolution runs with the rotated kernel W Rᵀ (the patches it reads, rotated), as the NumPy
reference defines it. ``use_cayley_neumann`` picks HF PEFT's Neumann series (≈ Rᵀ of the exact transform). COFT
projects the stored tensor in place before each use; training-mode module dropout replaces int(p·n) random
blocks by I.
"""

from __future__ import annotations

from typing import Any

import torch

from peftdecl.plan import LayerPlan
from peftdecl_torch.kinds import _fused as fused
from peftdecl_torch.kinds._rotation import cayley, neumann, rotate_blocks, skew_from_triu

Params = dict[str, torch.Tensor]
LAYER_TYPES = ("linear", "embedding", "conv2d")


def project_coft(u: torch.Tensor, block: int, eps: float) -> None:
    """Scale each row in place so that ‖Q_i‖_F ≤ eps/√rows (HF PEFT's ``_project_batch``)."""
    with torch.no_grad():
        limit = eps / u.shape[0] ** 0.5
        norms = torch.linalg.matrix_norm(skew_from_triu(u, block))
        factor = torch.where(
            norms <= limit, torch.ones_like(norms), limit / torch.where(norms > 0, norms, 1.0)
        )
        u.mul_(factor[:, None])


def block_rotations(lp: LayerPlan, p: Params) -> torch.Tensor:
    """R of the stored blocks (one block with block_share)."""
    opts = lp.options
    u = p[lp.params[0].name]
    if opts["coft"]:
        project_coft(u, opts["block_size"], opts["eps"])
    q = skew_from_triu(u, opts["block_size"])
    return neumann(q, opts["num_cayley_neumann_terms"]) if opts["use_cayley_neumann"] else cayley(q)


def full_rotation(lp: LayerPlan, r: torch.Tensor, training: bool) -> torch.Tensor:
    """The n blocks the layer applies: a shared block repeated; in training int(p·n) random blocks set to I."""
    rate, rows = lp.options["module_dropout"], r.shape[0]
    if training and rate > 0.0 and rows > 1:
        dropped = torch.zeros(rows, dtype=torch.bool, device=r.device)
        dropped[torch.randperm(rows, device=r.device)[: int(rate * rows)]] = True
        eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
        r = torch.where(dropped[:, None, None], eye, r)
    return r.expand(lp.options["n_blocks"], *r.shape[1:])


def _rotated_kernel(layer: Any, rot: torch.Tensor) -> torch.Tensor:
    weight = layer.weight_ir()
    flat = weight.reshape(weight.shape[0], -1).to(rot.dtype)
    return rotate_blocks(flat, rot.transpose(1, 2)).reshape(weight.shape)  # W Rᵀ, row by row


class OftLinearFunction(torch.autograd.Function):
    """y = (x R) Wᵀ + b for a frozen W, run as one matmul with the rotated weight W Rᵀ (blockwise, out·in·b work).

    Backward: g = dy W (the base's own input-gradient matmul), dL/dx = g Rᵀ and dL/dR_i = Σ_t x_iᵀ g_i, blockwise;
    ``rot`` is an autograd input, so the gradient reaches the stored parameters through the Cayley/Neumann map.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Any, rot: torch.Tensor, stored_in_out: bool
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        w = fused.weight_ir(weight, stored_in_out)
        rotated_t = _rotate_rows_of_transpose(rot, w)  # (W Rᵀ)ᵀ = R Wᵀ, [in, out]
        y = torch.addmm(bias, x2, rotated_t) if bias is not None else torch.mm(x2, rotated_t)
        ctx.stored_in_out = stored_in_out
        ctx.save_for_backward(x, weight, rot)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        x, weight, rot = ctx.saved_tensors
        n, b, _ = rot.shape
        grad_rotated = torch.mm(dy.reshape(-1, dy.shape[-1]), fused.weight_ir(weight, ctx.stored_in_out))
        dx = drot = None
        if ctx.needs_input_grad[0]:  # dx = g Rᵀ blockwise, i.e. dxᵀ = R gᵀ
            dx = _rotate_rows_of_transpose(rot, grad_rotated).t().reshape(x.shape)
        if ctx.needs_input_grad[3]:  # Σ_t x_iᵀ g_i, both read in place through strided views
            drot = torch.bmm(
                x.reshape(-1, n * b).t().view(n, b, -1), grad_rotated.view(-1, n, b).transpose(0, 1)
            )
        return dx, None, None, drot, None


def _rotate_rows_of_transpose(rot: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """R_bd mᵀ for m [rows, n·b]: one batched matmul on the strided view of mᵀ (no copies), contiguous result."""
    n, b, _ = rot.shape
    return torch.bmm(rot, m.t().view(n, b, -1)).view(n * b, -1)


class OftOps:
    kind = "oft"
    additive = False

    def forward(self, lp: LayerPlan, layer: Any, p: Params, x: torch.Tensor, result: Any) -> torch.Tensor:
        rot = full_rotation(lp, block_rotations(lp, p), layer.training)
        if lp.layer.type == "embedding":
            y = layer.base_forward(x)
            return rotate_blocks(y.to(rot.dtype), rot).to(y.dtype)
        if lp.layer.type == "conv2d":
            weight = _rotated_kernel(layer, rot)
            bias = None if layer.bias is None else layer.bias.to(rot.dtype)
            return layer.functional(x.to(rot.dtype), weight, bias).to(x.dtype)
        if fused.fusable(lp, layer, x, rot.dtype):
            return OftLinearFunction.apply(x, layer.base_layer.weight, layer.bias, rot, False)
        return layer.base_forward(rotate_blocks(x.to(rot.dtype), rot).to(x.dtype))

    def rotation(self, lp: LayerPlan, p: Params) -> torch.Tensor:
        """The n rotation blocks the adapter applies (eval mode)."""
        return full_rotation(lp, block_rotations(lp, p), False)

    def delta_weight(self, lp: LayerPlan, layer: Any, p: Params) -> torch.Tensor:
        """W' − W (OFT is multiplicative; provided for inspection)."""
        return self.merge(lp, layer, p, {})[0] - layer.weight_ir()

    def merge(self, lp: LayerPlan, layer: Any, p: Params, cache: dict) -> tuple[torch.Tensor, Any]:
        return self._apply(lp, layer, self.rotation(lp, p)), None

    def unmerge(self, lp: LayerPlan, layer: Any, p: Params, cache: dict) -> tuple[torch.Tensor, Any]:
        # the inverse, not the transpose: a Neumann R is only approximately orthogonal
        return self._apply(lp, layer, torch.linalg.inv(self.rotation(lp, p))), None

    @staticmethod
    def _apply(lp: LayerPlan, layer: Any, rot: torch.Tensor) -> torch.Tensor:
        weight = layer.weight_ir()
        if lp.layer.type == "embedding":
            return rotate_blocks(weight.to(rot.dtype), rot).to(weight.dtype)  # E' = E R
        return _rotated_kernel(layer, rot).to(weight.dtype)  # W' = W Rᵀ


OPS = OftOps()

"""MonteCLoRA (Sengupta et al., 2024) on torch: evaluation and merging are LoRA's; in training A is replaced by
A_eff = (Σ_n w_n (Aᵀ + E_n))ᵀ with the noise E_n and weights w drawn as :mod:`peftdecl.monteclora_math` states
(from the engine's generator), differentiable in A and the sampler priors.

:func:`monteclora_loss` is HF PEFT's ``_get_monteclora_loss``: the mean over MonteCLoRA layers of each layer's
regulariser, which reads the covariance and weights of that layer's last training draw (with their graph).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from peftdecl.monteclora_math import ALPHA_FLOOR, VAR_FLOOR
from peftdecl.plan import LayerPlan
from peftdecl.plan.kinds.monteclora import EXPERT_PRIOR, EXPERT_WEIGHTS, STD_PRIOR, VAR_PRIOR
from peftdecl_torch.kinds._additive import Params
from peftdecl_torch.kinds.lora import LoraOps
from peftdecl_torch.kinds.variant_layers import variant_layers

if TYPE_CHECKING:
    from peftdecl_torch.layer import AdaptedLayer


def draw(
    layer: AdaptedLayer, n: int, in_features: int, r: int, like: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """(z_mvn [N, in, r], diag of Z ~ Wishart(r, I) [r], z_dirichlet [N]) from the engine's generator."""
    gen = layer.generator(like.device)
    z_mvn = torch.randn((n, in_features, r), generator=gen, device=like.device, dtype=like.dtype)
    x = torch.randn((r, r), generator=gen, device=like.device, dtype=torch.float32)
    z_dirichlet = torch.randn((n,), generator=gen, device=like.device, dtype=like.dtype)
    return z_mvn, (x * x).sum(dim=1).to(like.dtype), z_dirichlet


def covariance(std_prior: torch.Tensor, wishart_diag: torch.Tensor) -> torch.Tensor:
    """diag Σ = max(e^{2s} · Z_jj, 10⁻³)."""
    return torch.clamp(torch.exp(2.0 * std_prior) * wishart_diag, min=VAR_FLOOR)


def sample_weights(prior: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """w = softmax(√(δ + 10⁻⁶) z + log α − mean log α), α = max(e^p, 10⁻⁶)."""
    n = prior.shape[0]
    alpha = torch.clamp(torch.exp(prior), min=ALPHA_FLOOR)
    mu = torch.log(alpha) - torch.log(alpha).mean()
    spread = torch.clamp((1.0 / alpha) * (1.0 - 2.0 / n) + (1.0 / alpha).sum() / n**2, min=ALPHA_FLOOR)
    return torch.softmax(torch.sqrt(spread + ALPHA_FLOOR) * z + mu, dim=-1)


class MontecloraOps(LoraOps):
    """LoRA's ops; in training the unfused path on the Monte Carlo average of perturbed A."""

    kind = "monteclora"

    def __init__(self) -> None:
        # std_prior tensor -> (diag Σ, w) of its last training draw, with their graph, for monteclora_loss
        # (keyed by identity: tensors compare elementwise, so they cannot key a WeakKeyDictionary)
        self._last: dict[int, tuple[weakref.ref[torch.Tensor], torch.Tensor, torch.Tensor]] = {}

    def last_draw(self, std_prior: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(diag Σ, w) of the last training draw of the layer whose ``std_prior`` this is, or None."""
        found = self._last.get(id(std_prior))
        return None if found is None or found[0]() is not std_prior else (found[1], found[2])

    def _keep(self, std_prior: torch.Tensor, var: torch.Tensor, weights: torch.Tensor) -> None:
        key = id(std_prior)
        self._last[key] = (weakref.ref(std_prior, lambda _ref: self._last.pop(key, None)), var, weights)

    def forward(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor) -> torch.Tensor:
        if layer.training:
            return self.unfused(lp, layer, p, x)
        return super().forward(lp, layer, p, x)

    def _apply(
        self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: torch.Tensor, result: torch.Tensor | None
    ) -> torch.Tensor:
        if not layer.training:
            return super()._apply(lp, layer, p, x, result)
        return super()._apply(lp, layer, {**p, "lora_A.weight": self.perturbed_a(lp, layer, p)}, x, result)

    def perturbed_a(self, lp: LayerPlan, layer: AdaptedLayer, p: Params) -> torch.Tensor:
        """A_eff for one training step; the draw is kept (detached) in the sampler's buffers as HF PEFT keeps it."""
        a, std_prior = p["lora_A.weight"], p[STD_PRIOR]
        z_mvn, wishart_diag, z_dirichlet = draw(layer, lp.options["num_samples"], a.shape[1], lp.r, a)
        var = covariance(std_prior, wishart_diag)
        noise = lp.options["sample_scaler"] * z_mvn * torch.sqrt(var)
        weights = sample_weights(p[EXPERT_PRIOR], z_dirichlet)
        self._keep(std_prior, var, weights)
        with torch.no_grad():
            p[VAR_PRIOR].copy_(torch.diag(var.detach()))
            p[EXPERT_WEIGHTS].copy_(weights.detach())
        return torch.einsum("n,nij->ij", weights, a.T.unsqueeze(0) + noise).T

    def model_loss(self, model: object, adapter_names: Sequence[str] | None) -> torch.Tensor | float:
        """:func:`monteclora_loss` (what ``AdaptedModel._get_monteclora_loss`` calls)."""
        return monteclora_loss(model, adapter_names)

    def regulariser(self, lp: LayerPlan, p: Params, training: bool = True) -> torch.Tensor:
        """κ (KL_Dir + KL_Wishart + KL_Gauss) (+ Σ w²) of one layer, from its last draw (the buffers' values if it
        has not drawn since it was created or loaded)."""
        o, std_prior = lp.options, p[STD_PRIOR]
        var, weights = self.last_draw(std_prior) or (torch.diagonal(p[VAR_PRIOR]), p[EXPERT_WEIGHTS])
        n, r = weights.shape[0], lp.r
        alpha = torch.exp(p[EXPERT_PRIOR])
        prior = torch.full_like(alpha, o["dirichlet_prior"])
        kl_dir = (
            torch.lgamma(alpha.sum())
            - torch.lgamma(prior.sum())
            + (torch.lgamma(alpha) - torch.lgamma(prior)).sum()
            + ((alpha - prior) * (torch.digamma(alpha) - torch.digamma(alpha.sum()))).sum()
        )
        s2 = torch.exp(2.0 * std_prior)
        kl_wishart = 0.5 * (-torch.log(s2).sum() * r + s2.sum() * r - r**2)
        clamped = torch.clamp(var, min=ALPHA_FLOOR)
        kl_gauss = n * 0.5 * (clamped.sum() - torch.log(clamped).sum() - r)
        loss: torch.Tensor = o["kl_loss_weight"] * (kl_dir + kl_wishart + kl_gauss)
        return loss + (weights**2).sum() if o["use_entropy"] else loss


def monteclora_loss(model: object, adapter_names: Sequence[str] | None = None) -> torch.Tensor | float:
    """The MonteCLoRA regulariser of a torch-backend :class:`peftdecl.AdaptedModel`: the mean over the layers of
    ``adapter_names`` (default: the active adapters); 0.0 in evaluation mode or where none is MonteCLoRA."""
    total: torch.Tensor | float = 0.0
    count = 0
    for _name, lp, p, _spec in variant_layers(model, "monteclora", adapter_names):
        if not getattr(model, "training", True):
            continue
        total = total + OPS.regulariser(lp, p)
        count += 1
    return total / count if count else 0.0


OPS = MontecloraOps()

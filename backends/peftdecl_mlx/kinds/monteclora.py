"""MonteCLoRA (Sengupta et al., 2024) on MLX: evaluation and merging are LoRA's; in training A is replaced by
A_eff = (Σ_n w_n (Aᵀ + E_n))ᵀ, E_n = c z_n √Σ, with Σ and w drawn as :mod:`peftdecl.monteclora_math` states them,
from the engine's generator (so a compiled step draws new noise each call), differentiable in A and the priors.

The draw is kept, without its graph, in the sampler's frozen buffers (``gaussian_var_prior`` = Σ,
``expert_weights`` = w), as HF PEFT keeps it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx

from peftdecl.monteclora_math import ALPHA_FLOOR, VAR_FLOOR
from peftdecl.plan import LayerPlan
from peftdecl.plan.kinds.monteclora import EXPERT_PRIOR, EXPERT_WEIGHTS, STD_PRIOR, VAR_PRIOR
from peftdecl_mlx.kinds._additive import Params
from peftdecl_mlx.kinds.lora import LoraOps

if TYPE_CHECKING:
    from peftdecl_mlx.generator import Generator
    from peftdecl_mlx.layer import AdaptedLayer

Draws = tuple[mx.array, mx.array, mx.array]
"""(z_mvn [N, in, r], diag of Z ~ Wishart(r, I) [r], z_dirichlet [N])."""


def draw(generator: Generator, n: int, in_features: int, r: int) -> Draws:
    """The standard normal draws of one training step; Z's diagonal is Σ_k X_jk² of X ~ N(0, 1) [r, r]."""
    z_mvn = mx.random.normal((n, in_features, r), key=generator.key())
    x = mx.random.normal((r, r), key=generator.key())
    z_dirichlet = mx.random.normal((n,), key=generator.key())
    return z_mvn, mx.sum(x * x, axis=1), z_dirichlet


def covariance(std_prior: mx.array, wishart_diag: mx.array) -> mx.array:
    """diag Σ = max(e^{2s} · Z_jj, 10⁻³)."""
    return mx.maximum(mx.exp(2.0 * std_prior) * wishart_diag, VAR_FLOOR)


def sample_weights(prior: mx.array, z: mx.array) -> mx.array:
    """w = softmax(√(δ + 10⁻⁶) z + log α − mean log α), α = max(e^p, 10⁻⁶), δ = max(α⁻¹(1 − 2/N) + Σα⁻¹/N², 10⁻⁶)."""
    n = prior.shape[0]
    alpha = mx.maximum(mx.exp(prior), ALPHA_FLOOR)
    mu = mx.log(alpha) - mx.mean(mx.log(alpha))
    spread = mx.maximum((1.0 / alpha) * (1.0 - 2.0 / n) + mx.sum(1.0 / alpha) / n**2, ALPHA_FLOOR)
    return mx.softmax(mx.sqrt(spread + ALPHA_FLOOR) * z + mu, axis=-1)


def perturbed_a(
    a: mx.array, std_prior: mx.array, expert_prior: mx.array, draws: Draws, sample_scaler: float
) -> tuple[mx.array, mx.array, mx.array]:
    """(A_eff [r, in], diag Σ [r], w [N]) for the given draws."""
    z_mvn, wishart_diag, z_dirichlet = draws
    var = covariance(std_prior, wishart_diag)
    noise = sample_scaler * z_mvn * mx.sqrt(var)
    weights = sample_weights(expert_prior, z_dirichlet)
    a_eff_t = mx.sum(weights[:, None, None] * (a.T[None] + noise), axis=0)
    return a_eff_t.T.astype(a.dtype), var, weights


class MontecloraOps(LoraOps):
    """LoRA's ops; in training the general path (no fused one) on the Monte Carlo average of perturbed A."""

    kind = "monteclora"

    def alone(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: mx.array) -> mx.array | None:
        return None if layer.training else super().alone(lp, layer, p, x)

    def delta(self, lp: LayerPlan, layer: AdaptedLayer, p: Params, x: mx.array) -> mx.array:
        """LoRA's Δy, with A_eff in place of A while training."""
        if not layer.training:
            return super().delta(lp, layer, p, x)
        a = p["lora_A.weight"]
        o = lp.options
        draws = draw(layer.generator, o["num_samples"], a.shape[1], lp.r)
        a_eff, var, weights = perturbed_a(a, p[STD_PRIOR], p[EXPERT_PRIOR], draws, o["sample_scaler"])
        # the buffers take the draw's values only: they are frozen and carry no gradient
        layer.overwrite(lp, VAR_PRIOR, mx.stop_gradient(mx.diag(var)).astype(p[VAR_PRIOR].dtype))
        layer.overwrite(lp, EXPERT_WEIGHTS, mx.stop_gradient(weights).astype(p[EXPERT_WEIGHTS].dtype))
        return super().delta(lp, layer, {**p, "lora_A.weight": a_eff}, x)


OPS = MontecloraOps()

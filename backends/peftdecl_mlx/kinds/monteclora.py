"""MonteCLoRA (Sengupta et al., 2024) on MLX: evaluation and merging are LoRA's; in training A is replaced by
A_eff = (Σ_n w_n (Aᵀ + E_n))ᵀ, E_n = c z_n √Σ, with Σ and w drawn as :mod:`peftdecl.monteclora_math` states them,
from the engine's generator (so a compiled step draws new noise each call), differentiable in A and the priors.

The draw is kept, without its graph, in the sampler's frozen buffers (``gaussian_var_prior`` = Σ,
``expert_weights`` = w), as HF PEFT keeps it. :func:`monteclora_loss` is HF PEFT's ``_get_monteclora_loss``: the
mean over MonteCLoRA layers of each layer's regulariser, read from that layer's last draw (with its graph).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

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


def lgamma(x: mx.array) -> mx.array:
    """log Γ(x) for x > 0: the recurrence up to x + 6, then Stirling's series (error < 10⁻⁹; MLX has none)."""
    z = x + 6.0
    shift = sum(mx.log(x + k) for k in range(6))
    series = (z - 0.5) * mx.log(z) - z + 0.5 * math.log(2 * math.pi) + 1 / (12 * z) - 1 / (360 * z**3)
    return series + 1 / (1260 * z**5) - shift


def digamma(x: mx.array) -> mx.array:
    """ψ(x) for x > 0: the recurrence up to x + 6, then the asymptotic series (error < 10⁻⁹)."""
    z = x + 6.0
    shift = sum(1.0 / (x + k) for k in range(6))
    inv2 = 1.0 / (z * z)
    return mx.log(z) - 0.5 / z - inv2 * (1 / 12 - inv2 * (1 / 120 - inv2 / 252)) - shift


def regulariser(lp: LayerPlan, p: Params, var: mx.array, weights: mx.array) -> mx.array:
    """κ (KL_Dir(α ‖ prior) + KL_Wishart(e^{2s}) + KL_Gauss(Σ)) (+ Σ w² with ``use_entropy``) of one layer, α = e^p,
    given its drawn diag Σ and weights w (as :func:`peftdecl.monteclora_math.regulariser` states it)."""
    o, r = lp.options, lp.r
    alpha = mx.exp(p[EXPERT_PRIOR])
    n = alpha.shape[0]
    prior = mx.full(alpha.shape, o["dirichlet_prior"], dtype=alpha.dtype)
    total = mx.sum(alpha)
    kl_dir = (
        lgamma(total)
        - math.lgamma(n * o["dirichlet_prior"])
        + mx.sum(lgamma(alpha) - lgamma(prior))
        + mx.sum((alpha - prior) * (digamma(alpha) - digamma(total)))
    )
    s2 = mx.exp(2.0 * p[STD_PRIOR])
    kl_wishart = 0.5 * (-mx.sum(mx.log(s2)) * r + mx.sum(s2) * r - r**2)
    clamped = mx.maximum(var, ALPHA_FLOOR)
    kl_gauss = n * 0.5 * (mx.sum(clamped) - mx.sum(mx.log(clamped)) - r)
    loss: mx.array = o["kl_loss_weight"] * (kl_dir + kl_wishart + kl_gauss)
    return loss + mx.sum(weights**2) if o["use_entropy"] else loss


class MontecloraOps(LoraOps):
    """LoRA's ops; in training the general path (no fused one) on the Monte Carlo average of perturbed A."""

    kind = "monteclora"

    def __init__(self) -> None:
        # id(layer plan) -> (the std_prior array drawn with, diag Σ, w) of its last training draw, with their graph
        self._last: dict[int, tuple[mx.array, mx.array, mx.array]] = {}

    def last_draw(self, lp: LayerPlan, p: Params) -> tuple[mx.array, mx.array]:
        """(diag Σ, w) of the layer's last training draw while ``p`` holds the very std_prior array it was drawn
        with (the same step's trace), else its buffers' values: a draw inside a compiled step is no array outside
        it, and after an optimizer step the buffers hold that draw's values."""
        kept = self._last.get(id(lp))
        if kept is not None and kept[0] is p[STD_PRIOR]:
            return kept[1], kept[2]
        return mx.diag(p[VAR_PRIOR]), p[EXPERT_WEIGHTS]

    def _keep(self, lp: LayerPlan, std_prior: mx.array, var: mx.array, weights: mx.array) -> None:
        if id(lp) not in self._last:
            weakref.finalize(lp, self._last.pop, id(lp), None)
        self._last[id(lp)] = (std_prior, var, weights)

    def model_loss(self, model: Any, adapter_names: Sequence[str] | None) -> mx.array | float:
        """:func:`monteclora_loss` (what ``AdaptedModel._get_monteclora_loss`` calls)."""
        return monteclora_loss(model, adapter_names)

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
        self._keep(lp, p[STD_PRIOR], var, weights)
        # the buffers take the draw's values only: they are frozen and carry no gradient
        layer.overwrite(lp, VAR_PRIOR, mx.stop_gradient(mx.diag(var)).astype(p[VAR_PRIOR].dtype))
        layer.overwrite(lp, EXPERT_WEIGHTS, mx.stop_gradient(weights).astype(p[EXPERT_WEIGHTS].dtype))
        return super().delta(lp, layer, {**p, "lora_A.weight": a_eff}, x)


def monteclora_loss(model: Any, adapter_names: Sequence[str] | None = None) -> mx.array | float:
    """The MonteCLoRA regulariser of an MLX-backend :class:`peftdecl.AdaptedModel`: the mean over the layers of
    ``adapter_names`` (default: the active adapters); 0.0 in evaluation mode or where none is MonteCLoRA. Call it
    inside the function ``nn.value_and_grad`` differentiates, after the forward, to train the priors by it."""
    engine = model.engine
    if not engine.model.training:
        return 0.0
    losses = []
    for name in model.active_adapters if adapter_names is None else list(adapter_names):
        plan = model.adapters[name]
        if plan.kind != "monteclora":
            continue
        for lp in plan.layers:
            p = engine.layer(lp.module).params(name)
            losses.append(regulariser(lp, p, *OPS.last_draw(lp, p)))
    return sum(losses[1:], losses[0]) / len(losses) if losses else 0.0


OPS = MontecloraOps()

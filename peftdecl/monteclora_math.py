"""MonteCLoRA's sampler as HF PEFT 0.21 defines it, in NumPy (float64): the draws, the noise on A, the sample
weights and the regulariser. r is the LoRA rank, N ``num_samples``, s = ``std_prior`` (r), p =
``expert_weights_prior`` (N).

- covariance: Σ = diag(max(e^{2 s_j} · Z_jj, 10⁻³)), Z ~ Wishart(r, I) (only its diagonal enters: Z_jj ~ χ²_r);
- noise on Aᵀ: E_n = c · z_n L with L = chol(Σ) = √Σ and z_n ~ N(0, 1) [in, r], c = ``sample_scaler``;
- weights: α = max(e^p, 10⁻⁶); w = softmax(√(δ + 10⁻⁶) ⊙ z + log α − mean(log α)), z ~ N(0, 1) [N], with
  δ = max(α⁻¹ (1 − 2/N) + Σα⁻¹ / N², 10⁻⁶) (a Laplace approximation of Dirichlet(α));
- regulariser: κ · (KL_Dir(α ‖ prior) + KL_Wishart(e^s) + KL_Gauss(Σ)) (+ Σ w² with ``use_entropy``).
"""

from __future__ import annotations

import math

import numpy as np

VAR_FLOOR = 1e-3
ALPHA_FLOOR = 1e-6


def draw_noise(
    rng: np.random.Generator, num_samples: int, in_features: int, r: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z_mvn [N, in, r], Z [r, r] ~ Wishart(r, I) as X Xᵀ, z_dirichlet [N]) from ``rng``."""
    z_mvn = rng.standard_normal((num_samples, in_features, r))
    x = rng.standard_normal((r, r))
    return z_mvn, x @ x.T, rng.standard_normal(num_samples)


def noise_columns(
    std_prior: np.ndarray, z_wishart: np.ndarray, z_mvn: np.ndarray, sample_scaler: float
) -> tuple[np.ndarray, np.ndarray]:
    """(Σ [r, r] diagonal, E [N, in, r]): the drawn covariance and the noise on Aᵀ of each sample."""
    var = np.maximum(np.exp(2.0 * std_prior) * np.diag(z_wishart), VAR_FLOOR)
    return np.diag(var), sample_scaler * z_mvn * np.sqrt(var)[None, None, :]


def expert_weights(prior: np.ndarray, z_dirichlet: np.ndarray) -> np.ndarray:
    """w [N]: the sample weights drawn from the Laplace approximation of Dirichlet(e^p)."""
    n = prior.shape[0]
    alpha = np.maximum(np.exp(prior), ALPHA_FLOOR)
    mu = np.log(alpha) - np.log(alpha).mean()
    spread = np.maximum((1.0 / alpha) * (1.0 - 2.0 / n) + (1.0 / alpha).sum() / n**2, ALPHA_FLOOR)
    logits = np.sqrt(spread + ALPHA_FLOOR) * z_dirichlet + mu
    e = np.exp(logits - logits.max())
    weights: np.ndarray = e / e.sum()
    return weights


def regulariser(
    std_prior: np.ndarray,
    expert_prior: np.ndarray,
    var_prior: np.ndarray,
    weights: np.ndarray,
    kl_loss_weight: float,
    dirichlet_prior: float,
    use_entropy: bool,
) -> float:
    """One layer's training loss term: κ · (KL_Dir + KL_Wishart + KL_Gauss) (+ Σ w²), as HF PEFT computes it."""
    n, r = expert_prior.shape[0], std_prior.shape[0]
    alpha = np.exp(expert_prior)
    prior = np.full(n, dirichlet_prior)
    digamma_gap = _digamma(alpha) - _digamma(np.array([alpha.sum()]))[0]
    kl_dir = (
        math.lgamma(alpha.sum())
        - math.lgamma(prior.sum())
        + sum(math.lgamma(a) - math.lgamma(b) for a, b in zip(alpha, prior, strict=True))
        + float(((alpha - prior) * digamma_gap).sum())
    )
    var = np.exp(2.0 * std_prior)
    kl_wishart = 0.5 * (-np.log(var).sum() * r + var.sum() * r - r**2)
    diag = np.maximum(np.diag(var_prior), ALPHA_FLOOR)
    kl_gauss = n * 0.5 * (diag.sum() - np.log(diag).sum() - r)
    entropy = float((weights**2).sum()) if use_entropy else 0.0
    return float(kl_loss_weight * (kl_dir + kl_wishart + kl_gauss) + entropy)


def _digamma(x: np.ndarray) -> np.ndarray:
    """ψ(x) for x > 0: the recurrence up to x ≥ 6, then the asymptotic series (error < 1e-12)."""
    x = np.asarray(x, dtype=np.float64).copy()
    acc = np.zeros_like(x)
    while (small := x < 6.0).any():
        acc[small] -= 1.0 / x[small]
        x[small] += 1.0
    inv2 = 1.0 / (x * x)
    series = np.log(x) - 0.5 / x - inv2 * (1 / 12 - inv2 * (1 / 120 - inv2 * (1 / 252 - inv2 * (1 / 240))))
    result: np.ndarray = acc + series
    return result


def perturbed_a_grads(
    a: np.ndarray,
    grad: np.ndarray,
    std_prior: np.ndarray,
    expert_prior: np.ndarray,
    draws: tuple[np.ndarray, np.ndarray, np.ndarray],
    sample_scaler: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dL/dA, dL/ds, dL/dp) of A_eff = (Σ_n w_n (Aᵀ + E_n))ᵀ given G = dL/dA_eff [r, in], by the chain rule
    through the noise (E_n = c z_n √Σ, Σ_j = e^{2 s_j} Z_jj unless floored) and the softmax weights (floors and
    clamps pass no gradient, as in autograd)."""
    z_mvn, z_wishart, z_dirichlet = draws
    n = expert_prior.shape[0]
    raw_var = np.exp(2.0 * std_prior) * np.diag(z_wishart)
    var = np.maximum(raw_var, VAR_FLOOR)
    sd = np.sqrt(var)
    weights = expert_weights(expert_prior, z_dirichlet)
    noise = sample_scaler * z_mvn * sd[None, None, :]
    g_t = grad.T  # [in, r], the gradient at A_effᵀ
    d_a = weights.sum() * grad
    d_weights = np.einsum("ij,nij->n", g_t, a.T[None] + noise)
    d_sd = sample_scaler * np.einsum("n,ij,nij->j", weights, g_t, z_mvn)
    d_var = np.where(raw_var > VAR_FLOOR, d_sd / (2.0 * sd), 0.0)
    d_std = d_var * 2.0 * raw_var
    # w = softmax(σ ⊙ z + μ), μ = log α − mean log α, σ = √(δ + ε), δ = α⁻¹ (1 − 2/N) + Σα⁻¹ / N²
    raw_alpha = np.exp(expert_prior)
    alpha = np.maximum(raw_alpha, ALPHA_FLOOR)
    inv = 1.0 / alpha
    raw_spread = inv * (1.0 - 2.0 / n) + inv.sum() / n**2
    sigma = np.sqrt(np.maximum(raw_spread, ALPHA_FLOOR) + ALPHA_FLOOR)
    d_logits = weights * (d_weights - weights @ d_weights)
    d_log_alpha = d_logits - d_logits.mean()
    d_spread = np.where(raw_spread > ALPHA_FLOOR, d_logits * z_dirichlet / (2.0 * sigma), 0.0)
    d_inv = d_spread * (1.0 - 2.0 / n) + d_spread.sum() / n**2
    d_alpha = d_log_alpha / alpha - d_inv / alpha**2
    d_expert = np.where(raw_alpha > ALPHA_FLOOR, d_alpha * raw_alpha, 0.0)
    return d_a, d_std, d_expert

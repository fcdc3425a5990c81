"""Incremental SVD (PCA) of a stream of row batches, in float64: what EVA fits to each layer's inputs.

After batches X₁ … X_t the state is the top-k right singular vectors V_k, singular values S_k and the running mean
μ and variance σ² of all rows seen. A new batch X (n rows, batch mean x̄) is folded in by the SVD of
[diag(S_k) V_kᵀ; X − x̄; √(n·m/(m+n))·(μ − x̄)] (m rows seen before): the retained spectrum, the centred batch
and the shift between the two means (Ross et al. 2008, as scikit-learn's and HF PEFT's IncrementalPCA). Each
singular vector's sign is fixed so that its largest-magnitude entry is positive.
"""

from __future__ import annotations

import numpy as np


class IncrementalSVD:
    """The top ``n_components`` principal directions of all rows passed to :meth:`partial_fit` so far."""

    def __init__(self, n_components: int) -> None:
        self.n_components = n_components
        self.components: np.ndarray | None = None
        """k × features, orthonormal rows (the right singular vectors), or None before the first batch."""
        self.singular_values = np.zeros(0)
        self.explained_variance_ratio = np.zeros(0)
        """S_i² / (total variance · rows seen): each component's share of the variance."""
        self.mean = np.zeros(0)
        self.var = np.zeros(0)
        self.n_seen = 0

    def partial_fit(self, rows: np.ndarray) -> None:
        """Fold a batch of rows (n × features, n ≥ k) into the decomposition."""
        x = np.array(rows, dtype=np.float64)
        n = x.shape[0]
        batch_mean = x.mean(axis=0)
        centred = x - batch_mean
        batch_sq = np.sum(centred**2, axis=0)
        total = self.n_seen + n
        if self.components is None:
            mean, stacked = batch_mean, centred
            var = batch_sq / total
        else:
            seen = self.n_seen
            mean = (self.mean * seen + x.sum(axis=0)) / total
            shift = self.mean - batch_mean
            var = (self.var * seen + batch_sq + seen * n / total * shift**2) / total
            stacked = np.vstack(
                (self.singular_values[:, None] * self.components, centred, np.sqrt(seen * n / total) * shift)
            )
        _, s, vt = np.linalg.svd(stacked, full_matrices=False)
        largest = np.argmax(np.abs(vt), axis=1)
        vt = vt * np.sign(vt[np.arange(vt.shape[0]), largest])[:, None]
        k = self.n_components
        self.components, self.singular_values = vt[:k], s[:k]
        self.explained_variance_ratio = s[:k] ** 2 / np.sum(var * total)
        self.mean, self.var, self.n_seen = mean, var, total


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b``."""
    norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-8)
    cosines: np.ndarray = np.sum(a * b, axis=1) / norms
    return cosines

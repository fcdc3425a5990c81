"""EVA's arithmetic without a framework: the incremental SVD against NumPy's PCA, and the rank redistribution."""

from __future__ import annotations

import numpy as np

from peftdecl.inits.eva import equal_input_groups, rank_distribution
from peftdecl.inits.incremental_svd import IncrementalSVD
from tests.conftest import rel_err


def test_incremental_svd_equals_numpy_pca() -> None:
    """Keeping every component, the incremental SVD of three batches is the PCA of all rows (float64)."""
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((10, 6)) @ rng.standard_normal((6, 6)) + 3.0 for _ in range(3)]
    svd = IncrementalSVD(6)
    for part in parts:
        svd.partial_fit(part)
    rows = np.vstack(parts)
    _, s, vt = np.linalg.svd(rows - rows.mean(axis=0), full_matrices=False)
    assert svd.components is not None
    signs = np.sign(np.sum(svd.components * vt, axis=1))
    assert rel_err(svd.components * signs[:, None], vt) <= 1e-10  # float64 rounding
    assert rel_err(svd.singular_values, s) <= 1e-12
    assert rel_err(svd.explained_variance_ratio, s**2 / np.sum(s**2)) <= 1e-12


def test_rank_distribution_gives_the_budget_to_the_largest_ratios() -> None:
    ratios = {"a": np.array([0.5, 0.3, 0.1, 0.05]), "c": np.array([0.4, 0.35, 0.2, 0.01])}
    ranks = rank_distribution(ratios, {"a": "a", "c": "c", "b": "a"}, {"b": "a"}, 6, dict.fromkeys("abc", 4))
    # sorted: a.5 b.5 c.4 c.35 a.3 b.3 | c.2 ...: a 2, b 2, c 2
    assert ranks == {"a": 2, "b": 2, "c": 2}


def test_equal_inputs_share_the_first_layers_svd() -> None:
    x, y = np.arange(6.0).reshape(2, 3), np.ones((2, 3))
    assert equal_input_groups({"a": x, "b": y, "c": x.copy(), "d": x[:, :2]}) == {"c": "a"}

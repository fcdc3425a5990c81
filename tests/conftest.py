"""Shared fixtures: backend selection, tiny transformers models built from configs (no downloads)."""

from __future__ import annotations

import os

# Each pytest-xdist worker computes on one thread (set before torch or NumPy's BLAS start their pools): the
# tests' layers are tiny, the workers already share the cores, and intra-op threads only add hand-offs (a
# tiny torch convolution and its backward take several times longer on two threads than on one).
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_variable, "1")

import numpy as np
import pytest

import peftdecl


def selected_backends() -> list[str]:
    """Installed, available backends, narrowed by PEFTDECL_TEST_BACKENDS=numpy,torch,...

    A backend named there that is not available stops the run (naming why): a CI job whose backend failed to
    install must fail, not pass with that backend's tests quietly left out."""
    entries = peftdecl.backends()
    available = [name for name, entry in entries.items() if entry.available]
    wanted = os.environ.get("PEFTDECL_TEST_BACKENDS")
    if not wanted:
        return available
    chosen = [b.strip() for b in wanted.split(",") if b.strip()]
    missing = {
        b: entries[b].reason if b in entries else "not installed" for b in chosen if b not in available
    }
    if missing:
        raise pytest.UsageError(f"PEFTDECL_TEST_BACKENDS={wanted!r} names unavailable backends: {missing}")
    return chosen


@pytest.fixture(params=selected_backends())
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


def make_model(seed: int = 0) -> peftdecl.AdaptedModel:
    """A rank-2 LoRA (random, not zero-initialised) on two layers of a NumPy state dict."""
    rng = np.random.default_rng(seed)
    state = {"a.q.weight": rng.normal(size=(6, 4)), "a.v.weight": rng.normal(size=(3, 4))}
    spec = {"peft_type": "LORA", "r": 2, "target_modules": ["q", "v"], "init_lora_weights": False}
    return peftdecl.attach(state, spec, seed=seed)


@pytest.fixture
def saved(tmp_path) -> tuple[peftdecl.AdaptedModel, object]:
    """``make_model()`` saved in HF layout to ``tmp_path / "ad"``: (model, folder)."""
    model = make_model()
    model.save(tmp_path / "ad")
    return model, tmp_path / "ad"


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    """‖actual − expected‖ / ‖expected‖ (absolute when expected is zero)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    denom = np.linalg.norm(expected)
    diff = np.linalg.norm(actual - expected)
    return float(diff / denom) if denom > 0 else float(diff)

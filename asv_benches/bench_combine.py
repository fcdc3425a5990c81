"""add_weighted_adapter on the NumPy reference: ``svd`` and ``ties`` of four LoRA adapters.

Eight 256×256 layers, four adapters of r 8 (random A and B). ``svd`` takes the SVD of the small core of the stacked
factors (rank ≤ Σ r_i = 32), not of each 256×256 ΔW; ``ties`` prunes and merges the factors themselves. Each timed
call attaches the combination and deletes it again (so repeats start from the same state).
"""

from __future__ import annotations

import numpy as np

import peftdecl

LAYERS = 8
DIM = 256
RANK = 8
WEIGHTS = [0.5, 0.3, -0.2, 0.4]
NAMES = ["a0", "a1", "a2", "a3"]


class Combine:
    """Four adapters on eight 256×256 linear layers; each timing adds the combination and deletes it."""

    def setup(self) -> None:
        rng = np.random.default_rng(0)
        state = {f"l{i}.weight": rng.standard_normal((DIM, DIM)) for i in range(LAYERS)}
        targets = [f"l{i}" for i in range(LAYERS)]
        spec = {"peft_type": "LORA", "r": RANK, "target_modules": targets, "init_lora_weights": False}
        self.model = peftdecl.attach(state, spec, NAMES[0], seed=1)
        for seed, name in enumerate(NAMES[1:], start=2):
            self.model.add_adapter(name, {**spec, "lora_alpha": 4 * seed}, seed=seed)

    def _combine(self, combination_type: str) -> None:
        self.model.add_weighted_adapter(NAMES, WEIGHTS, "m", combination_type=combination_type, density=0.5)
        self.model.delete_adapter("m")

    def time_svd(self) -> None:
        """``svd``: the rank-8 truncated SVD of Σ w_i s_i B_i A_i on every layer."""
        self._combine("svd")

    def time_ties(self) -> None:
        """``ties`` (density 0.5): TIES on the A_i and on the B_i of every layer."""
        self._combine("ties")

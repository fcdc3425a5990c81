"""DARE's random keep-masks drawn from torch's global generator, as HF PEFT draws them.

PEFT's ``random_pruning`` calls ``torch.bernoulli`` on a tensor of the pruned tensor's shape filled with ``density``;
with the same seed and the same sequence of shapes (float32, on the CPU) the masks here are PEFT's, bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch


def keep_mask(shape: tuple[int, ...], density: float) -> np.ndarray:
    """m ~ Bernoulli(density) of ``shape`` (0/1 as float64), one ``torch.bernoulli`` draw on a float32 CPU tensor."""
    return torch.bernoulli(torch.full(shape, density, dtype=torch.float32)).double().numpy()

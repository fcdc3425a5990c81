"""What the NumPy reference borrows from torch when it is installed: HF PEFT's VeRA projections and Arrow's power
iteration start vector, drawn by torch's CPU generator. (Describing a torch model to the NumPy reference lives in
``peftdecl_torch.inventory.numpy_model``.)

Imports torch only when called, so the NumPy backend itself never needs it.
"""

from __future__ import annotations

import numpy as np


def vera_projections(
    prng_key: int, r: int, max_in: int, max_out: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """HF PEFT's VeRA projections as torch draws them on this machine (None when torch is not installed):
    one CPU generator seeded with ``prng_key``, A ∈ R^{r×max_in} first, then B ∈ R^{max_out×r}."""
    try:
        import torch
    except ImportError:
        return None
    from peftdecl.plan.kinds.vera import kaiming_bound

    gen = torch.Generator(device="cpu").manual_seed(prng_key)
    bound_a, bound_b = kaiming_bound(max_in), kaiming_bound(r)
    a = torch.empty(r, max_in).uniform_(-bound_a, bound_a, generator=gen)
    b = torch.empty(max_out, r).uniform_(-bound_b, bound_b, generator=gen)
    return a.double().numpy(), b.double().numpy()


def arrow_start_vector(seed: int, size: int) -> np.ndarray | None:
    """HF PEFT's start of Arrow's power iteration (None when torch is not installed): ``randn(size)`` in float32
    from a CPU generator seeded with ``seed``."""
    try:
        import torch
    except ImportError:
        return None
    gen = torch.Generator(device="cpu").manual_seed(seed)
    start: np.ndarray = torch.randn(size, dtype=torch.float32, generator=gen).numpy()
    return start

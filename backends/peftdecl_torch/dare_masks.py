"""DARE's random keep-masks drawn from torch's global generator, as HF PEFT draws them.

PEFT's ``random_pruning`` calls ``torch.bernoulli(torch.full_like(t, density))`` on each pruned tensor t, so the
draw happens on t's device (CPU or CUDA generator) and in t's dtype (a bf16/fp16 ``density`` is rounded, and a
float64 draw consumes the generator differently). The masks here are drawn on the device and in the dtype of the
layer's adapter tensors, so with the same seed and the same sequence of shapes they are PEFT's, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

KeepMask = Callable[[tuple[int, ...], float], np.ndarray]


def keep_mask_on(device: torch.device, dtype: torch.dtype) -> KeepMask:
    """m ~ Bernoulli(density) of a shape (0/1 as float64 NumPy), one ``torch.bernoulli`` on ``device`` in ``dtype``."""

    def draw(shape: tuple[int, ...], density: float) -> np.ndarray:
        probabilities = torch.full(shape, density, dtype=dtype, device=device)
        return torch.bernoulli(probabilities).to(device="cpu", dtype=torch.float64).numpy()

    return draw


keep_mask = keep_mask_on(torch.device("cpu"), torch.float32)
"""The draw PEFT makes for a float32 tensor on the CPU."""


def layer_keep_masks(engine: Any, adapters: Sequence[str]) -> Callable[[str], KeepMask]:
    """module -> its mask source: the device and dtype of the first of ``adapters`` that the module carries (its
    B factor's: the dtype PEFT's ΔW has, equal to A's in any adapter PEFT builds)."""

    def for_module(module: str) -> KeepMask:
        layer = engine.layer(module)
        tensors = next(layer.tensors(name) for name in adapters if name in layer.adapter_names)
        factor = tensors.get("lora_B.weight", tensors.get("lora_embedding_B"))
        sample = factor if factor is not None else next(iter(tensors.values()))
        return keep_mask_on(sample.device, sample.dtype)

    return for_module

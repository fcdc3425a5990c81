"""The one warning every backend gives when a merge re-quantises a base weight."""

from __future__ import annotations

import warnings


class RequantizationWarning(UserWarning):
    """A merge wrote a re-quantised weight: its outputs can differ from the unmerged adapter's by rounding."""


def warn_requantized(module: str, quantization: str) -> None:
    """Warn that merging into ``module`` (a ``quantization`` layer) rounds the merged weight to its codes again,
    so generations can differ from the unmerged model's (as HF PEFT warns on a 4-/8-bit merge)."""
    warnings.warn(
        f"{module}: merging into a quantised layer ({quantization}) re-quantises the merged weight; rounding "
        "can change its outputs and generations slightly (merge_and_unload(dequantize=True) keeps full precision)",
        RequantizationWarning,
        stacklevel=3,
    )

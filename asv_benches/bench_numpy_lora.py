"""The NumPy reference LoRA forward on one Linear, next to the bare base GEMM.

Read ``time_lora / time_base`` as a ratio: the FLOP floor for r=16 on 1024×1024 is
1 + r(d_in + d_out) / (d_in · d_out) ≈ 1.03 times the base GEMM.
"""

from __future__ import annotations

import numpy as np

import peftdecl

D_IN = D_OUT = 1024
TOKENS = 256
RANK = 16


class LoraLinear:
    """float64 Linear 1024 -> 1024 on 256 tokens; LoRA r=16 with random (non-zero) A and B."""

    def setup(self) -> None:
        rng = np.random.default_rng(0)
        self.weight = rng.standard_normal((D_OUT, D_IN))
        self.x = rng.standard_normal((TOKENS, D_IN))
        spec = {"peft_type": "LORA", "r": RANK, "target_modules": ["l"], "init_lora_weights": False}
        self.model = peftdecl.attach({"l.weight": self.weight}, spec)

    def time_base(self) -> None:
        """The base layer alone: x @ W.T."""
        self.x @ self.weight.T

    def time_lora(self) -> None:
        """The adapted layer: base output plus s · (x @ A.T) @ B.T."""
        self.model("l", self.x)

    def peakmem_base(self) -> None:
        """Peak resident memory of the process around one base call."""
        self.x @ self.weight.T

    def peakmem_lora(self) -> None:
        """Peak resident memory of the process around one adapted call."""
        self.model("l", self.x)

"""The NumPy reference LoRA forward on one Linear, next to the bare base GEMM.

Read ``time_lora / time_base`` as a ratio: the FLOP floor for r=16 on 1024×1024 is
1 + r(d_in + d_out) / (d_in · d_out) ≈ 1.03 times the base GEMM.

``time_lora`` is in the CI regression gate (benchmarks/regression_gate.py). ``PEFTDECL_BENCH_SLOWDOWN=N`` makes it
repeat its call N times: the switch that shows the gate fires, in the benchmark and never in the library.
"""

from __future__ import annotations

import os

import numpy as np

import peftdecl

D_IN = D_OUT = 1024
TOKENS = 256
RANK = 16


def slowdown() -> int:
    """How many times the gated benchmark repeats its work: PEFTDECL_BENCH_SLOWDOWN, 1 when unset."""
    return max(1, int(os.environ.get("PEFTDECL_BENCH_SLOWDOWN", "1")))


class LoraLinear:
    """float64 Linear 1024 -> 1024 on 256 tokens; LoRA r=16 with random (non-zero) A and B."""

    def setup(self) -> None:
        rng = np.random.default_rng(0)
        self.weight = rng.standard_normal((D_OUT, D_IN))
        self.x = rng.standard_normal((TOKENS, D_IN))
        spec = {"peft_type": "LORA", "r": RANK, "target_modules": ["l"], "init_lora_weights": False}
        self.model = peftdecl.attach({"l.weight": self.weight}, spec)
        self.calls = slowdown()

    def time_base(self) -> None:
        """The base layer alone: x @ W.T."""
        self.x @ self.weight.T

    def time_lora(self) -> None:
        """The adapted layer: base output plus s · (x @ A.T) @ B.T (`calls` times; 1 unless slowed on purpose)."""
        for _ in range(self.calls):
            self.model("l", self.x)

    def peakmem_base(self) -> None:
        """Peak resident memory of the process around one base call."""
        self.x @ self.weight.T

    def peakmem_lora(self) -> None:
        """Peak resident memory of the process around one adapted call."""
        self.model("l", self.x)

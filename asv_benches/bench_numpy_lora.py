"""The NumPy reference LoRA forward on one Linear, next to the bare base GEMM.

Read ``time_lora / time_base`` as a ratio: the FLOP floor for r=16 on 1024×1024 is
1 + r(d_in + d_out) / (d_in · d_out) ≈ 1.03 times the base GEMM.

``LoraLinearGate`` times the same call for the CI regression gate (benchmarks/regression_gate.py);
``PEFTDECL_BENCH_SLOWDOWN=N`` makes it repeat the call N times, the switch that shows the gate fires.
"""

from __future__ import annotations

import numpy as np

import peftdecl

from ._gate import cpu_ratio, slowdown

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


class LoraLinearGate:
    """The adapted call as the regression gate times it: CPU time of the adapted layer ÷ CPU time of the bare
    base product x @ W.T, fastest of 20 alternating calls each (asv_benches/_gate.py says why). Run with one BLAS
    thread, as the gate does: OpenBLAS threads that wait for each other spin, and their spinning would count."""

    def setup(self) -> None:
        layer = LoraLinear()
        layer.setup()
        self.x, self.weight, self.model = layer.x, layer.weight, layer.model
        self.repeats = slowdown()

    def adapted_calls(self) -> None:
        for _ in range(self.repeats):  # 1 unless PEFTDECL_BENCH_SLOWDOWN slows the benchmark on purpose
            self.model("l", self.x)

    def base_call(self) -> None:
        self.x @ self.weight.T

    def track_lora_over_base(self) -> float:
        """The adapted layer (base output plus s · (x @ A.T) @ B.T) in units of the base product alone."""
        return cpu_ratio(self.adapted_calls, self.base_call, 20)

    track_lora_over_base.unit = "ratio"  # type: ignore[attr-defined]

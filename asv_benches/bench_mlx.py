"""The MLX backend's LoRA and DoRA layers next to the plain nn.Linear (forward, and forward+backward).

Read ``time_adapter_* / time_base_*`` as ratios. Every timed call ends in ``mx.eval`` (MLX is lazy). The shapes are
small (Linear 256×256 with bias, 256 tokens, r = 16, s = 2, dropout 0) because mlx[cpu] on Linux is slow; the
forward runs in eval mode (DoRA reuses its weight norm, as at inference), forward+backward in training mode, as in
benchmarks/compare_mlx_lm.py, which puts the same layers beside mlx-lm's.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

DIM = 256
TOKENS = 256
RANK = 16


class MlxAdapterLinear:
    """float32 Linear 256 -> 256 on 256 tokens; LoRA / DoRA r=16 with non-zero adapter numbers."""

    params: ClassVar[list[str]] = ["lora", "dora"]
    param_names: ClassVar[list[str]] = ["kind"]

    def setup(self, kind: str) -> None:
        try:
            import mlx.core as mx
            import mlx.nn as nn
        except ImportError as exc:  # asv skips a benchmark whose setup raises NotImplementedError
            raise NotImplementedError("mlx is not installed") from exc
        import peftdecl

        class Holder(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                mx.random.seed(0)
                self.m = nn.Linear(DIM, DIM)

            def __call__(self, x: Any) -> Any:
                return self.m(x)

        def adapted() -> Any:
            spec = {"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "use_dora": kind == "dora",
                    "lora_dropout": 0.0, "target_modules": ["m"], "init_lora_weights": False}  # fmt: skip
            return peftdecl.attach(Holder(), spec, seed=0).engine.layer("m")

        self.mx = mx
        rng = np.random.default_rng(0)
        self.x = mx.array(rng.standard_normal((TOKENS, DIM)), mx.float32)
        self.dy = mx.array(rng.standard_normal((TOKENS, DIM)), mx.float32)
        self.base = Holder().m
        self.base.freeze()
        self.layer = adapted().eval()
        trained = adapted().train()
        params = trained.trainable_parameters()

        def loss(p: Any, inputs: Any) -> Any:
            trained.update(p)
            return mx.sum(trained(inputs) * self.dy)

        grad = mx.value_and_grad(loss, argnums=(0, 1))
        base_grad = mx.value_and_grad(lambda inputs: mx.sum(self.base(inputs) * self.dy))
        self.adapter_step = lambda: mx.eval(grad(params, self.x))
        self.base_step = lambda: mx.eval(base_grad(self.x))
        mx.eval(self.layer(self.x), self.base(self.x))
        self.adapter_step()

    def time_base_forward(self, kind: str) -> None:
        """The plain layer: x @ W.T + b."""
        self.mx.eval(self.base(self.x))

    def time_adapter_forward(self, kind: str) -> None:
        """The adapted layer's forward (eval mode)."""
        self.mx.eval(self.layer(self.x))

    def time_base_forward_backward(self, kind: str) -> None:
        """The plain layer's forward and its gradient w.r.t. the input."""
        self.base_step()

    def time_adapter_forward_backward(self, kind: str) -> None:
        """The adapted layer's forward and its gradients w.r.t. the input and the adapter arrays (training mode)."""
        self.adapter_step()

"""The torch backend's adapted Linear per kind, forward and forward+backward, next to the plain frozen layer.

Read each ``time_*_adapted / time_*_base`` pair as a ratio (benchmarks/compare_torch_peft.py prints the same ratios
with HF PEFT beside them). Linear 1024×1024, float32, r = 16 (VeRA 256, OFT/BOFT blocks of 32), non-zero adapter
weights, 2 threads. Skipped when torch is not installed.

``fused`` is the engine option of that name: the hand-written autograd Functions of peftdecl_torch.kinds._fused
(True) or composed torch ops (False). Both layers compute their products through torch's own library.

Two token counts, one on each side of the cost rules in peftdecl_torch.kinds._fused: 2048 tokens (LoRA and AdaLoRA
merge the update into the weight per call, OFT rotates the weight) and 64 tokens (they apply the update to the
tokens, OFT rotates the input).
"""

from __future__ import annotations

from typing import Any

import peftdecl

DIM = 1024
TOKENS = (64, 2048)
SPECS: dict[str, dict[str, Any]] = {
    "lora": {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "init_lora_weights": False},
    "dora": {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "use_dora": True, "init_lora_weights": False},
    "adalora": {"peft_type": "ADALORA", "init_r": 16, "target_r": 8, "total_step": 100, "lora_alpha": 32},
    "ia3": {"peft_type": "IA3", "feedforward_modules": [], "init_ia3_weights": False},
    "loha": {"peft_type": "LOHA", "r": 16, "alpha": 32, "init_weights": False},
    "lokr": {"peft_type": "LOKR", "r": 16, "alpha": 32, "init_weights": False},
    "oft": {"peft_type": "OFT", "r": 0, "oft_block_size": 32, "init_weights": False},
    "boft": {"peft_type": "BOFT", "boft_block_size": 32, "init_weights": False},
    "vera": {"peft_type": "VERA", "r": 256, "init_weights": False},
}


class TorchAdaptedLinear:
    """One adapted nn.Linear per kind; ``time_*_base`` is the same frozen Linear without the adapter."""

    params = (list(SPECS), list(TOKENS), [True, False])
    param_names = ("kind", "tokens", "fused")
    timeout = 300

    def setup(self, kind: str, tokens: int, fused: bool) -> None:
        try:
            import torch
        except ImportError as exc:
            raise NotImplementedError("torch is not installed") from exc
        self.torch = torch
        torch.set_num_threads(2)
        torch.manual_seed(0)
        self.base = torch.nn.Linear(DIM, DIM).requires_grad_(False)
        holder = torch.nn.Sequential()
        holder.add_module("m", torch.nn.Linear(DIM, DIM))
        holder.m.load_state_dict(self.base.state_dict())
        spec = {**SPECS[kind], "target_modules": ["m"]}
        model = peftdecl.attach(holder, spec, seed=0, engine_options={"fused": fused})
        with torch.no_grad():  # adapters that start as a no-op (B = 0, …) get non-zero values everywhere
            for param in model.trainable_parameters().values():
                param.add_(0.01)
        self.adapted = model.engine.layer("m")
        self.x = torch.randn(tokens, DIM)
        self.x_grad = self.x.clone().requires_grad_(True)
        self.dy = torch.randn(tokens, DIM)

    def _forward(self, layer: Any) -> None:
        with self.torch.no_grad():
            layer(self.x)

    def _forward_backward(self, layer: Any) -> None:
        self.x_grad.grad = None
        for param in layer.parameters():
            param.grad = None
        layer(self.x_grad).backward(self.dy)

    def time_forward_base(self, kind: str, tokens: int, fused: bool) -> None:
        self._forward(self.base)

    def time_forward_adapted(self, kind: str, tokens: int, fused: bool) -> None:
        self._forward(self.adapted)

    def time_forward_backward_base(self, kind: str, tokens: int, fused: bool) -> None:
        self._forward_backward(self.base)

    def time_forward_backward_adapted(self, kind: str, tokens: int, fused: bool) -> None:
        self._forward_backward(self.adapted)

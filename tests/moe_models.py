"""Tiny models with raw parameters for ``target_parameters`` (HF PEFT's ``ParamWrapper``), shared by the torch
and NumPy tests: a module whose 2-D weight is used by ``x @ W``, an expert stack ``[E, out, in]`` run with
``torch.bmm``/``einsum`` holding two targeted parameters (PEFT nests its wrappers), the same stack stored
``[E, in, out]`` (``is_transposed``), and transformers' Qwen3-MoE and GPT-OSS built from configs; PEFT models of
each case with seeded random A and B."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
nn = torch.nn


class UsesParameter(nn.Module):
    """PEFT's own test layer: a weight [in, out] read by ``x @ W`` (no nn.Linear to wrap)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out))
        self.bias = nn.Parameter(torch.randn(d_out))

    def forward(self, x: Any) -> Any:
        return x @ self.weight + self.bias


class Experts(nn.Module):
    """E experts, each a gated MLP: gate_up [E, 2I, H] and down [E, H, I] (stored transposed when asked)."""

    def __init__(self, experts: int, hidden: int, inner: int, is_transposed: bool = False) -> None:
        super().__init__()
        self.is_transposed = is_transposed
        gate_up, down = torch.randn(experts, 2 * inner, hidden), torch.randn(experts, hidden, inner)
        if is_transposed:
            gate_up, down = gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
        self.gate_up_proj = nn.Parameter(gate_up / hidden**0.5)
        self.down_proj = nn.Parameter(down / inner**0.5)

    def forward(self, x: Any) -> Any:  # x: [E, T, H], one slice of tokens per expert
        gate_up = self.gate_up_proj if self.is_transposed else self.gate_up_proj.transpose(1, 2)
        h = torch.bmm(x, gate_up)
        gate, up = h.chunk(2, dim=-1)
        h = torch.nn.functional.silu(gate) * up
        if self.is_transposed:
            return torch.einsum("eti,eih->eth", h, self.down_proj)
        return torch.einsum("eti,ehi->eth", h, self.down_proj)


class TinyMoE(nn.Module):
    def __init__(self, is_transposed: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.experts = Experts(3, 6, 4, is_transposed)
        self.head = UsesParameter(6, 5)

    def forward(self, x: Any) -> Any:
        return self.head(self.experts(self.proj(x)))


def make_model(name: str) -> Any:
    torch.manual_seed(0)
    if name == "moe":
        return TinyMoE().eval()
    if name == "moe_transposed":
        return TinyMoE(is_transposed=True).eval()
    transformers = pytest.importorskip("transformers")
    common = dict(
        vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
    )
    common.update(head_dim=4, num_experts_per_tok=2, max_position_embeddings=32)
    if name == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            **common, intermediate_size=12, moe_intermediate_size=6, num_experts=3, decoder_sparse_step=1
        )
        model_class = transformers.Qwen3MoeForCausalLM
    else:
        config = transformers.GptOssConfig(
            **common, intermediate_size=6, num_local_experts=3, layer_types=["full_attention"]
        )
        model_class = transformers.GptOssForCausalLM
    config._experts_implementation = "eager"  # the reference loop (grouped_mm wants 16-byte strides on CPU)
    return model_class(config).eval()


def make_input(name: str) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(3)
    if name.startswith("moe"):
        return {"x": torch.randn(3, 4, 6, generator=generator)}
    return {"input_ids": torch.randint(0, 32, (2, 5), generator=generator)}


def output(model: Any, inputs: dict[str, Any]) -> np.ndarray:
    with torch.no_grad():
        found = model(**inputs)
    found = getattr(found, "logits", found)
    return found.detach().double().numpy()


EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
CASES = {
    # name: (model, LoraConfig keywords)
    "2d": ("moe", {"target_parameters": ["head.weight"], "r": 3}),
    "experts_nested": ("moe", {"target_modules": [], "target_parameters": EXPERTS, "r": 2, "lora_alpha": 5}),
    "transposed": ("moe_transposed", {"target_parameters": EXPERTS, "r": 2, "use_rslora": True}),
    "with_modules": (
        "moe",
        {
            "target_modules": ["proj"],
            "target_parameters": ["down_proj", "head.weight"],
            "rank_pattern": {"down_proj": 3},
            "alpha_pattern": {"head.weight": 7},
        },
    ),
    "qwen3_moe": (
        "qwen3_moe",
        {"target_modules": [], "target_parameters": ["mlp.experts.gate_up_proj", "down_proj"]},
    ),
    "gpt_oss": (
        "gpt_oss",
        {"target_modules": ["q_proj"], "target_parameters": ["experts.gate_up_proj"], "r": 2},
    ),
}


def peft_model(name: str, **changes: Any) -> tuple[Any, Any]:
    """(base model, PEFT's model of case ``name`` with seeded random A and B)."""
    model_name, kwargs = CASES[name]
    base = make_model(model_name)
    torch.manual_seed(1234)
    config = peft.LoraConfig(**{"init_lora_weights": False, **kwargs, **changes})
    return base, peft.get_peft_model(copy.deepcopy(base), config).eval()

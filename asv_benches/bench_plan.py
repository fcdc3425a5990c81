"""Plan compilation (spec + model inventory -> IR) on a Llama-7B-shaped inventory. No arrays are touched.

``CompilePlanGate`` times compile_plan and load_spec for the CI regression gate (benchmarks/regression_gate.py).
"""

from __future__ import annotations

import json

import peftdecl
from peftdecl.plan import LayerInfo, ModelInfo

from ._gate import cpu_ratio, python_reference

SPEC = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": "all-linear"}


def llama_info(
    num_layers: int = 32, hidden: int = 4096, intermediate: int = 11008, vocab: int = 32000
) -> ModelInfo:
    """The layer inventory of a Llama-2-7B: 7 linears per block, token embedding and an untouched lm_head."""
    shapes = {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (hidden, hidden),
        "self_attn.v_proj": (hidden, hidden),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (hidden, intermediate),
        "mlp.up_proj": (hidden, intermediate),
        "mlp.down_proj": (intermediate, hidden),
    }
    layers = {"model.embed_tokens": LayerInfo("embedding", vocab, hidden)}
    for i in range(num_layers):
        for suffix, (d_in, d_out) in shapes.items():
            layers[f"model.layers.{i}.{suffix}"] = LayerInfo("linear", d_in, d_out)
    layers["lm_head"] = LayerInfo("linear", hidden, vocab)
    return ModelInfo(
        layers=layers,
        output_head="lm_head",
        model_type="llama",
        num_layers=num_layers,
        hidden_size=hidden,
        num_attention_heads=32,
        num_key_value_heads=32,
        head_dim=hidden // 32,
        vocab_size=vocab,
        word_embeddings="model.embed_tokens",
    )


class CompilePlan:
    """LoRA r=16 on all 224 linears of a 32-layer Llama (the target is under 5 ms per compile)."""

    def setup(self) -> None:
        self.info = llama_info()
        self.spec = peftdecl.load_spec(SPEC)
        self.text = json.dumps(SPEC)

    def time_compile_plan(self) -> None:
        """compile_plan alone, from an already decoded spec."""
        peftdecl.compile_plan(self.spec, self.info)

    def time_load_spec_and_compile(self) -> None:
        """load_spec from JSON text (schema validation + msgspec decode) followed by compile_plan."""
        peftdecl.compile_plan(peftdecl.load_spec(self.text), self.info)

    def time_load_spec(self) -> None:
        """load_spec from JSON text alone."""
        peftdecl.load_spec(self.text)

    def track_num_targets(self) -> int:
        """Number of adapted layers (224 expected: the output head is excluded by all-linear)."""
        return len(peftdecl.compile_plan(self.spec, self.info).layers)

    track_num_targets.unit = "layers"  # type: ignore[attr-defined]


class CompilePlanGate:
    """compile_plan and load_spec as the regression gate times them: CPU time ÷ that of fixed pure-Python
    reference work, fastest of 50 alternating calls each (asv_benches/_gate.py says why)."""

    def setup(self) -> None:
        self.info = llama_info()
        self.spec = peftdecl.load_spec(SPEC)
        self.text = json.dumps(SPEC)

    def track_compile_plan_over_python(self) -> float:
        """compile_plan from a decoded spec, in units of the reference work."""
        return cpu_ratio(lambda: peftdecl.compile_plan(self.spec, self.info), python_reference, 50)

    def track_load_spec_over_python(self) -> float:
        """load_spec from JSON text, in units of the reference work."""
        return cpu_ratio(lambda: peftdecl.load_spec(self.text), python_reference, 50)

    track_compile_plan_over_python.unit = "ratio"  # type: ignore[attr-defined]
    track_load_spec_over_python.unit = "ratio"  # type: ignore[attr-defined]

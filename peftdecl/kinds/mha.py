"""The ``lora_mha`` kind: LoRA on an ``nn.MultiheadAttention`` layer (HF PEFT's ``lora.MultiheadAttention``).

It shares LoRA's spec and ``peft_type``; no spec selects it: LoRA's layout hands an ``mha`` target to it, so one
LoRA adapter mixes ``lora`` and ``lora_mha`` layers. The attention runs on the weights with ΔW added (an INPUT
composition), so several active adapters add their ΔW before the one attention call, as PEFT merges them. MLX
has no fused-in_proj attention layer: the kind declares ops for NumPy and torch only.
"""

from __future__ import annotations

from peftdecl.kinds._decl import KindDecl
from peftdecl.spec.lora import LoraSpec

MHA_LAYERS = ("mha",)
LORA_MHA_EXAMPLE = {"peft_type": "LORA", "r": 3, "lora_alpha": 6, "init_lora_weights": False}

LORA_MHA = KindDecl(
    name="lora_mha",
    peft_type="LORA",
    spec_class=LoraSpec,
    layout="peftdecl.plan.kinds.lora_mha:LAYOUT",
    tensor_names=(
        "lora_A.weight",
        "lora_B.weight",
        "base_layer.out_proj.lora_A.weight",
        "base_layer.out_proj.lora_B.weight",
    ),
    hf_markers=(".base_layer.out_proj.lora_A.",),
    layer_types=MHA_LAYERS,
    composition="input",
    reached_from="lora",
    ops={backend: f"peftdecl_{backend}.kinds.lora_mha:OPS" for backend in ("numpy", "torch")},
    examples={"mha": {**LORA_MHA_EXAMPLE, "target_modules": ["m"]}},
    summary="attention on W' = W + [s · B A ; 2s · B' A'] (in_proj ; out_proj): LoRA on nn.MultiheadAttention",
)

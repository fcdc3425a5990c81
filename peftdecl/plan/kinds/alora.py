"""aLoRA layout (activated LoRA, HF PEFT's ``alora_invocation_tokens``): LoRA's A and B on a linear layer; the
invocation tokens ride in the layer's options, where the ops look up the offsets of the call (peftdecl.alora)."""

from __future__ import annotations

from peftdecl.plan.ir import LayerInfo, LayerPlan, ModelInfo
from peftdecl.plan.kinds import KindLayout
from peftdecl.plan.kinds.lora import build_lora_layer
from peftdecl.spec.lora import LoraSpec


def build_alora_layer(spec: LoraSpec, module: str, layer: LayerInfo, info: ModelInfo) -> LayerPlan:
    """LoRA's layer plan with kind ``alora`` and ``invocation_tokens`` in its options."""
    lora = build_lora_layer(spec, module, layer, info)
    return LayerPlan(
        module=module,
        layer=layer,
        kind="alora",
        params=lora.params,
        r=lora.r,
        alpha=lora.alpha,
        scaling=lora.scaling,
        options={**lora.options, "invocation_tokens": tuple(spec.alora_invocation_tokens or ())},
    )


# not mergeable: the update acts on some positions only (HF PEFT refuses to merge aLoRA too)
LAYOUT = KindLayout(kind="alora", build_layer=build_alora_layer, mergeable=False)

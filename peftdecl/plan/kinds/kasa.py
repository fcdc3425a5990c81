"""KaSA layout: LoRA's A and B plus the learnt singular values d ∈ R^r (``lora_diag``, drawn N(0, 1) as HF PEFT
does: B = 0 keeps the update zero). The base weight is replaced by its rank-(k − r) truncation when the adapter is
attached or loaded (:func:`peftdecl.lora_variants_init.kasa_truncated_bases`)."""

from __future__ import annotations

from peftdecl.errors import TargetError
from peftdecl.plan.ir import Init, LayerInfo, LayerPlan, ModelInfo, ParamSpec
from peftdecl.plan.kinds import KindLayout
from peftdecl.plan.kinds.lora import build_lora_layer
from peftdecl.spec.lora import LoraSpec

DIAG = "lora_diag"


def build_kasa_layer(spec: LoraSpec, module: str, layer: LayerInfo, info: ModelInfo) -> LayerPlan:
    """LoRA's plan with d added; r must leave at least one singular component of W (r < min(in, out))."""
    lora = build_lora_layer(spec, module, layer, info)
    k = min(layer.in_features, layer.out_features)
    if lora.r >= k:
        raise TargetError(
            f"{module}: KaSA needs $.r < min(in_features, out_features) = {k} so that W keeps at least one "
            f"singular component after dropping r of them, got r={lora.r}"
        )
    if layer.quantization is not None:
        raise TargetError(
            f"{module}: KaSA rewrites the base weight; a quantised ({layer.quantization}) base "
            "is not supported by peftdecl"
        )
    diag = ParamSpec(DIAG, (lora.r,), "trainable", Init("normal", std=1.0))
    return LayerPlan(
        module=module,
        layer=layer,
        kind="kasa",
        params=(*lora.params, diag),
        r=lora.r,
        alpha=lora.alpha,
        scaling=lora.scaling,
        options=lora.options,
    )


LAYOUT = KindLayout(kind="kasa", build_layer=build_kasa_layer)

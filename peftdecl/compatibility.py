"""Whether a compiled plan can join the adapters already attached, on this backend."""

from __future__ import annotations

from collections.abc import Mapping

from peftdecl.backend import Capabilities
from peftdecl.bias_training import check_one_bias_adapter
from peftdecl.errors import BackendError, PeftdeclError
from peftdecl.kinds import get_kind, kinds
from peftdecl.lora_variants_init import check_kasa_alone
from peftdecl.plan import Plan
from peftdecl.plan.kinds.vera import check_family as check_vera_family


def first_vera(attached: Mapping[str, Plan], plan: Plan) -> str | None:
    """The first VeRA adapter of ``attached``, when ``plan`` is a later one (they share its projections)."""
    if plan.kind != "vera":
        return None
    return next((name for name, p in attached.items() if p.kind == "vera"), None)


def check_compatible(attached: Mapping[str, Plan], plan: Plan, caps: Capabilities) -> None:
    """Refuse ``plan`` when the backend (``caps``) cannot run a layer of it, when a base layer it adapts is
    quantised in a way the backend does not handle or its kind needs the dense weight, or when a VeRA plan does
    not fit the first VeRA's projections."""
    check_one_bias_adapter(attached, plan)
    check_kasa_alone(attached, plan)
    first = first_vera(attached, plan)
    if first is not None:
        check_vera_family(first, attached[first], plan)
    for layer in plan.layers:
        reason = caps.why_not(layer.kind, layer.layer.type)
        if reason:
            raise PeftdeclError(f"{layer.module}: {reason}")
    if plan.prompt is not None and caps.why_not(plan.kind):
        raise PeftdeclError(caps.why_not(plan.kind) or "")
    for layer in plan.layers:
        quantization = layer.layer.quantization
        if quantization is None:
            continue
        if quantization not in caps.quantizations:
            raise BackendError(
                f"{layer.module}: the base layer is quantised ({quantization}); the {caps.name} backend adapts "
                f"{', '.join(caps.quantizations) or 'no quantised layers'}: dequantise it or leave it out of "
                "target_modules"
            )
        if layer.layer.quant_scheme is None:
            # a class that looks quantised but carries no quantisation state: not a layer we know how it runs
            raise BackendError(
                f"{layer.module}: the base layer is quantised ({quantization}) but its quantisation state could not "
                "be read (not yet quantised, or not a bitsandbytes layer): load the model with BitsAndBytesConfig"
            )
        if get_kind(layer.kind).needs_dense_weight and not caps.dequantizes:
            raise BackendError(
                f"{layer.module}: {layer.kind} needs the dense base weight, and this layer is quantised "
                f"({quantization}), which the {caps.name} backend does not dequantise; over quantised layers it runs "
                f"{', '.join(quantized_kinds())}: dequantise the model or leave the layer out of target_modules"
            )


def quantized_kinds() -> tuple[str, ...]:
    """The registered layer kinds that run over a quantised base weight (they never read the dense weight)."""
    return tuple(name for name, decl in kinds().items() if decl.layer_types and not decl.needs_dense_weight)

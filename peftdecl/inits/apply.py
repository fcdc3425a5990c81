"""LoftQ and CorDA as steps of :func:`peftdecl.lora_init.weight_initialised`: each layer's new A, B and base weight.

``values`` empty means the adapter's tensors come from a file (``load_adapter``): as in PEFT, which runs the
initialisation again when it loads such an adapter, only the base weight changes are returned then.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from peftdecl.errors import TargetError
from peftdecl.inits import forget, recalled
from peftdecl.inits.corda import CordaEigens, check_eigens, corda_factors
from peftdecl.inits.loftq import check_loftq_layer, loftq_factors, loftq_settings
from peftdecl.lora_init import _redraw_base_dependent, check_weight_init_layer
from peftdecl.plan.ir import Plan

Initialised = tuple[dict[str, np.ndarray], dict[str, np.ndarray]]


def loftq_initialised(
    plan: Plan, values: Mapping[str, np.ndarray], base_weight: Callable[[str], np.ndarray]
) -> Initialised:
    """A, B of LoftQ and Q as the new base weight of every layer. Loading onto an already quantised base changes
    nothing: that base is the quantised model LoftQ's adapter was made for."""
    out, bases = dict(values), dict[str, np.ndarray]()
    loading = not values
    if loading and any(layer.layer.quantization is not None for layer in plan.layers):
        return out, bases
    for layer in plan.layers:
        check_loftq_layer(layer)
    bits, iterations = loftq_settings(getattr(plan.spec, "loftq_config", None) or {})
    for layer in plan.layers:
        weight = np.asarray(base_weight(layer.module), dtype=np.float64)
        a, b, q = loftq_factors(weight, layer.r, bits, iterations)
        bases[f"{layer.module}.weight"] = q
        if not loading:
            out[layer.key("lora_A.weight")], out[layer.key("lora_B.weight")] = a, b
            _redraw_base_dependent(layer, q, out)
    return out, bases


def corda_initialised(
    plan: Plan,
    values: Mapping[str, np.ndarray],
    base_weight: Callable[[str], np.ndarray],
    model: object,
) -> Initialised:
    """A, B of CorDA from the eigens :func:`peftdecl.preprocess_corda` kept for ``model``, and W − s·B A as the new
    base weight; the eigens are used up (as PEFT deletes them from the layer)."""
    out, bases = dict(values), dict[str, np.ndarray]()
    for layer in plan.layers:
        check_weight_init_layer("corda", layer)
    kept = recalled(model, "corda") if model is not None else {}
    used: list[str] = []
    for layer in plan.layers:
        if layer.layer.type == "embedding":
            continue  # PEFT gives an embedding its usual A = 0, B ~ N(0, 1) whatever the init says
        eigens = kept.get(layer.module)
        if not isinstance(eigens, CordaEigens):
            raise TargetError(
                f"{layer.module}: init_lora_weights='corda' needs this layer's CorDA eigens: call "
                "peftdecl.preprocess_corda(model, spec, run_model=...) on the model first"
                + (
                    " (or save the adapter with path_initial_model_for_weight_conversion, a plain LoRA)"
                    if not values
                    else ""
                )
            )
        check_eigens(layer, eigens)
        a, b = corda_factors(eigens, layer.scaling)
        weight = np.asarray(base_weight(layer.module), dtype=np.float64)
        bases[f"{layer.module}.weight"] = weight - layer.scaling * (b @ a)
        if values:
            out[layer.key("lora_A.weight")], out[layer.key("lora_B.weight")] = a, b
            _redraw_base_dependent(layer, bases[f"{layer.module}.weight"], out)
        used.append(layer.module)
    forget(model, "corda", used)
    return out, bases

"""HF PEFT's ``bias`` option: which base biases an adapter trains and saves beside its own tensors.

``bias="none"`` trains none. ``"all"`` trains every parameter of the base model whose name contains ``bias``
(LayerNorm biases too). ``"<kind>_only"`` (``lora_only``, ``oft_only``, ``boft_only``, ``vera_only``) trains the
biases of the layers the adapter targets. The forward is unchanged: y = W x + b + Δ(x) with b now learnt.

Keys, as PEFT saves them: a targeted layer's bias is ``<module>.base_layer.bias``, any other ``<module>.bias``.
PEFT allows one adapter with a bias other than "none" per model (they would share the base biases).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

from peftdecl.errors import PeftdeclError
from peftdecl.plan.ir import Plan

BiasMode = Literal["none", "all", "adapted"]
BASE_LAYER = ".base_layer"


def bias_mode(plan: Plan) -> BiasMode:
    """``none``, ``all`` (every base bias) or ``adapted`` (the targeted layers' biases) for the plan's spec."""
    value = getattr(plan.spec, "bias", "none")
    if value == "none" or value is None:
        return "none"
    return "all" if value == "all" else "adapted"


def bias_key(module: str, targeted: bool) -> str:
    """PEFT's key of a base bias: ``<module>.base_layer.bias`` under an adapter, ``<module>.bias`` elsewhere."""
    return f"{module}{BASE_LAYER}.bias" if targeted else f"{module}.bias"


def bias_module(key: str) -> str:
    """The module a bias key belongs to (``a.base_layer.bias`` and ``a.bias`` -> ``a``)."""
    return key.removesuffix(".bias").removesuffix(BASE_LAYER)


def trained_bias_keys(plan: Plan, base_biases: Iterable[str]) -> tuple[str, ...]:
    """The keys of the base biases ``plan`` trains; ``base_biases``: every bias parameter of the base model, by
    its module-path name (``a.bias``, ``ln.bias``), whatever wraps it now."""
    mode = bias_mode(plan)
    if mode == "none":
        return ()
    targeted = set(plan.targets)
    saved = tuple(m + "." for m in plan.modules_to_save)  # their copies are saved whole already
    base_biases = [name for name in base_biases if not name.startswith(saved)]
    if mode == "adapted":
        modules = {name.removesuffix(".bias") for name in base_biases}
        return tuple(bias_key(m, True) for m in plan.targets if m in modules)
    keys = []
    for name in base_biases:
        module, _, leaf = name.rpartition(".")
        # PEFT matches "bias" anywhere in the name (T5's relative_attention_bias.weight too)
        keys.append(f"{module}{BASE_LAYER}.{leaf}" if module in targeted else name)
    return tuple(keys)


def is_bias_override(plan: Plan, key: str) -> bool:
    """True when ``key`` of a saved adapter is a base bias the adapter trained (not one of its own tensors)."""
    return (
        bias_mode(plan) != "none"
        and key.endswith(".bias")
        and key not in plan.param_specs()
        and not any(key.startswith(m + ".") for m in plan.modules_to_save)
    )


def check_one_bias_adapter(attached: Mapping[str, Plan], plan: Plan) -> None:
    """Refuse a second adapter that trains base biases: PEFT allows one (they would share the same biases)."""
    if bias_mode(plan) == "none":
        return
    others = [name for name, other in attached.items() if bias_mode(other) != "none"]
    if others:
        raise PeftdeclError(
            f"adapter {others[0]!r} already trains the base biases (bias={getattr(plan.spec, 'bias', None)!r}): "
            "only one adapter per model may set bias; set it to 'none' on the others (as in HF PEFT)"
        )

"""BD-LoRA layout: LoRA on the modules ``use_bdlora`` names, with A or B block-diagonal.

A pattern of ``target_modules_bd_a`` (``_bd_b``) that is a substring of the module's name makes A (B) block-diagonal
with n = ``nblocks`` blocks, stored as HF PEFT stores them, the n blocks stacked along the rows: A as [r, in / n]
(block i: rows i·r/n …, reading inputs i·in/n …) and B as [out, r / n]. A block-diagonal A is drawn Kaiming-uniform
(a = 0), a block-diagonal B starts at zero, whatever ``init_lora_weights`` says (PEFT builds them after LoRA's
init); the other factor keeps LoRA's initialisation. The options carry which factor is blocked and n.
"""

from __future__ import annotations

from peftdecl.errors import TargetError
from peftdecl.plan.ir import Init, LayerInfo, LayerPlan, ModelInfo, ParamSpec
from peftdecl.plan.kinds import KindLayout
from peftdecl.plan.kinds.lora import build_lora_layer
from peftdecl.spec.lora import LoraSpec


def blocked_factor(spec: LoraSpec, module: str) -> str | None:
    """ "A", "B" or None: which factor of ``module`` is block-diagonal (HF PEFT's substring match)."""
    config = spec.use_bdlora
    if config is None:
        return None
    in_a = any(pattern in module for pattern in config.target_modules_bd_a or ())
    in_b = any(pattern in module for pattern in config.target_modules_bd_b or ())
    if in_a and in_b:
        raise TargetError(f"{module}: matches both $.use_bdlora.target_modules_bd_a and target_modules_bd_b")
    if not (in_a or in_b) and config.match_strict:
        raise TargetError(
            f"{module}: matches neither $.use_bdlora.target_modules_bd_a nor target_modules_bd_b; add a pattern "
            "or set $.use_bdlora.match_strict to false to keep plain LoRA on it"
        )
    return "A" if in_a else "B" if in_b else None


def _check_divides(module: str, n: int, **sizes: int) -> None:
    for what, size in sizes.items():
        if size % n:
            raise TargetError(f"{module}: $.use_bdlora.nblocks={n} must divide {what} ({size})")


def build_bdlora_layer(spec: LoraSpec, module: str, layer: LayerInfo, info: ModelInfo) -> LayerPlan:
    """LoRA's plan with the blocked factor's shape and initialisation replaced."""
    assert spec.use_bdlora is not None
    lora = build_lora_layer(spec, module, layer, info)
    blocked, n = blocked_factor(spec, module), spec.use_bdlora.nblocks
    params = list(lora.params)
    r = lora.r
    if blocked == "A":
        _check_divides(module, n, in_features=layer.in_features, r=r)
        params[0] = ParamSpec(
            "lora_A.weight",
            (r, layer.in_features // n),
            "trainable",
            Init("kaiming_uniform", fan_in=layer.in_features // n, a=0.0),
        )
    elif blocked == "B":
        _check_divides(module, n, out_features=layer.out_features, r=r)
        params[1] = ParamSpec("lora_B.weight", (layer.out_features, r // n), "trainable", Init("zeros"))
    return LayerPlan(
        module=module,
        layer=layer,
        kind="bdlora",
        params=tuple(params),
        r=r,
        alpha=lora.alpha,
        scaling=lora.scaling,
        options={**lora.options, "blocked": blocked or "", "nblocks": n},
    )


LAYOUT = KindLayout(kind="bdlora", build_layer=build_bdlora_layer)

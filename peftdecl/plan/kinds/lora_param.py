"""LoRA on a raw parameter (``target_parameters``, HF PEFT's ``ParamWrapper``): shapes, inits and the layer plan.

A parameter ``W`` of shape ``[out, in]``, or a stack of ``E`` experts ``[E, out, in]`` (``[E, in, out]`` where its
module says ``is_transposed``), gets ``A ∈ R^{rE×in}`` and ``B ∈ R^{out×rE}``. Expert ``e`` uses the rows
``e·r … e·r + r − 1`` of A and the columns ``e, e + E, …, e + (r − 1)·E`` of B (PEFT's reshapes), so
ΔW_e = s · B_e A_e (transposed for a transposed stack) with s = alpha / r (alpha / √r with rsLoRA).
"""

from __future__ import annotations

from peftdecl.errors import TargetError
from peftdecl.plan.ir import Init, LayerInfo, LayerPlan, ParamSpec
from peftdecl.plan.kinds.lora import linear_default_init, lora_scaling, rank_and_alpha
from peftdecl.spec.lora import LoraSpec


def parameter_info(name: str, shape: tuple[int, ...], dtype: str | None, transposed: bool) -> LayerInfo:
    """The LayerInfo of a raw parameter: HF PEFT's per-expert in/out features (0 where it has not 2 or 3 dims)."""
    if len(shape) == 2:
        d_out, d_in = shape
    elif len(shape) == 3:
        d_in, d_out = (shape[1], shape[2]) if transposed else (shape[2], shape[1])
    else:
        d_in = d_out = 0
    return LayerInfo(
        "parameter", d_in, d_out, dtype=dtype, parameter=name, shape=tuple(shape), transposed=transposed
    )


def experts(layer: LayerInfo) -> int:
    """E: the number of stacked experts (1 for a 2-D parameter)."""
    return layer.shape[0] if len(layer.shape) == 3 else 1


def build_parameter_layer(spec: LoraSpec, module: str, layer: LayerInfo) -> LayerPlan:
    """One raw parameter's LoRA, saved under ``module`` (PEFT's key prefix); rank and alpha patterns are matched
    against the parameter's full name, as in HF PEFT."""
    if len(layer.shape) not in (2, 3):
        raise TargetError(
            f"target_parameters selects {layer.parameter} of shape {list(layer.shape)}; only 2-D and 3-D "
            "parameters can be adapted (as in HF PEFT)"
        )
    r, alpha = rank_and_alpha(spec, layer.parameter)
    rank = r * experts(layer)
    init = spec.init_lora_weights
    # PEFT's nn.Linear defaults for A (and B with init false) on the stacked rank rE; "gaussian" keeps std 1/r
    a_init = Init("normal", std=1.0 / r) if init == "gaussian" else linear_default_init(layer.in_features)
    b_init = linear_default_init(rank) if init is False else Init("zeros")
    return LayerPlan(
        module=module,
        layer=layer,
        kind="lora",
        params=(
            ParamSpec("lora_A.weight", (rank, layer.in_features), "trainable", a_init),
            ParamSpec("lora_B.weight", (layer.out_features, rank), "trainable", b_init),
        ),
        r=r,
        alpha=float(alpha),
        scaling=lora_scaling(alpha, r, spec.use_rslora),
        options={"dropout": 0.0, "fan_in_fan_out": False, "lora_bias": False, "experts": experts(layer)},
    )

"""The plan (IR): targeting and per-kind layouts compiled into frozen, array-free nodes."""

from peftdecl.plan.compile import compile_plan
from peftdecl.plan.ir import (
    LAYER_TYPES,
    Init,
    LayerInfo,
    LayerPlan,
    ModelInfo,
    ParamSpec,
    Plan,
    PromptPlan,
)

__all__ = [
    "LAYER_TYPES",
    "Init",
    "LayerInfo",
    "LayerPlan",
    "ModelInfo",
    "ParamSpec",
    "Plan",
    "PromptPlan",
    "compile_plan",
]

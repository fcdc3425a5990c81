"""Per-kind layouts: which tensors each adapter kind puts on a layer, with HF PEFT's names, shapes and inits.

A layout module exposes ``LAYOUT``, a :class:`KindLayout`. ``compile_plan`` looks layouts up by execution kind.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from peftdecl.plan.ir import LayerInfo, LayerPlan, ModelInfo, ParamSpec, Plan, PromptPlan


@dataclass(frozen=True)
class KindLayout:
    """How one adapter kind is laid out on the layers it targets."""

    kind: str
    layer_types: tuple[str, ...]
    """Layer types the kind can wrap (HF PEFT's support table)."""
    build_layer: Callable[[Any, str, LayerInfo, ModelInfo], LayerPlan] | None = None
    build_shared: Callable[[Any, Sequence[LayerPlan], ModelInfo], tuple[ParamSpec, ...]] | None = None
    build_prompt: Callable[[Any, ModelInfo], tuple[PromptPlan, tuple[ParamSpec, ...]]] | None = None
    mergeable: bool = True
    to_file: Callable[[Plan, dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]] | None = None
    """Adjust tensors (IR keys) and config fields before saving in HF PEFT's layout (e.g. AdaLoRA's pruning)."""
    from_file: Callable[[Plan, dict[str, Any]], dict[str, Any]] | None = None
    """Turn tensors read from an HF PEFT file (IR keys) into the plan's full shapes (e.g. AdaLoRA's re-expansion)."""


def registry() -> dict[str, KindLayout]:
    """Execution kind -> layout, importing each layout module on first use."""
    import importlib
    import importlib.util

    layouts: dict[str, KindLayout] = {}
    for module in _LAYOUT_MODULES:
        if importlib.util.find_spec(f"peftdecl.plan.kinds.{module}") is None:
            continue
        mod = importlib.import_module(f"peftdecl.plan.kinds.{module}")
        for layout in getattr(mod, "LAYOUTS", (mod.LAYOUT,) if hasattr(mod, "LAYOUT") else ()):
            layouts[layout.kind] = layout
    return layouts


# Modules that define LAYOUT (one kind) or LAYOUTS (several), in HF PEFT's order.
_LAYOUT_MODULES: list[str] = ["lora", "dora", "adalora", "ia3", "lycoris", "oft", "boft", "vera", "prompt"]

"""Per-kind layouts: which tensors each adapter kind puts on a layer, with HF PEFT's names, shapes and inits.

A layout module exposes ``LAYOUT``, a :class:`KindLayout` (or ``LAYOUTS``, several); each kind's
:class:`~peftdecl.kinds.KindDecl` names it. ``compile_plan`` looks layouts up by execution kind.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from peftdecl._json import JsonObject
from peftdecl.plan.ir import LayerInfo, LayerPlan, ModelInfo, ParamSpec, Plan, PromptPlan


@dataclass(frozen=True)
class KindLayout:
    """How one adapter kind is laid out on the layers it targets."""

    kind: str
    """The execution kind; the layer types it adapts are declared once, in its :class:`peftdecl.kinds.KindDecl`."""
    build_layer: Callable[[Any, str, LayerInfo, ModelInfo], LayerPlan] | None = None
    build_shared: Callable[[Any, Sequence[LayerPlan], ModelInfo], tuple[ParamSpec, ...]] | None = None
    build_prompt: Callable[[Any, ModelInfo], tuple[PromptPlan, tuple[ParamSpec, ...]]] | None = None
    mergeable: bool = True
    to_file: Callable[[Plan, dict[str, np.ndarray]], tuple[dict[str, np.ndarray], JsonObject]] | None = None
    """Adjust tensors (IR keys) and config fields before saving in HF PEFT's layout (e.g. AdaLoRA's pruning)."""
    from_file: Callable[[Plan, dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None
    """Turn tensors read from an HF PEFT file (IR keys) into the plan's full shapes (e.g. AdaLoRA's re-expansion)."""
    prepare_spec: Callable[[Any, ModelInfo], Any] | None = None
    """Resolve model-dependent defaults of the spec before targeting (trainable tokens' null target_modules)."""


def registry() -> dict[str, KindLayout]:
    """Execution kind -> layout, for every kind of :mod:`peftdecl.kinds` (each layout imported on first use)."""
    from peftdecl import kinds

    return kinds.cached("layouts", lambda: {name: decl.load_layout() for name, decl in kinds.kinds().items()})

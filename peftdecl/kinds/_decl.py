"""``KindDecl``: everything peftdecl knows about one adapter kind, in one frozen record."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal

from peftdecl._json import JsonObject
from peftdecl.spec._base import SpecBase

if TYPE_CHECKING:
    from peftdecl.plan.kinds import KindLayout

Composition = Literal["add", "output", "input", "per-layer", "model"]
"""How an adapter of the kind combines with the layer and other adapters on it: ``add`` y = base(x) + Δ(x);
``output`` y ← φ(x, y); ``input`` the base runs on a transformed weight; ``per-layer`` the ops decide per layer
(``composition(lp)``); ``model`` acts on the model, not a layer (prompt learning)."""

Shapes = Mapping[str, tuple[int, ...]]
"""One module's tensors: the name a file gives each (``lora_A.weight``) -> its shape."""

RankReader = Callable[[Shapes, SpecBase], "str | None"]
"""What ``peftdecl inspect`` prints in its rank column for one module, from its tensor shapes (None: unknown)."""

COMPOSITIONS: tuple[str, ...] = ("add", "output", "input", "per-layer", "model")


def no_rank(shapes: Shapes, spec: SpecBase) -> str | None:
    """A kind without a rank (IA³, prompt learning): inspect prints ``-``."""
    return None


def resolve(target: str | object, what: str) -> object:
    """Import ``"package.module:ATTR"`` (``what`` names it in the error); any other object is returned as is."""
    if not isinstance(target, str):
        return target
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"{what}: {target!r} is not of the form 'package.module:ATTR'")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class KindDecl:
    """One adapter kind, declared once: the spec union, JSON schemas, HF file markers, ``inspect``, the
    capabilities page, each backend's kind table and the test case table are all read from these records."""

    name: str
    """The execution kind (``spec.kind``): ``"lora"``, ``"dora"``, ..., ``"prompt_tuning"``."""
    peft_type: str
    """HF PEFT's ``peft_type`` (the spec's tag). Several kinds may share one (LoRA and DoRA are both ``LORA``)."""
    spec_class: type[SpecBase]
    """The msgspec Struct of the spec; kinds sharing a ``peft_type`` share it."""
    layout: str | KindLayout
    """The :class:`~peftdecl.plan.kinds.KindLayout`, or ``"module:ATTR"`` imported on first use. An ATTR that
    holds several layouts (a tuple) is searched for the one whose ``kind`` is :attr:`name`."""
    tensor_names: tuple[str, ...]
    """The tensor names (HF suffixes) the kind puts on an adapted layer, e.g. ``lora_A.weight``."""
    hf_markers: tuple[str, ...]
    """Substrings that identify the kind's tensors among an HF PEFT file's keys (``.lora_A.``)."""
    layer_types: tuple[str, ...]
    """IR layer types it adapts (HF PEFT's support table); ``()`` for a model-level kind."""
    composition: Composition
    """How it combines with the base layer and with other adapters (see :data:`Composition`)."""
    rank: RankReader = no_rank
    """inspect's rank reading for one module."""
    ops: Mapping[str, str | object] = field(default_factory=dict)
    """Backend name -> the kind's ops object, or ``"module:ATTR"`` imported on first use."""
    examples: Mapping[str, JsonObject] = field(default_factory=dict)
    """Layer type (``"model"`` for a model-level kind) -> a minimal spec dict targeting module ``m``."""
    summary: str = ""
    """One line for the docs: what the kind computes."""
    needs_dense_weight: bool = True
    """True when the kind's forward reads the base layer's weight (DoRA's norm, a merged ΔW, a rotated W): over a
    quantised base it runs only on a backend that dequantises the weight on the fly (``Capabilities.dequantizes``);
    False for kinds that act on the layer's input and output only (LoRA: base(x) + Δ(x)), which run over a
    quantised layer as it is."""
    reached_from: str | None = None
    """A layer kind no spec selects: the layout of kind ``reached_from`` hands it the layers of its layer types
    (LoRA gives ``nn.MultiheadAttention`` targets to ``lora_mha``), so that kind accepts them too."""

    def __post_init__(self) -> None:
        if not self.name or not self.name.isidentifier() or self.name != self.name.lower():
            raise ValueError(f"kind name {self.name!r} must be a lower-case identifier")
        if not (isinstance(self.spec_class, type) and issubclass(self.spec_class, SpecBase)):
            raise TypeError(f"kind {self.name!r}: spec_class must be a SpecBase subclass")
        tag = self.spec_class.__struct_config__.tag
        if tag != self.peft_type:
            raise ValueError(
                f"kind {self.name!r}: peft_type {self.peft_type!r} differs from {self.spec_class.__name__}'s "
                f"tag {tag!r}"
            )
        if self.composition not in COMPOSITIONS:
            raise ValueError(f"kind {self.name!r}: composition must be one of {COMPOSITIONS}")
        if (self.composition == "model") != (not self.layer_types):
            raise ValueError(f"kind {self.name!r}: only a model-level kind has no layer types")
        object.__setattr__(self, "ops", MappingProxyType(dict(self.ops)))
        object.__setattr__(self, "examples", MappingProxyType(dict(self.examples)))

    @property
    def additive(self) -> bool:
        """True when the output is base(x) + Δ(x): it stacks by addition and runs in mixed batches."""
        return self.composition == "add"

    @property
    def model_level(self) -> bool:
        """True for a kind that acts on the model rather than on layers (prompt learning)."""
        return self.composition == "model"

    def load_layout(self) -> KindLayout:
        """The kind's layout, imported on first use."""
        found = resolve(self.layout, f"kind {self.name!r} layout")
        if isinstance(found, (tuple, list)):
            found = next((item for item in found if getattr(item, "kind", None) == self.name), None)
        if getattr(found, "kind", None) != self.name:
            raise TypeError(f"kind {self.name!r}: {self.layout!r} is not a KindLayout for {self.name!r}")
        return found  # type: ignore[return-value]

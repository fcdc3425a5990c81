"""How several adapters active on one layer combine: HF PEFT's rules, shared by every backend.

Each kind's ops says how it composes (:func:`role`):

- ``ADD`` (the additive kinds: LoRA, AdaLoRA, LoHa, LoKr, VeRA): y ← y + Δ(x);
- ``OUTPUT``: the output built so far is transformed, y ← φ(x, y): DoRA rescales it with its magnitude
  (b + g ⊙ (y − b) + g ⊙ s·B A x, so it also rescales what earlier adapters added), IA3 on an attention layer
  scales it, OFT on an embedding rotates it;
- ``INPUT``: the input the base layer reads is transformed, written as a map of the base weight (x ↦ x R is
  W ↦ W Rᵀ, which also covers the patches a convolution reads): OFT, BOFT, feed-forward IA3.

A layer computes y = f(x; W') + b with W' the input-side maps applied to W (:func:`weight_map_order`), then applies
each ADD or OUTPUT adapter in active order. Within one HF PEFT tuner this is exactly PEFT's forward; across tuners
(which PEFT cannot hold on one layer) it is peftdecl's rule. A non-additive kind's ops provides
``composition(lp) -> OUTPUT | INPUT`` and, for INPUT, ``input_order``: ``"active"`` when the input passes the
adapters in active order, x ↦ x R₁ R₂ ⋯ (OFT), ``"reversed"`` when the last one acts first, x ↦ x M_k ⋯ M₁ (BOFT,
whose PEFT layer multiplies its rotations that way).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final, TypeVar, cast

from peftdecl.plan import LayerPlan

if TYPE_CHECKING:
    from peftdecl.backend import ComposingOps, KindOps

ADD: Final = "add"
OUTPUT: Final = "output"
INPUT: Final = "input"
T = TypeVar("T")
Layer = TypeVar("Layer")
Array = TypeVar("Array")


def role(ops: KindOps[Layer, Array], lp: LayerPlan) -> str:
    """ADD, OUTPUT or INPUT: how the adapter of ``lp`` (run by the kind ops ``ops``) composes with the others."""
    # any backend's layer handle and array type; a non-additive kind's ops are ComposingOps
    return ADD if ops.additive else cast("ComposingOps[Layer, Array]", ops).composition(lp)


def weight_map_order(
    entries: Iterable[T], ops_and_plan: Callable[[T], tuple[KindOps[Layer, Array], LayerPlan]]
) -> list[T]:
    """The INPUT adapters among ``entries`` (in active order) in the order their weight maps apply to W.

    An input transform T gives W' = W Tᵀ: an adapter that acts on the input after the others (T ← T R) maps W
    first, one that acts before them (T ← M T) maps it last."""
    order: deque[T] = deque()
    for entry in entries:
        ops, lp = ops_and_plan(entry)
        if role(ops, lp) == INPUT:
            if cast("ComposingOps[Layer, Array]", ops).input_order == "active":
                order.appendleft(entry)
            else:
                order.append(entry)
    return list(order)

"""Where each composing built-in kind acts when other adapters share its layer (:mod:`peftdecl.composition`):
on the output built so far, or on the input the base reads (a map of the weight). Every backend's ops take the
rule from here (``composition = staticmethod(compositions.oft)``), so the backends cannot disagree on it."""

from __future__ import annotations

from typing import Literal

from peftdecl.plan import LayerPlan

Side = Literal["output", "input"]
"""``output``: y ← φ(x, y); ``input``: the base runs on W Tᵀ."""


def dora(lp: LayerPlan) -> Side:
    """g rescales the output the other adapters built (HF PEFT's DoRA takes the running result as its base)."""
    return "output"


def boft(lp: LayerPlan) -> Side:
    """BOFT rotates the input the base reads and scales its output rows: a map of the weight."""
    return "input"


def oft(lp: LayerPlan) -> Side:
    """An embedding's rotation acts on the output built so far; any other layer's on its input."""
    return "output" if lp.layer.type == "embedding" else "input"


def ia3(lp: LayerPlan) -> Side:
    """A feed-forward vector scales the input the base reads, any other the output built so far."""
    return "input" if lp.options["feedforward"] else "output"

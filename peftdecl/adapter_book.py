"""The bookkeeping every engine shares, kept once: attached plans, the active set, merged and frozen adapters.

:class:`peftdecl.model.AdaptedModel` owns one :class:`AdapterBook` and hands it to its backend's engine at
``create``; the engine reads it (which adapters run on a layer, which are trainable) and never keeps a copy. After
the model changes the book it calls the engine's ``sync()`` so that side effects (``requires_grad``, module modes)
follow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from peftdecl.plan.ir import LayerPlan, Plan


@dataclass
class AdapterBook:
    """Adapter name -> plan, in attach order, with the state that decides which adapters run and train."""

    plans: dict[str, Plan] = field(default_factory=dict)
    active: tuple[str, ...] = ()
    """Active adapters, in the order they apply."""
    merged: list[str] = field(default_factory=list)
    """Adapters folded into the base weights, in merge order (unmerged in reverse)."""
    frozen: set[str] = field(default_factory=set)
    """Adapters loaded for inference (``is_trainable=False``): never trainable, even while active."""
    enabled: bool = True
    """False inside ``disable_adapters()``: no adapter runs."""

    def running(self) -> tuple[str, ...]:
        """Adapters whose layers take part in a forward: active, not merged, adapters enabled."""
        if not self.enabled:
            return ()
        return tuple(name for name in self.active if name not in self.merged)

    def running_on(self, module: str) -> list[tuple[str, LayerPlan]]:
        """(adapter, its plan for ``module``) of every running adapter that adapts ``module``, in active order."""
        found = []
        for name in self.running():
            for lp in self.plans[name].layers:
                if lp.module == module:
                    found.append((name, lp))
                    break
        return found

    def trainable(self, names: Sequence[str]) -> tuple[str, ...]:
        """``names`` less the frozen adapters: those whose tensors ``trainable_parameters`` lists."""
        return tuple(name for name in names if name not in self.frozen)

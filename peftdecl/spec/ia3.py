"""IA3: learned vectors that rescale a layer's output (y = l ⊙ W x) or, for feed-forward modules, its input."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from peftdecl.spec._base import ExcludeModules, SpecBase, TargetModules


class IA3Spec(SpecBase, tag="IA3", frozen=True):
    """Infused adapter: y = (W x + b) ⊙ l for attention modules, y = W (x ⊙ l) + b for feed-forward ones."""

    target_modules: TargetModules = None
    exclude_modules: ExcludeModules = None
    feedforward_modules: Annotated[
        str | tuple[str, ...] | None,
        Meta(description="Targets whose input (not output) is scaled; must be a subset of target_modules."),
    ] = None
    fan_in_fan_out: bool = False
    init_ia3_weights: Annotated[bool, Meta(description="true: l = 1 (a no-op); false: l ~ N(0, 1).")] = True

    def cross_field_problems(self) -> list[tuple[str, str]]:
        found = []
        targets, feedforward = self.target_modules, self.feedforward_modules
        if isinstance(targets, tuple) and isinstance(feedforward, tuple):
            extra = sorted(set(feedforward) - set(targets))
            if extra:
                found.append(
                    ("$.feedforward_modules", f"must be a subset of target_modules; not targeted: {extra}")
                )
        return found

"""Engine options: per-engine settings (passed to ``attach``/``load_adapter`` as ``engine_options=``), each with a
default read from an environment variable when the engine is created. Nothing here is a module-wide switch."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from peftdecl.errors import BackendError

ENV_PREFIX = "PEFTDECL_"
OptionValue = int | bool | None
"""The value of an engine option: the seed, a switch, or None for "decide by cost"."""


@dataclass(frozen=True)
class EngineOptions:
    """Settings of one engine. Each field's default comes from ``PEFTDECL_<FIELD NAME IN CAPITALS>`` when set."""

    seed: int = 0
    """Seed of the engine's own generator (dropout masks and other random draws during training)."""
    fused: bool = True
    """Use the fused LoRA paths (one autograd function per adapted layer) where a backend has them."""
    fused_merged: bool | None = None
    """Fused paths: fold the adapter into a weight copy for large token counts (None: decide by cost)."""
    half_compute: bool = True
    """Fused paths on bfloat16/float16 layers: compute the adapter in the layer dtype, as PEFT does."""
    save_shrink: bool = True
    """Fused LoRA training: keep the rank-r shrink for the backward instead of recomputing it."""

    @classmethod
    def from_env(cls, overrides: Mapping[str, object] | None = None) -> EngineOptions:
        """Defaults from the environment, then ``overrides`` (unknown names are refused, naming the known ones)."""
        values: dict[str, Any] = {}  # each field's own type, by name
        for f in fields(cls):
            raw = os.environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw.strip() != "":
                values[f.name] = _parse(f.name, raw, f.default)
        options = cls(**values)
        return options.with_changes(**dict(overrides or {}))

    def with_changes(self, **changes: Any) -> EngineOptions:
        """A copy with ``changes`` (unknown names refused)."""
        known = [f.name for f in fields(self)]
        unknown = sorted(set(changes) - set(known))
        if unknown:
            raise BackendError(f"unknown engine options {unknown}; known: {known}")
        return replace(self, **changes)


def _parse(name: str, raw: str, default: object) -> OptionValue:
    text = raw.strip().lower()
    if name == "seed":
        try:
            return int(text)
        except ValueError:
            raise BackendError(f"{ENV_PREFIX}SEED={raw!r}: expected an integer") from None
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    if text in ("auto", "none") and default is None:
        return None
    raise BackendError(f"{ENV_PREFIX}{name.upper()}={raw!r}: expected 1/0, true/false or on/off")

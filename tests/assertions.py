"""Small spec builders and contract checks shared by the backend test files (NumPy, torch, MLX)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from peftdecl.backend import AdditiveOps, ComposingOps, KindOps

PROMPT_KINDS = ("prefix_tuning", "prompt_tuning")


def lora_spec(targets: list[str], r: int, alpha: float, **fields: Any) -> dict[str, Any]:
    """A LoRA spec dictionary on ``targets`` with random (non-zero) initialisation, so the adapter changes the
    output from the start; ``fields`` add to or override it."""
    return {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": targets,
        "init_lora_weights": False,
        **fields,
    }


def layer_kinds(kinds: Iterable[str]) -> list[str]:
    """The kinds in ``kinds`` that adapt layers (every kind but the prompt-learning ones), sorted."""
    return sorted(k for k in kinds if k not in PROMPT_KINDS)


def assert_kind_ops_protocols(ops: object) -> None:
    """A backend's ops for one kind satisfy KindOps and exactly one of AdditiveOps (an additive kind, whose
    ``additive`` flag says so) and ComposingOps."""
    assert isinstance(ops, KindOps)
    assert isinstance(ops, AdditiveOps) == ops.additive
    assert isinstance(ops, ComposingOps) == (not ops.additive)

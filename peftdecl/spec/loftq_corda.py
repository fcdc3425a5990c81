"""Sub-configurations of LoRA's LoftQ and CorDA initialisations, with HF PEFT 0.21's field names and defaults:
``loftq_config`` (a plain mapping, as PEFT stores it: ``{}`` unless the initialisation is 'loftq') and
``corda_config`` (``CordaConfig``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

LOFTQ_DEFAULTS: dict[str, int] = {"loftq_bits": 4, "loftq_iter": 1}
"""PEFT's ``LoftQConfig`` fields and defaults."""


class CordaConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """CorDA: A, B from the SVD of W times the covariance of its inputs (peftdecl.preprocess_corda collects it)."""

    cache_file: Annotated[
        str | None,
        Meta(
            description="torch file of the kept singular triplets per layer: read if it exists, else written."
        ),
    ] = None
    covariance_file: Annotated[
        str | None,
        Meta(description="torch file of the input covariance per layer: read if it exists, else written."),
    ] = None
    corda_method: Annotated[
        Literal["ipm", "kpm"],
        Meta(
            description="ipm: the r largest singular triplets of W·C; kpm: the r smallest (keeps knowledge)."
        ),
    ] = "ipm"
    verbose: Annotated[bool, Meta(description="Report progress while preprocessing.")] = False
    use_float16_for_covariance: Annotated[
        bool,
        Meta(description="Accumulate the covariances in the inputs' own dtype (float16) instead of float32."),
    ] = False
    prune_temporary_fields: Annotated[
        bool,
        Meta(
            description="PEFT: drop the covariances once the triplets are computed (peftdecl never keeps them)."
        ),
    ] = True


def loftq_config_problems(init: object, config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(JSON path, message) for each problem of ``loftq_config`` given ``init_lora_weights``, as PEFT checks it:
    'loftq' needs a non-empty config, with 4 or 8 bits and at least one iteration. With another initialisation
    PEFT ignores the config (and saves ``{}``), so it is not checked."""
    if init != "loftq":
        return []
    if not config:
        return [
            (
                "$.loftq_config",
                "must be given with init_lora_weights 'loftq' (e.g. {loftq_bits: 4, loftq_iter: 1})",
            )
        ]
    found = [
        (f"$.loftq_config.{key}", f"unknown field; expected {' or '.join(LOFTQ_DEFAULTS)}")
        for key in config
        if key not in LOFTQ_DEFAULTS
    ]
    bits, iters = config.get("loftq_bits", 4), config.get("loftq_iter", 1)
    if isinstance(bits, bool) or bits not in (4, 8):
        found.append(("$.loftq_config.loftq_bits", f"must be 4 (NF4) or 8 (int8), got {bits!r}"))
    whole = isinstance(iters, int) or (isinstance(iters, float) and iters.is_integer())  # JSON: 1.0 is 1
    if isinstance(iters, bool) or not whole or iters < 1:
        found.append(("$.loftq_config.loftq_iter", f"must be a whole number >= 1, got {iters!r}"))
    return found

"""``create_arrow_model``: HF PEFT's Arrow router over a library of LoRA experts, built the way PEFT builds it.

The task experts are loaded as adapters ``task_0``, ``task_1``, ... (and, with GenKnowSub, the general adapters
as ``gks_0``, ...); they must share one rank and one set of target modules, on linear layers. The router adapter
``arrow_router`` (kind ``arrow``) then holds copies of the experts' factors stacked in task order (with GenKnowSub,
each minus the mean A and the mean B of the general adapters, as PEFT subtracts them before routing) and becomes
the active adapter. GenKnowSub changes the task adapters themselves too, as PEFT does on the router's first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from peftdecl.errors import PeftdeclError
from peftdecl.model import AdaptedModel
from peftdecl.plan.kinds.arrow import exact_prototypes
from peftdecl.spec.lora_variants_b import ArrowConfig

ROUTER = "arrow_router"
"""The router's adapter name, as in HF PEFT."""

TORCH_START = "peftdecl_numpy.torch_bridge:arrow_start_vector"
"""Where torch draws PEFT's power-iteration start vector (None without torch)."""


def create_arrow_model(
    base_model: object,
    task_specific_adapter_paths: Sequence[str | Path],
    arrow_config: ArrowConfig | dict[str, Any],
    general_adapter_paths: Sequence[str | Path] | None = None,
    *,
    backend: str | None = None,
) -> AdaptedModel:
    """Load the experts (``task_i``, ``gks_i``) onto ``base_model`` and activate an Arrow router over them."""
    from peftdecl import load_adapter

    config = arrow_config if isinstance(arrow_config, ArrowConfig) else ArrowConfig(**arrow_config)
    if not task_specific_adapter_paths:
        raise PeftdeclError("create_arrow_model needs at least one task adapter path")
    tasks = [f"task_{i}" for i in range(len(task_specific_adapter_paths))]
    general = [f"gks_{i}" for i in range(len(general_adapter_paths or ()))] if config.use_gks else []
    if config.use_gks and not general:
        raise PeftdeclError(
            "arrow_config.use_gks needs general_adapter_paths (GenKnowSub's general adapters)"
        )
    model = load_adapter(base_model, task_specific_adapter_paths[0], name=tasks[0], backend=backend)
    for name, path in zip(tasks[1:], task_specific_adapter_paths[1:], strict=True):
        model.load_adapter(path, name)
    for name, path in zip(general, general_adapter_paths or (), strict=False):
        model.load_adapter(path, name)
    modules, r = _common_layout(model, tasks + general)
    stacked = _stacked_experts(model, tasks, general, modules)
    for module in modules:
        stacked[f"{module}.arrow_prototypes"] = peft_prototypes(
            stacked[f"{module}.arrow_experts_A"], stacked[f"{module}.arrow_experts_B"], config.rng_seed
        )
    if general:
        _subtract_in_place(model, tasks, modules, stacked)
    fields = {"task_adapter_names": tasks, "gks_adapter_names": general}
    spec = {
        "peft_type": "LORA",
        "r": r,
        # PEFT targets the experts' modules by their last name component
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
        "arrow_config": {**_config_fields(config), **fields},
    }
    model.add_adapter(ROUTER, spec)
    arrays = {**model.state_dict(ROUTER), **stacked}
    model.delete_adapter(ROUTER)
    model.add_adapter(ROUTER, spec, arrays=arrays)
    model.set_adapter(ROUTER)
    return model


def _config_fields(config: ArrowConfig) -> dict[str, Any]:
    return {
        "top_k": config.top_k,
        "router_temperature": config.router_temperature,
        "use_gks": config.use_gks,
        "rng_seed": config.rng_seed,
    }


def _common_layout(model: AdaptedModel, names: list[str]) -> tuple[tuple[str, ...], int]:
    """The experts' modules and rank, which must be the same for all (PEFT's check), on linear layers only."""
    reference: tuple[tuple[str, ...], int] | None = None
    for name in names:
        plan = model.plan(name)
        if plan.kind != "lora":
            raise PeftdeclError(
                f"Arrow expert {name!r} is a {plan.kind} adapter; Arrow mixes plain LoRA experts"
            )
        for lp in plan.layers:
            if lp.layer.type not in ("linear", "gpt2_conv1d"):
                raise PeftdeclError(
                    f"Arrow expert {name!r} adapts {lp.module}, a {lp.layer.type}; only linear layers"
                )
        ranks = {lp.r for lp in plan.layers}
        if len(ranks) != 1:
            raise PeftdeclError(f"Arrow expert {name!r} has several ranks {sorted(ranks)}; Arrow needs one")
        found = (plan.targets, ranks.pop())
        if reference is not None and found != reference:
            raise PeftdeclError(
                f"Arrow expert {name!r} adapts {list(found[0])} at rank {found[1]}, the first expert "
                f"{list(reference[0])} at rank {reference[1]}; Arrow needs the same modules and rank"
            )
        reference = found
    assert reference is not None
    return reference


def _stacked_experts(
    model: AdaptedModel, tasks: list[str], general: list[str], modules: tuple[str, ...]
) -> dict[str, np.ndarray]:
    """Per module: arrow_experts_A [E, r, in], _B [E, out, r] (minus the general adapters' means) and _scaling."""
    states = {name: model.state_dict(name) for name in tasks + general}
    out: dict[str, np.ndarray] = {}
    for module in modules:
        factors = {
            part: {n: np.asarray(states[n][f"{module}.lora_{part}.weight"]) for n in tasks + general}
            for part in "AB"
        }
        for part in "AB":
            stack = np.stack([factors[part][n] for n in tasks])
            if general:
                stack = stack - np.mean([factors[part][n] for n in general], axis=0)
            out[f"{module}.arrow_experts_{part}"] = stack
        scales = [model.plan(n).layer(module).scaling for n in tasks]
        out[f"{module}.arrow_experts_scaling"] = np.asarray(scales, dtype=np.float64)
    return out


def peft_prototypes(a: np.ndarray, b: np.ndarray, rng_seed: int | None) -> np.ndarray:
    """[E, in]: each expert's prototype as PEFT computes it: 15 float32 power iterations v ← Aᵀ(BᵀB)(A v) / ‖·‖
    from one start vector, torch's ``randn`` of a generator seeded with ``rng_seed`` (NumPy's where torch is
    missing); without a seed PEFT starts from torch's global generator, so here the exact top right singular
    vector, the iteration's limit, stands in."""
    if rng_seed is None:
        return exact_prototypes(a, b)
    start = _start_vector(int(rng_seed), a.shape[-1])
    found = []
    for a_e, b_e in zip(np.asarray(a, np.float32), np.asarray(b, np.float32), strict=True):
        gram = b_e.T @ b_e
        v = start / (np.linalg.norm(start) + 1e-8)
        for _ in range(15):
            w = a_e.T @ (gram @ (a_e @ v))
            v = w / (np.linalg.norm(w) + 1e-8)
        found.append(v)
    return np.stack(found).astype(np.float64)


def _start_vector(seed: int, size: int) -> np.ndarray:
    """PEFT's draw where torch is there to make it (:data:`TORCH_START`, resolved by name: the core never imports
    torch), else NumPy's standard normal from the same seed."""
    module, _, name = TORCH_START.partition(":")
    try:
        via_torch = getattr(importlib.import_module(module), name)(seed, size)
    except ImportError:
        via_torch = None
    if via_torch is not None:
        found: np.ndarray = via_torch
        return found
    return np.random.default_rng(seed).standard_normal(size).astype(np.float32)


def _subtract_in_place(
    model: AdaptedModel, tasks: list[str], modules: tuple[str, ...], stacked: dict[str, np.ndarray]
) -> None:
    """GenKnowSub changes the task adapters themselves, as PEFT does (before the router's first use): each takes
    its row of the router's stack, and stays frozen."""
    for index, name in enumerate(tasks):
        arrays = model.state_dict(name)
        for module in modules:
            for part in "AB":
                arrays[f"{module}.lora_{part}.weight"] = stacked[f"{module}.arrow_experts_{part}"][index]
        spec = model.spec(name)
        model.delete_adapter(name)
        model.add_adapter(name, spec, arrays=arrays)
        model.set_requires_grad(name, False)

"""Deterministic initialisation: the same plan and seed give the same float64 numbers on every backend.

Each tensor draws from its own generator, seeded by ``(seed, crc32(key))``, so the values of one tensor do not
depend on which other tensors exist or on their order.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping

import numpy as np

from peftdecl.plan.ir import Init, LayerPlan, ParamSpec, Plan

ExternalInit = Callable[[str, ParamSpec, Mapping[str, np.ndarray]], np.ndarray]
"""Supplies a tensor whose rule is ``external`` (values that depend on the base model, e.g. DoRA's magnitude),
given its key, its spec and every non-external tensor already drawn."""

BaseDependentInit = Callable[[np.ndarray, LayerPlan, Mapping[str, np.ndarray]], np.ndarray]
EXTERNAL_SOURCES: dict[str, BaseDependentInit] = {}
"""``Init("external", source=NAME)`` -> f(base weight in IR layout, layer plan, the layer's tensors by name)."""


def register_external_source(name: str, fn: BaseDependentInit) -> None:
    """Declare how an ``external`` initialiser is computed from the base weight (done by layout modules)."""
    EXTERNAL_SOURCES[name] = fn


def generator_for(seed: int, key: str) -> np.random.Generator:
    """The generator that initialises the tensor ``key``."""
    return np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])


def init_tensor(init: Init, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Draw one tensor in float64 following ``init``."""
    rule = init.rule
    if rule == "zeros":
        return np.zeros(shape)
    if rule == "ones":
        return np.ones(shape)
    if rule == "constant":
        return np.full(shape, float(init.arg("value")))
    if rule == "normal":
        return rng.normal(float(init.arg("mean", 0.0)), float(init.arg("std", 1.0)), size=shape)
    if rule == "uniform":
        return rng.uniform(float(init.arg("low")), float(init.arg("high")), size=shape)
    if rule == "kaiming_uniform":
        # torch's kaiming_uniform_ with leaky-relu gain: bound = sqrt(6 / ((1 + a²) · fan_in))
        a, fan_in = float(init.arg("a", 0.0)), int(init.arg("fan_in"))
        bound = math.sqrt(6.0 / ((1.0 + a * a) * fan_in))
        return rng.uniform(-bound, bound, size=shape)
    raise ValueError(f"no initialiser for rule {rule!r}")


def init_params(
    plan: Plan, seed: int = 0, external: ExternalInit | None = None
) -> dict[str, np.ndarray]:
    """Full key -> float64 array for every tensor of ``plan``."""
    arrays: dict[str, np.ndarray] = {}
    specs = plan.param_specs()
    for key, spec in specs.items():
        if spec.init.rule != "external":
            arrays[key] = init_tensor(spec.init, spec.shape, generator_for(seed, key))
    for key, spec in specs.items():
        if spec.init.rule == "external":
            if external is None:
                raise ValueError(f"{key} needs values from the base model ({spec.init.arg('source')})")
            value = np.asarray(external(key, spec, arrays), dtype=np.float64)
            if value.shape != spec.shape:
                raise ValueError(f"{key}: initialiser produced shape {value.shape}, expected {spec.shape}")
            arrays[key] = value
    return {key: arrays[key] for key in specs}


def check_arrays(plan: Plan, arrays: Mapping[str, np.ndarray], origin: str = "adapter") -> None:
    """Every tensor of ``plan`` is present with its planned shape, and nothing else is."""
    from peftdecl.errors import AdapterFileError

    expected = plan.param_specs()
    arrays = {k: v for k, v in arrays.items() if not any(k.startswith(m + ".") for m in plan.modules_to_save)}
    missing = [k for k in expected if k not in arrays]
    unexpected = [k for k in arrays if k not in expected]
    problems = [f"missing tensor {k} (expected shape {list(expected[k].shape)})" for k in missing[:10]]
    problems += [f"unexpected tensor {k}" for k in unexpected[:10]]
    for key, spec in expected.items():
        if key in arrays and tuple(np.shape(arrays[key])) != spec.shape:
            problems.append(f"tensor {key} has shape {list(np.shape(arrays[key]))}, expected {list(spec.shape)}")
    if problems:
        raise AdapterFileError(f"{origin}: " + "; ".join(problems))

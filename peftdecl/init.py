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


SharedDependentInit = Callable[[Callable[[str], np.ndarray], ParamSpec, np.random.Generator], np.ndarray]
SHARED_SOURCES: dict[str, SharedDependentInit] = {}
"""``Init("external", source=NAME)`` on a shared tensor -> f(base_weight_of, spec, rng), where
``base_weight_of(module)`` gives a base weight in the IR layout and ``rng`` is the tensor's own seeded
generator (prompt tuning's table drawn from the word embeddings)."""


def register_shared_source(name: str, fn: SharedDependentInit) -> None:
    """Declare how a shared ``external`` tensor is computed from base weights (done by layout modules)."""
    SHARED_SOURCES[name] = fn


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
    if rule == "torch_cpu_uniform":
        seed, offset, bound = int(init.arg("seed")), int(init.arg("offset", 0)), float(init.arg("bound"))
        return torch_cpu_uniform(seed, offset, bound, shape)
    raise ValueError(f"no initialiser for rule {rule!r}")


def torch_cpu_uniform(seed: int, offset: int, bound: float, shape: tuple[int, ...]) -> np.ndarray:
    """float32 numbers in [-bound, bound) as ``torch.empty(shape).uniform_(-bound, bound, generator=g)`` draws
    them after ``offset`` earlier draws from ``g = torch.Generator("cpu").manual_seed(seed)``.

    torch's CPU generator is MT19937 seeded with the seed's low 32 bits (the classic ``init_genrand``, as
    NumPy's legacy seeding); each value takes the low 24 bits of one 32-bit word, u = bits·2⁻²⁴, and returns
    lo + u·(hi − lo) in float32. torch's AVX2/AVX-512 kernels round that once (a fused multiply-add); for a
    symmetric range u·(hi − lo) + lo is an integer multiple of 2^e below 2⁴⁷, exact in float64, so one
    rounding to float32 reproduces it bit for bit. (torch's non-FMA ``DEFAULT`` kernel rounds twice and can
    differ by one float32 ulp.)
    """
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"torch_cpu_uniform: seed {seed} is outside torch's 64-bit seed range")
    state = np.random.RandomState(seed & 0xFFFFFFFF).get_state(legacy=False)
    bits = np.random.MT19937(0)  # its state is replaced below
    bits.state = {"bit_generator": "MT19937", "state": state["state"]}
    if offset:
        bits.random_raw(offset)
    count = math.prod(shape)
    raw = bits.random_raw(count) if count else np.zeros(0, dtype=np.uint64)
    hi = np.float32(bound)
    lo = -hi
    span = np.float64(np.float32(hi - lo))  # torch forms (to - from) in float32
    u = (raw & 0xFFFFFF).astype(np.float64) * 2.0**-24
    values: np.ndarray = (u * span + np.float64(lo)).astype(np.float32).astype(np.float64).reshape(shape)
    return values


def init_params(plan: Plan, seed: int = 0, external: ExternalInit | None = None) -> dict[str, np.ndarray]:
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
    """Every tensor of ``plan`` is present with its planned shape, holds real floating-point numbers, all finite
    (a NaN or infinite adapter value makes every output it touches NaN), and nothing else is present."""
    from peftdecl.errors import AdapterFileError

    expected = plan.param_specs()
    arrays = {k: v for k, v in arrays.items() if not any(k.startswith(m + ".") for m in plan.modules_to_save)}
    missing = [k for k in expected if k not in arrays]
    unexpected = [k for k in arrays if k not in expected]
    problems = [f"missing tensor {k} (expected shape {list(expected[k].shape)})" for k in missing[:10]]
    problems += [f"unexpected tensor {k}" for k in unexpected[:10]]
    for key, spec in expected.items():
        if key not in arrays:
            continue
        value = np.asarray(arrays[key])
        if tuple(value.shape) != spec.shape:
            problems.append(f"tensor {key} has shape {list(value.shape)}, expected {list(spec.shape)}")
        elif value.dtype.kind != "f":
            problems.append(f"tensor {key} has dtype {value.dtype}, expected a floating-point dtype")
        elif not np.isfinite(value).all():
            bad = int(value.size - np.count_nonzero(np.isfinite(value)))
            problems.append(f"tensor {key} has {bad} NaN or infinite value{'s' if bad > 1 else ''}")
        if len(problems) >= 20:
            break
    if problems:
        raise AdapterFileError(f"{origin}: " + "; ".join(problems))

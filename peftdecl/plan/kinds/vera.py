"""VeRA layout: per layer λ_d ∈ R^r and λ_b ∈ R^out train; A ∈ R^{r×max_in} and B ∈ R^{max_out×r} are
frozen and shared by every layer.

A and B are drawn as HF PEFT draws them: one ``torch.Generator("cpu").manual_seed(projection_prng_key)``
stream, A first, then B, each uniform in ±√3·√2/√fan_in (fan_in = max_in for A, r for B). peftdecl replays
that stream in NumPy (``Init("torch_cpu_uniform")``), so a fresh adapter starts from PEFT's projections.

Several VeRA adapters on one model: HF PEFT gives every later adapter the *first* adapter's projections, so it
requires the same ``projection_prng_key`` and ``save_projection`` (:func:`check_family`) and ranks and layer
shapes no larger than the first's; a later adapter's A and B are the first's cut to its size
(:func:`inherit_projections`, applied by the model when it attaches one). A PEFT file holding larger
(first-adapter) projections is cut to this adapter's size on load, keeping exactly the block the forward uses.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence

import numpy as np

from peftdecl._json import JsonObject
from peftdecl.errors import AdapterFileError, PeftdeclError
from peftdecl.plan.ir import Init, LayerInfo, LayerPlan, ModelInfo, ParamSpec, Plan
from peftdecl.plan.kinds import KindLayout
from peftdecl.spec.vera import VeraSpec

ProjectionSource = Callable[[int, int, int, int], "tuple[np.ndarray, np.ndarray] | None"]
"""(projection_prng_key, r, max_in, max_out) -> (A, B) as HF PEFT's torch generator gives them, or None."""

_PROJECTION_SOURCES: list[ProjectionSource | str] = ["peftdecl_numpy.torch_bridge:vera_projections"]
"""Ways to regenerate PEFT's projections bit for bit, tried in order: callables, or ``"module:function"`` names
imported when first needed (the built-in one draws with torch when torch is installed, whichever backend runs)."""


def register_projection_source(fn: ProjectionSource) -> None:
    """Offer another way to regenerate PEFT's projections bit for bit."""
    if fn not in _PROJECTION_SOURCES:
        _PROJECTION_SOURCES.append(fn)


def _resolved(source: ProjectionSource | str) -> ProjectionSource | None:
    if not isinstance(source, str):
        return source
    module, _, name = source.partition(":")
    try:
        found: ProjectionSource = getattr(importlib.import_module(module), name)
    except ImportError:
        return None
    return found


def kaiming_bound(fan_in: int) -> float:
    """PEFT's projection bound, evaluated in its order of operations so the float32 bound is identical."""
    std = math.sqrt(2) / math.sqrt(fan_in)
    return math.sqrt(3.0) * std


def projection_shapes(plan: Plan) -> tuple[int, int, int]:
    """(r, max_in, max_out) over the plan's layers."""
    r = plan.spec.r  # type: ignore[attr-defined]
    max_in = max(lp.layer.in_features for lp in plan.layers)
    return r, max_in, max(lp.layer.out_features for lp in plan.layers)


def check_family(first_name: str, first: Plan, plan: Plan) -> None:
    """Refuse a VeRA adapter that cannot share the model's projections with the first VeRA adapter ``first``, as
    HF PEFT refuses it: every VeRA adapter of a model has the same ``projection_prng_key`` and ``save_projection``."""
    for field in ("projection_prng_key", "save_projection"):
        theirs, ours = getattr(first.spec, field), getattr(plan.spec, field)
        if theirs != ours:
            raise PeftdeclError(
                f"{field}: VeRA adapters on one model share their projections, so it must equal the first VeRA "
                f"adapter's ({first_name!r} has {theirs!r}), got {ours!r}"
            )


def inherit_projections(
    first_name: str, first_arrays: dict[str, np.ndarray], plan: Plan, arrays: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """``arrays`` with this plan's A and B cut from the first VeRA adapter's (HF PEFT hands every later adapter
    the first one's projections and slices them in the forward), or an error where they are too small for it."""
    a, b = np.asarray(first_arrays["vera_A"]), np.asarray(first_arrays["vera_B"])
    shapes = {spec.name: spec.shape for spec in plan.shared}
    r, max_in = shapes["vera_A"]
    max_out = shapes["vera_B"][0]
    if r > a.shape[0] or max_in > a.shape[1] or max_out > b.shape[0]:
        raise PeftdeclError(
            f"r={r} with layers up to {max_in} inputs and {max_out} outputs: the first VeRA adapter ({first_name!r}) "
            f"made projections of r={a.shape[0]}, {a.shape[1]} inputs and {b.shape[0]} outputs, which every later "
            "VeRA adapter shares (as in HF PEFT); add the adapter with the largest rank and layers first"
        )
    return {**arrays, "vera_A": a[:r, :max_in], "vera_B": b[:max_out, :r]}


def build_vera_layer(spec: VeraSpec, module: str, layer: LayerInfo, info: ModelInfo) -> LayerPlan:
    """λ_b = 0 and λ_d = d_initial (a no-op); with ``init_weights=False`` λ_b = 1 and λ_d ~ N(0, 1)."""
    if spec.init_weights:
        b_init, d_init = Init("zeros"), Init("constant", value=spec.d_initial)
    else:
        b_init, d_init = Init("ones"), Init("normal", std=1.0)
    return LayerPlan(
        module=module,
        layer=layer,
        kind="vera",
        params=(
            ParamSpec("vera_lambda_b", (layer.out_features,), "trainable", b_init),
            ParamSpec("vera_lambda_d", (spec.r,), "trainable", d_init),
        ),
        r=spec.r,
        scaling=1.0,
        options={"dropout": spec.vera_dropout, "fan_in_fan_out": layer.type == "gpt2_conv1d"},
    )


def build_vera_shared(spec: VeraSpec, layers: Sequence[LayerPlan], info: ModelInfo) -> tuple[ParamSpec, ...]:
    """The shared projections, sized by the largest targeted layer."""
    r = spec.r
    max_in = max(lp.layer.in_features for lp in layers)
    max_out = max(lp.layer.out_features for lp in layers)
    key = spec.projection_prng_key
    return (
        ParamSpec(
            "vera_A", (r, max_in), "shared", Init("torch_cpu_uniform", seed=key, bound=kaiming_bound(max_in))
        ),
        ParamSpec(
            "vera_B",
            (max_out, r),
            "shared",
            Init("torch_cpu_uniform", seed=key, offset=r * max_in, bound=kaiming_bound(r)),
        ),
    )


def vera_to_file(plan: Plan, arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], JsonObject]:
    """Drop the projections when ``save_projection`` is false; record fan_in_fan_out as PEFT rewrites it."""
    if not plan.spec.save_projection:  # type: ignore[attr-defined]
        arrays = {k: v for k, v in arrays.items() if k not in ("vera_A", "vera_B")}
    # PEFT overwrites the config's fan_in_fan_out per wrapped layer (True on GPT-2 Conv1D, False on Linear);
    # the last wrapped layer's value is the one it saves.
    return arrays, {"fan_in_fan_out": plan.layers[-1].layer.type == "gpt2_conv1d"}


def vera_from_file(plan: Plan, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Projections from the file (cut to this adapter's size) or, if they were not saved, regenerated."""
    r, max_in, max_out = projection_shapes(plan)
    spec = plan.spec
    have = [k for k in ("vera_A", "vera_B") if k in arrays]
    if len(have) == 2:
        a, b = np.asarray(arrays["vera_A"]), np.asarray(arrays["vera_B"])
        if (
            a.ndim == b.ndim == 2
            and a.shape[0] >= r
            and a.shape[1] >= max_in
            and b.shape[0] >= max_out
            and b.shape[1] >= r
        ):
            return {**arrays, "vera_A": a[:r, :max_in], "vera_B": b[:max_out, :r]}
        return arrays  # check_arrays reports the shape mismatch
    if len(have) == 1:
        raise AdapterFileError(f"the file has base_model.{have[0]} but not its partner projection")
    if spec.save_projection:  # type: ignore[attr-defined]
        raise AdapterFileError(
            "the config says save_projection=true but the file holds no base_model.vera_A / base_model.vera_B"
        )
    key = spec.projection_prng_key  # type: ignore[attr-defined]
    for source in _PROJECTION_SOURCES:
        fn = _resolved(source)
        found = None if fn is None else fn(key, r, max_in, max_out)
        if found is not None:
            return {**arrays, "vera_A": found[0], "vera_B": found[1]}
    raise AdapterFileError(
        "the adapter was saved with save_projection=false, so the file holds no shared projections "
        f"(base_model.vera_A [{r}, {max_in}], base_model.vera_B [{max_out}, {r}]); HF PEFT regenerates "
        f"them with torch's CPU generator (torch.Generator('cpu').manual_seed({key})), which needs torch: "
        "install torch, or re-save the adapter from PEFT with save_projection=True"
    )


LAYOUT = KindLayout(
    kind="vera",
    build_layer=build_vera_layer,
    build_shared=build_vera_shared,
    to_file=vera_to_file,
    from_file=vera_from_file,
)

"""LoRA initialisations that read the base weight: PiSSA, its randomised form, OLoRA and orthogonal.

With W the base weight (out × in, float64) and s the layer's scale, as HF PEFT 0.21 computes them:

- ``pissa``: W = U S Vᵀ (thin SVD); A = diag(√(S_r/s)) V_rᵀ, B = U_r diag(√(S_r/s)); W ← W − s·B A.
- ``pissa_niter_K``: the same from the randomised SVD of Halko et al. (Alg. 5.1) with K subspace iterations.
- ``olora``: W = Q R (QR); A = R[:r], B = Q[:, :r]; W ← W − s·B A.
- ``orthogonal``: Q from the QR of an r × r Gaussian; A = (X₁ Q_odd)ᵀ / 10, B = X₂ᵀ Q_even / 10 with Gaussian X₁
  (in × r/2), X₂ (r/2 × out), so B A = 0 (the rows of Q are orthonormal) and W is left alone.

PiSSA and OLoRA keep the model's function (W − s·BA + s·BA = W); the caller writes the residual W back. As in PEFT,
an embedding layer keeps LoRA's default embedding initialisation (A = 0, B ~ N(0, 1)) and its weight. With DoRA,
m = ‖W + s·BA‖ per row is taken after the new W, A and B (PEFT initialises the variant after the factors).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import numpy as np

from peftdecl.errors import TargetError
from peftdecl.init import EXTERNAL_SOURCES, generator_for
from peftdecl.lora_variants_init import kasa_truncated_bases
from peftdecl.plan.ir import LayerPlan, Plan

BASE_MODIFYING = ("pissa", "olora", "corda", "lora_ga")
"""Initialisations that replace the base weight by its residual W − s·BA."""


def weight_init_name(plan: Plan) -> str | None:
    """The plan's base-reading LoRA initialisation (``pissa``, ``pissa_niter_K``, ``olora``, ``orthogonal``), or
    None when its initial values come from the plan's own rules."""
    if plan.kind not in ("lora", "dora"):
        return None
    init = getattr(plan.spec, "init_lora_weights", True)
    if not isinstance(init, str):
        return None
    if init in ("pissa", "olora", "orthogonal", "loftq", "corda", "eva", "lora_ga"):
        return init
    if pissa_iterations(init) is not None:
        return init
    return None


def pissa_iterations(init: str) -> int | None:
    """K of ``pissa_niter_K`` (a non-negative integer), else None."""
    found = re.fullmatch(r"pissa_niter_([0-9]+)", init)
    return int(found.group(1)) if found else None


def check_weight_init_layer(init: str, layer: LayerPlan) -> None:
    """Refuse a layer the initialisation does not work on: HF PEFT refuses convolutions ("Unknown
    initialization"), and OLoRA's QR of a GPT-2 Conv1D weight ([in, out]) gives A and B of the wrong shapes."""
    info = layer.layer
    allowed = ("linear",) if init == "olora" else ("linear", "gpt2_conv1d")
    if info.type not in (*allowed, "embedding"):
        raise TargetError(
            f"{layer.module}: init_lora_weights={init!r} works on {' and '.join(allowed)} layers (and leaves "
            f"embeddings at LoRA's default), not on this {info.type} layer"
        )
    if init != "orthogonal" and info.quantization is not None:
        raise TargetError(
            f"{layer.module}: init_lora_weights={init!r} on a quantised ({info.quantization}) base is not supported "
            "by peftdecl; initialise on the float model, then quantise the residual"
        )
    if init == "orthogonal" and layer.r % 2:
        raise TargetError(
            f"{layer.module}: init_lora_weights='orthogonal' needs an even rank, got r={layer.r}"
        )
    if layer.options.get("lora_bias"):
        raise TargetError(f"{layer.module}: init_lora_weights={init!r} cannot be combined with lora_bias")


def randomized_svd(
    matrix: np.ndarray, q: int, niter: int, random_matrix: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """U (m × q), S (q), V (n × q) with matrix ≈ U diag(S) Vᵀ, by the randomised range finder with ``niter``
    subspace iterations (torch.svd_lowrank's steps); ``random_matrix`` is the Gaussian test matrix, shape
    (min(m, n)-side: columns of the tall orientation, q)."""
    tall = matrix.shape[0] >= matrix.shape[1]
    a = matrix if tall else matrix.T
    q_basis = np.linalg.qr(a @ random_matrix)[0]
    for _ in range(niter):
        q_basis = np.linalg.qr(a.T @ q_basis)[0]
        q_basis = np.linalg.qr(a @ q_basis)[0]
    u, s, vh = np.linalg.svd(q_basis.T @ a, full_matrices=False)
    u, v = q_basis @ u, vh.T
    return (u, s, v) if tall else (v, s, u)


def pissa_factors(
    weight: np.ndarray,
    r: int,
    scaling: float,
    niter: int | None = None,
    random_matrix: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A (r × in) and B (out × r) of PiSSA: the top-r singular triplets, each √(S/s) split between A and B.
    ``niter`` None: the exact SVD; else the randomised one with that many iterations on ``random_matrix``."""
    if niter is None:
        u, s, vh = np.linalg.svd(weight, full_matrices=False)
        u_r, s_r, vh_r = u[:, :r], s[:r], vh[:r]
    else:
        if random_matrix is None:
            raise ValueError("the randomised SVD needs its Gaussian test matrix")
        u_r, s_r, v_r = randomized_svd(weight, r, niter, random_matrix)
        vh_r = v_r.T
    root = np.sqrt(s_r / scaling)
    return root[:, None] * vh_r, u_r * root[None, :]


def olora_factors(weight: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """A = R[:r] (r × in) and B = Q[:, :r] (out × r) of the reduced QR of W (Householder, LAPACK's signs)."""
    q, upper = np.linalg.qr(weight)
    return upper[:r], q[:, :r]


def orthogonal_factors(
    in_features: int, out_features: int, r: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A (r × in) and B (out × r) whose product is zero: halves of one random orthogonal r × r matrix."""
    q = np.linalg.qr(rng.standard_normal((r, r)))[0]
    a = (rng.standard_normal((in_features, r // 2)) @ q[0::2]).T / 10.0
    b = rng.standard_normal((r // 2, out_features)).T @ q[1::2] / 10.0
    return a, b


def weight_initialised(
    plan: Plan,
    values: Mapping[str, np.ndarray],
    base_weight: Callable[[str], np.ndarray],
    seed: int = 0,
    model: object = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``values`` with each layer's ``lora_A/B.weight`` replaced as the plan's initialisation asks, and the new base
    weights (``<module>.weight`` in the IR layout, float64) for the initialisations that change them. ``model``:
    the base model, whose preprocessed data (:mod:`peftdecl.inits`) the data-driven initialisations read."""
    init = weight_init_name(plan)
    if init in ("loftq", "corda"):
        from peftdecl.inits import apply  # here: peftdecl.inits.apply imports this module

        if init == "loftq":
            return apply.loftq_initialised(plan, values, base_weight)
        return apply.corda_initialised(plan, values, base_weight, model)
    if init == "eva":  # B = 0 by the plan's rules until initialize_lora_eva_weights sets A and the ranks
        from peftdecl.inits.eva import check_eva_layers

        check_eva_layers(plan)
        return dict(values), {}
    if init == "lora_ga":
        from peftdecl.inits.lora_ga import lora_ga_initialised

        return lora_ga_initialised(plan, values, base_weight, seed, model)
    out = dict(values)
    bases: dict[str, np.ndarray] = {}
    if init is None:
        return out, kasa_truncated_bases(plan, base_weight)  # KaSA drops W's r smallest singular components
    for layer in plan.layers:
        check_weight_init_layer(init, layer)
    for layer in plan.layers:
        if layer.layer.type == "embedding":
            continue  # PEFT gives an embedding its usual A = 0, B ~ N(0, 1) whatever the init says
        a_key, b_key = layer.key("lora_A.weight"), layer.key("lora_B.weight")
        info = layer.layer
        weight = np.asarray(base_weight(layer.module), dtype=np.float64)
        if init == "orthogonal":
            rng = generator_for(seed, layer.key("orthogonal"))
            out[a_key], out[b_key] = orthogonal_factors(info.in_features, info.out_features, layer.r, rng)
            _redraw_base_dependent(layer, weight, out)
            continue
        if init == "olora":
            a, b = olora_factors(weight, layer.r)
        else:
            niter = pissa_iterations(init)
            random_matrix = None
            if niter is not None:
                rng = generator_for(seed, layer.key("pissa_test_matrix"))
                random_matrix = rng.standard_normal((min(weight.shape), layer.r))
            a, b = pissa_factors(weight, layer.r, layer.scaling, niter, random_matrix)
        out[a_key], out[b_key] = a, b
        bases[f"{layer.module}.weight"] = weight - layer.scaling * (b @ a)
        _redraw_base_dependent(layer, bases[f"{layer.module}.weight"], out)
    return out, bases


def _redraw_base_dependent(layer: LayerPlan, weight: np.ndarray, values: dict[str, np.ndarray]) -> None:
    """Recompute the layer's base-dependent tensors (DoRA's m = ‖W + s·BA‖ per row) from the new W, A and B, as
    PEFT initialises the variant after the LoRA factors."""
    own = {p.name: values[layer.key(p.name)] for p in layer.params if layer.key(p.name) in values}
    for param in layer.params:
        if param.init.rule == "external":
            source = str(param.init.arg("source"))
            if source not in EXTERNAL_SOURCES:
                raise TargetError(f"{layer.key(param.name)}: no initialiser registered for source {source!r}")
            values[layer.key(param.name)] = np.asarray(EXTERNAL_SOURCES[source](weight, layer, own))


def plain_lora_conversion(
    plan: Plan, arrays: Mapping[str, np.ndarray], initial: Mapping[str, np.ndarray]
) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    """A trained PiSSA / OLoRA adapter as a plain LoRA on the *original* base (PEFT's
    ``path_initial_model_for_weight_conversion``): ΔW = s·(B A − B₀ A₀) = s·[B, −B₀][A; A₀], rank 2r.

    ``arrays``: the adapter's tensors now, ``initial``: the same adapter's tensors at initialisation (IR keys).
    Returns the spec changes (init true; r, rank_pattern, alpha_pattern doubled; lora_alpha doubled, or × √2 with
    rsLoRA, so that s stays the same) and the rank-2r tensors."""
    spec = plan.spec
    if plan.kind != "lora":
        raise TargetError(f"converting to plain LoRA needs a LoRA adapter, not {plan.kind}")
    init = getattr(spec, "init_lora_weights", True)
    if init == "loftq" or init is False:
        # the difference from the initial factors is the trained update only where the model started at its
        # base: LoftQ starts at Q + BA and init false at W + BA (HF PEFT warns and writes a wrong adapter)
        raise TargetError(
            f"init_lora_weights={init!r}: this adapter cannot be converted to a plain LoRA of the original base "
            "(its initial model was not the base); save it without path_initial_model_for_weight_conversion"
        )
    rank_pattern = dict(getattr(spec, "rank_pattern", None) or {})
    alpha_pattern = dict(getattr(spec, "alpha_pattern", None) or {})
    rslora = bool(getattr(spec, "use_rslora", False))
    if rslora and (rank_pattern or alpha_pattern):
        raise TargetError(
            "converting to plain LoRA with use_rslora cannot keep rank_pattern or alpha_pattern"
        )
    converted: dict[str, np.ndarray] = {}
    for layer in plan.layers:
        if layer.layer.type == "embedding":
            raise TargetError(
                f"{layer.module}: converting an embedding's LoRA to plain LoRA is not supported"
            )
        a_key, b_key = layer.key("lora_A.weight"), layer.key("lora_B.weight")
        converted[a_key] = np.concatenate([np.asarray(arrays[a_key]), np.asarray(initial[a_key])], axis=0)
        converted[b_key] = np.concatenate([np.asarray(arrays[b_key]), -np.asarray(initial[b_key])], axis=1)
    lora_alpha = float(getattr(spec, "lora_alpha", 8))
    changes: dict[str, object] = {
        "init_lora_weights": True,
        "r": 2 * int(getattr(spec, "r", 8)),
        "lora_alpha": lora_alpha * 2**0.5 if rslora else 2 * lora_alpha,
        "rank_pattern": {key: 2 * value for key, value in rank_pattern.items()},
        "alpha_pattern": {key: 2 * value for key, value in alpha_pattern.items()},
    }
    return changes, converted

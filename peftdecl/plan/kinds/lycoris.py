"""LoHa and LoKr layouts (LyCORIS): ΔW = ((w1a w1b) ⊙ (w2a w2b)) · alpha/r and ΔW = kron(w1, w2) · alpha/r.

Both work on ``[out, in/groups · kernel]``; a convolution kernel is either flattened into the input axis
or, with ``use_effective_conv2d`` and a kernel larger than 1, kept in a CP core (``hada_t1``/``hada_t2``,
``lokr_t2``).
"""

from __future__ import annotations

import math

from peftdecl.errors import TargetError
from peftdecl.plan.ir import Init, LayerInfo, LayerPlan, ModelInfo, ParamSpec
from peftdecl.plan.kinds import KindLayout
from peftdecl.plan.kinds.lora import KAIMING_A, rank_and_alpha
from peftdecl.spec.lycoris import LoHaSpec, LoKrSpec, LycorisSpec

ZEROS = Init("zeros")


def kaiming(shape: tuple[int, ...]) -> Init:
    """torch's ``kaiming_uniform_(t, a=√5)``, whose fan-in is ``size(1) · prod(size[2:])`` for any tensor."""
    return Init("kaiming_uniform", fan_in=shape[1] * math.prod(shape[2:]), a=KAIMING_A)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS's split of ``dimension`` into (m, n), m·n = dimension.

    ``factor`` > 0 that divides ``dimension`` gives (factor, dimension/factor) as is (m may exceed n);
    otherwise the divisor pair nearest √dimension, with m no larger than ``factor`` when one is given, m ≤ n.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    cap = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        next_m = m + 1
        while dimension % next_m != 0:
            next_m += 1
        next_n = dimension // next_m
        # the divisor walk stops once the pair stops getting closer (m + n grows) or m passes the cap
        if next_m + next_n > m + n or next_m > cap:
            break
        m, n = next_m, next_n
    return (n, m) if m > n else (m, n)


def _effective(spec: LycorisSpec, layer: LayerInfo) -> bool:
    # PEFT silently uses the flattened form for 1x1 / size-1 kernels even when the CP form was asked for
    return bool(spec.use_effective_conv2d) and layer.is_conv and layer.kernel_numel > 1


def _core_kernel(layer: LayerInfo) -> tuple[int, ...]:
    # a Conv1d's CP core is stored as [r, r, k, 1] so that the 2-d rebuild applies unchanged
    return tuple(layer.kernel_size) if layer.type == "conv2d" else (layer.kernel_size[0], 1)


def _check_layer(module: str, layer: LayerInfo) -> None:
    # compile_plan has already refused layer types the kind does not declare
    if layer.is_conv and layer.in_features % layer.groups != 0:
        raise TargetError(
            f"{module}: in_channels {layer.in_features} is not divisible by groups {layer.groups}"
        )


def _rank_alpha(spec: LycorisSpec, module: str) -> tuple[int, float]:
    r, alpha = rank_and_alpha(spec, module, alpha_field="alpha")
    if r < 1:
        raise TargetError(f"{module}: rank_pattern gives r = {r}; a rank must be a positive integer")
    return r, float(alpha)


def _options(spec: LycorisSpec, effective: bool, **extra: object) -> dict[str, object]:
    return {
        "rank_dropout": spec.rank_dropout,
        "module_dropout": spec.module_dropout,
        "effective_conv": effective,
        **extra,
    }


# -- LoHa ----------------------------------------------------------------------------------------------------
def loha_params(spec: LoHaSpec, layer: LayerInfo, r: int) -> tuple[ParamSpec, ...]:
    """hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b (and the CP cores hada_t1, hada_t2) with PEFT's inits."""
    out, in_g = layer.out_features, layer.in_features // layer.groups
    if _effective(spec, layer):
        core = (r, r, *_core_kernel(layer))
        a_shape, b_shape = (r, out), (r, in_g)
    else:
        core = None
        a_shape, b_shape = (out, r), (r, in_g * layer.kernel_numel)
    # default init zeroes w2_b only, so ΔW = (w1a w1b) ⊙ 0 = 0 while every other factor gets a gradient
    w2b_init = kaiming(b_shape) if spec.init_weights is False else ZEROS
    params = [
        ParamSpec("hada_w1_a", a_shape, "trainable", kaiming(a_shape)),
        ParamSpec("hada_w1_b", b_shape, "trainable", kaiming(b_shape)),
        ParamSpec("hada_w2_a", a_shape, "trainable", kaiming(a_shape)),
        ParamSpec("hada_w2_b", b_shape, "trainable", w2b_init),
    ]
    if core is not None:
        params += [
            ParamSpec("hada_t1", core, "trainable", kaiming(core)),
            ParamSpec("hada_t2", core, "trainable", kaiming(core)),
        ]
    return tuple(params)


def build_loha_layer(spec: LoHaSpec, module: str, layer: LayerInfo, info: ModelInfo) -> LayerPlan:
    """One LoHa layer: rank/alpha patterns, s = alpha / r, the Hadamard factors."""
    _check_layer(module, layer)
    r, alpha = _rank_alpha(spec, module)
    return LayerPlan(
        module=module,
        layer=layer,
        kind="loha",
        params=loha_params(spec, layer, r),
        r=r,
        alpha=alpha,
        scaling=alpha / r,
        options=_options(spec, _effective(spec, layer)),
    )


# -- LoKr ----------------------------------------------------------------------------------------------------
def lokr_params(spec: LoKrSpec, layer: LayerInfo, r: int) -> tuple[ParamSpec, ...]:
    """w1 = lokr_w1 | w1_a·w1_b and w2 = lokr_w2 | w2_a·w2_b | CP(lokr_t2, w2_a, w2_b), with PEFT's inits."""
    in_g = layer.in_features // layer.groups
    m, n = factorization(in_g, spec.decompose_factor)
    l, k = factorization(layer.out_features, spec.decompose_factor)
    full_w1 = not (spec.decompose_both and r < max(l, m) / 2)
    full_w2 = not (r < max(k, n) / 2)
    effective = _effective(spec, layer) and not full_w2
    init = spec.init_weights
    kernel = tuple(layer.kernel_size) if layer.is_conv else ()

    # default init zeroes w1 (or w1_a); "lycoris" zeroes w2 (or w2_b) instead; False draws everything
    def rule(shape: tuple[int, ...], zero_when: object) -> Init:
        return ZEROS if init == zero_when else kaiming(shape)

    params = []
    if full_w1:
        params.append(ParamSpec("lokr_w1", (l, m), "trainable", rule((l, m), True)))
    else:
        params.append(ParamSpec("lokr_w1_a", (l, r), "trainable", rule((l, r), True)))
        params.append(ParamSpec("lokr_w1_b", (r, m), "trainable", kaiming((r, m))))
    if full_w2:
        shape = (k, n, *kernel)
        params.append(ParamSpec("lokr_w2", shape, "trainable", rule(shape, "lycoris")))
    else:
        if effective:
            a_shape, b_shape = (r, k), (r, n)
        else:
            a_shape, b_shape = (k, r), (r, n * math.prod(kernel))
        params.append(ParamSpec("lokr_w2_a", a_shape, "trainable", kaiming(a_shape)))
        params.append(ParamSpec("lokr_w2_b", b_shape, "trainable", rule(b_shape, "lycoris")))
        if effective:
            core = (r, r, *_core_kernel(layer))
            params.append(ParamSpec("lokr_t2", core, "trainable", kaiming(core)))
    return tuple(params)


def build_lokr_layer(spec: LoKrSpec, module: str, layer: LayerInfo, info: ModelInfo) -> LayerPlan:
    """One LoKr layer: rank/alpha patterns, s = alpha / r (applied even when both factors are full)."""
    _check_layer(module, layer)
    r, alpha = _rank_alpha(spec, module)
    params = lokr_params(spec, layer, r)
    return LayerPlan(
        module=module,
        layer=layer,
        kind="lokr",
        params=params,
        r=r,
        alpha=alpha,
        scaling=alpha / r,
        options=_options(
            spec,
            any(p.name == "lokr_t2" for p in params),
            rank_dropout_scale=spec.rank_dropout_scale,
        ),
    )


LAYOUTS = (
    KindLayout(kind="loha", build_layer=build_loha_layer),
    KindLayout(kind="lokr", build_layer=build_lokr_layer),
)

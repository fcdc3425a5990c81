"""BOFT layout: boft_R ∈ R^{N×D×H×H} (N butterfly factors of D blocks of size H, D · H = d) and boft_s, one
scale per output channel (``[out, 1]`` for linear, ``[1, out]`` for conv2d, as HF PEFT stores them).

d is ``in_features`` (linear) or ``in · k_h · k_w`` (conv2d). The checks on (d, N, D, H) are HF PEFT's. The
butterfly permutations are fixed by (d, D, H, N) and are not stored: every backend derives them with
:func:`butterfly_perms`.

HF PEFT silently builds N = 1 when its CUDA extension cannot be compiled but still writes the configured N
into ``adapter_config.json``; such a file (``boft_R`` of shape ``[1, D, H, H]``) is read as the N-factor
butterfly whose extra factors are the identity (R = 0 gives Q = I, and factor 0's permutation is the
identity), which computes exactly what that PEFT computed.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np

from peftdecl.errors import TargetError
from peftdecl.plan.ir import Init, LayerInfo, LayerPlan, ModelInfo, ParamSpec, Plan
from peftdecl.plan.kinds import KindLayout
from peftdecl.plan.kinds.oft import rotated_width
from peftdecl.spec.oft import BOFTSpec


def butterfly_blocks(module: str, dim: int, block_size: int, block_num: int, factors: int) -> tuple[int, int]:
    """(D, H) for a rotated width ``dim``, with HF PEFT's consistency checks (``factors`` = N ≥ 1)."""
    extra = factors - 1  # HF PEFT's (and the paper's) count of permuted factors beyond the block-diagonal one
    where = f"{module}: BOFT on width {dim}"
    if block_size == 0:
        if dim % block_num != 0:
            raise TargetError(f"{where}: boft_block_num {block_num} must divide {dim}")
        if extra and (extra > int(math.log2(block_num)) or block_num % (2**extra) != 0):
            raise TargetError(
                f"{where}: boft_block_num {block_num} must be a multiple of "
                f"2^(boft_n_butterfly_factor−1) = {2**extra}"
            )
        block_size = dim // block_num
    else:
        if dim % block_size != 0:
            raise TargetError(f"{where}: boft_block_size {block_size} must divide {dim}")
        if extra and dim % (block_size * 2**extra) != 0:
            raise TargetError(
                f"{where}: boft_block_size · 2^(boft_n_butterfly_factor−1) = {block_size * 2**extra} "
                f"must divide {dim}"
            )
        block_num = dim // block_size
    if extra and (block_num % 2 != 0 or block_size % 2 != 0):
        raise TargetError(
            f"{where}: with boft_n_butterfly_factor > 1 the block count ({block_num}) and block size "
            f"({block_size}) must both be even"
        )
    return block_num, block_size


def block_butterfly_perm(width: int, groups: int, half: int, permuted: bool) -> np.ndarray:
    """HF PEFT's permutation for one butterfly factor, as indices p with (P v)[k] = v[p[k]].

    The width is cut into ``groups`` equal groups of ``half``-sized pieces; within every group the pieces are
    reordered even-numbered first, then odd-numbered. Without butterfly factors (``permuted`` False) it is the
    identity.
    """
    indices = np.arange(width)
    if not permuted:
        return indices
    if groups * half * 2 > width:
        raise ValueError(f"butterfly permutation of width {width}: {groups} groups of 2·{half} do not fit")
    group = width // groups
    pieces = group // half
    order = [*range(0, pieces, 2), *range(1, pieces, 2)]
    within = np.concatenate([np.arange(pos * half, pos * half + half) for pos in order])
    return np.concatenate([indices[start : start + group][within] for start in range(0, width, group)])


@functools.lru_cache(maxsize=64)
def butterfly_perms(width: int, block_num: int, block_size: int, factors: int) -> tuple[np.ndarray, ...]:
    """The permutations p_0..p_{N−1} of an N-factor butterfly on ``width`` = D · H (``block_num`` D, ``block_size``
    H): factor i acts within groups of 2^i blocks; a single factor is the identity. The result is cached and
    shared: callers must not modify the arrays."""
    return tuple(
        block_butterfly_perm(width, block_num // 2**i, block_size // 2, factors > 1) for i in range(factors)
    )


def build_boft_layer(spec: BOFTSpec, module: str, layer: LayerInfo, info: ModelInfo) -> LayerPlan:
    """One BOFT layer: the butterfly's block layout, its rotation blocks and the output scales."""
    dim = rotated_width(module, layer, "BOFT")
    factors = spec.boft_n_butterfly_factor
    block_num, block_size = butterfly_blocks(module, dim, spec.boft_block_size, spec.boft_block_num, factors)
    s_shape = (1, layer.out_features) if layer.is_conv else (layer.out_features, 1)
    if spec.init_weights:
        r_init, s_init = Init("zeros"), Init("ones")
    else:
        r_init, s_init = Init("normal", mean=0.0, std=0.1), Init("normal", mean=1.0, std=0.1)
    return LayerPlan(
        module=module,
        layer=layer,
        kind="boft",
        params=(
            ParamSpec("boft_R", (factors, block_num, block_size, block_size), "trainable", r_init),
            ParamSpec("boft_s", s_shape, "trainable", s_init),
        ),
        r=block_num,
        options={
            "width": dim,
            "block_size": block_size,
            "block_num": block_num,
            "n_butterfly_factor": factors,
            "dropout": spec.boft_dropout,
        },
    )


def boft_from_file(plan: Plan, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Widen single-factor ``boft_R`` tensors (from a PEFT without its CUDA extension) to the planned N."""
    out = dict(arrays)
    widened = []
    for lp in plan.layers:
        key, factors = lp.key("boft_R"), lp.options["n_butterfly_factor"]
        value = out.get(key)
        if value is None or factors == 1 or np.shape(value) != (1, *lp.param("boft_R").shape[1:]):
            continue
        out[key] = np.concatenate([np.asarray(value), np.zeros((factors - 1, *np.shape(value)[1:]))])
        widened.append(key)
    if widened:
        warnings.warn(
            f"{widened[0]} (and {len(widened) - 1} more): the file holds 1 butterfly factor but its config "
            f"says {plan.layers[0].options['n_butterfly_factor']} (HF PEFT without its CUDA extension builds one); "
            "the other factors are set to the identity",
            stacklevel=2,
        )
    return out


LAYOUT = KindLayout(kind="boft", build_layer=build_boft_layer, from_file=boft_from_file)

"""OFT layout: U ∈ R^{n × b(b−1)/2} per layer (one row with block_share), n · b = d, R_i = Cayley(U_i − U_iᵀ).

d is the rotated width: ``in_features`` (linear), ``in · k_h · k_w`` (conv2d, the flattened filter) and the
embedding dimension (embedding, whose tensor is ``oft_embedding_R.weight``). A block size or block count that
does not divide d is moved to the nearest divisor, ties going down (HF PEFT's ``adjust_oft_parameters``).
"""

from __future__ import annotations

import warnings

from peftdecl.errors import TargetError
from peftdecl.plan.ir import Init, LayerInfo, LayerPlan, ModelInfo, ParamSpec
from peftdecl.plan.kinds import KindLayout
from peftdecl.spec.oft import OFTSpec

NEUMANN_FORMAT_VERSION = (0, 18, 0)
"""HF PEFT changed its Cayley–Neumann series in 0.18.0; older Neumann adapters compute other numbers."""


def neumann_coefficients(terms: int) -> tuple[float, ...]:
    """c_k of R = Σ c_k Q^k as HF PEFT ≥ 0.18 sums the series for ``num_cayley_neumann_terms``.

    1 term: I; 2: I + 2Q; otherwise I + 2Q + … + 2Q^{m−1} + Q^m with m = max(3, terms − 1) — PEFT always adds
    2Q² once it has three or more terms, so 3 and 4 terms give the same series.
    """
    if terms <= 1:
        return (1.0,)
    if terms == 2:
        return (1.0, 2.0)
    top = max(3, terms - 1)
    return (1.0, *(2.0,) * (top - 1), 1.0)


def nearest_divisor(dim: int, value: int) -> int:
    """HF PEFT's adjustment of a block size or count to a divisor of ``dim`` (ties prefer the smaller one)."""
    if value >= dim:
        return dim
    higher = value
    while higher <= dim and dim % higher != 0:
        higher += 1
    lower = value
    while lower > 1 and dim % lower != 0:
        lower -= 1
    return lower if value - lower <= higher - value else higher


def rotated_width(module: str, layer: LayerInfo, kind: str) -> int:
    """The width the rotation acts on; refuses layers HF PEFT's OFT/BOFT cannot wrap."""
    if layer.type == "embedding":
        return layer.out_features
    if layer.type == "conv2d":
        if layer.groups != 1:
            raise TargetError(
                f"{module}: {kind} on a grouped convolution (groups={layer.groups}) is not supported"
            )
        return layer.in_features * layer.kernel_numel
    return layer.in_features


def blocks_for(module: str, dim: int, r: int, block_size: int) -> tuple[int, int]:
    """(number of blocks, block size) after HF PEFT's divisor adjustment, warning as it does."""
    if r == 0:
        if dim % block_size != 0 or block_size > dim:
            adjusted = nearest_divisor(dim, block_size)
            warnings.warn(
                f"{module}: oft_block_size {block_size} does not divide {dim}; adjusted to {adjusted}",
                stacklevel=2,
            )
            block_size = adjusted
        return dim // block_size, block_size
    if dim % r != 0 or r > dim:
        adjusted = nearest_divisor(dim, r)
        warnings.warn(f"{module}: r={r} does not divide {dim}; adjusted to {adjusted}", stacklevel=2)
        r = adjusted
    return r, dim // r


def _version(text: str) -> tuple[int, ...]:
    digits = []
    for part in text.partition("@")[0].split(".")[:3]:
        number = "".join(ch for ch in part if ch.isdigit())
        digits.append(int(number) if number else 0)
    return tuple(digits)


def build_oft_layer(spec: OFTSpec, module: str, layer: LayerInfo, info: ModelInfo) -> LayerPlan:
    """One OFT layer: block layout, the skew-parameter tensor and the rotation settings."""
    if layer.type == "conv2d" and any(d != 1 for d in layer.dilation):
        raise TargetError(
            f"{module}: OFT does not support dilated convolutions (dilation={list(layer.dilation)})"
        )
    dim = rotated_width(module, layer, "OFT")
    n_blocks, block = blocks_for(module, dim, spec.r, spec.oft_block_size)
    if spec.use_cayley_neumann and spec.peft_version and _version(spec.peft_version) < NEUMANN_FORMAT_VERSION:
        warnings.warn(
            f"this OFT adapter was saved by peft {spec.peft_version}, whose Cayley–Neumann series predates "
            "0.18.0; its numbers are computed with the current series",
            stacklevel=2,
        )
    name = "oft_embedding_R.weight" if layer.type == "embedding" else "oft_R.weight"
    rows = 1 if spec.block_share else n_blocks
    init = Init("zeros") if spec.init_weights else Init("normal", mean=0.0, std=0.1)
    return LayerPlan(
        module=module,
        layer=layer,
        kind="oft",
        params=(ParamSpec(name, (rows, block * (block - 1) // 2), "trainable", init),),
        r=n_blocks,
        options={
            "block_size": block,
            "n_blocks": n_blocks,
            "block_share": spec.block_share,
            "coft": spec.coft,
            "eps": spec.eps,
            "use_cayley_neumann": spec.use_cayley_neumann,
            "num_cayley_neumann_terms": spec.num_cayley_neumann_terms,
            "module_dropout": spec.module_dropout,
        },
    )


LAYOUT = KindLayout(kind="oft", build_layer=build_oft_layer)

"""AdaLoRA layout: Q = lora_A ∈ R^{r×in}, Λ = lora_E ∈ R^{r×1}, P = lora_B ∈ R^{out×r}, r = init_r,
ΔW = P (Q ⊙ Λ) · alpha / (init_r + 1e-5) (conv2d: Q is r × in·k·k and ΔW is reshaped to the kernel).

Kept ranks. HF PEFT stores the allocator's result as ``rank_pattern = {"<module>.lora_E": [bool] * init_r}``;
its files hold only the kept triplets (rows of A and E, columns of B) and PEFT rebuilds pruned modules on
load. The plan keeps every layer at ``init_r`` and records the pattern as ``LayerPlan.options["rank_mask"]``
(a tuple of ``init_r`` booleans, or None when the layer keeps every triplet): a triplet outside the mask does
not exist; backends multiply Λ by the mask, and the orthogonality regulariser and the rank allocator skip it.
``to_file`` prunes to the mask on save and ``from_file`` re-expands a pruned file with zeros, so a peftdecl
model computes what PEFT computes with the pruned modules it loads. ``ranknum`` (init_r) is never stored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from peftdecl._json import JsonObject
from peftdecl.errors import AdapterFileError, TargetError
from peftdecl.plan.ir import Init, LayerInfo, LayerPlan, ModelInfo, ParamSpec, Plan
from peftdecl.plan.kinds import KindLayout
from peftdecl.spec.adalora import AdaLoraSpec

RANKNUM_EPS = 1e-5
"""HF PEFT divides by ``ranknum + 1e-5`` (layer.py forward and get_delta_weight)."""
E_SUFFIX = ".lora_E"
NAMES = ("lora_A", "lora_E", "lora_B")


def pattern_module(key: str) -> str:
    """The module a ``rank_pattern`` key names: ``<module>.lora_E`` as saved, or
    ``<module>.lora_E.<adapter>`` as PEFT holds it in memory while training."""
    if key.endswith(E_SUFFIX):
        return key[: -len(E_SUFFIX)]
    head, _, _ = key.rpartition(".")
    if head.endswith(E_SUFFIX):
        return head[: -len(E_SUFFIX)]
    raise TargetError(
        f"rank_pattern key {key!r}: expected '<module>.lora_E' (optionally followed by '.<adapter>')"
    )


def rank_mask_for(spec: AdaLoraSpec, module: str) -> tuple[bool, ...] | None:
    """The kept-triplet mask ``rank_pattern`` gives ``module`` (None: the layer keeps all init_r triplets)."""
    for key, mask in (spec.rank_pattern or {}).items():
        if pattern_module(key) == module:
            if len(mask) != spec.init_r:
                raise TargetError(
                    f"rank_pattern[{key!r}] has {len(mask)} entries; expected init_r = {spec.init_r}"
                )
            return tuple(bool(v) for v in mask)
    return None


def build_adalora_params(spec: AdaLoraSpec, layer: LayerInfo, r: int) -> tuple[ParamSpec, ...]:
    """lora_A, lora_E, lora_B with HF PEFT's initialisation (any truthy init_lora_weights resets them)."""
    fan_in = layer.in_features * layer.kernel_numel
    if spec.init_lora_weights is False:  # PEFT keeps torch.randn for all three
        a_init = e_init = b_init = Init("normal", std=1.0)
    else:
        a_init, e_init, b_init = Init("normal", std=0.02), Init("zeros"), Init("normal", std=0.02)
    return (
        ParamSpec("lora_A", (r, fan_in), "trainable", a_init),
        ParamSpec("lora_E", (r, 1), "trainable", e_init),
        ParamSpec("lora_B", (layer.out_features, r), "trainable", b_init),
    )


def build_adalora_layer(spec: AdaLoraSpec, module: str, layer: LayerInfo, info: ModelInfo) -> LayerPlan:
    """One SVD-shaped layer at rank init_r; its kept-rank mask comes from ``rank_pattern``."""
    if layer.is_conv and layer.groups != 1:
        raise TargetError(f"{module}: AdaLoRA cannot adapt a grouped convolution (groups = {layer.groups})")
    r = spec.init_r
    mask = rank_mask_for(spec, module)
    # PEFT's numerator is lora_alpha, or the layer's rank when lora_alpha <= 0; a layer resized on load by
    # rank_pattern then has its kept rank there, while the denominator keeps init_r (peft adalora/model.py).
    numerator = float(spec.lora_alpha) if spec.lora_alpha > 0 else float(r if mask is None else sum(mask))
    return LayerPlan(
        module=module,
        layer=layer,
        kind="adalora",
        params=build_adalora_params(spec, layer, r),
        r=r,
        alpha=numerator,
        scaling=numerator / (r + RANKNUM_EPS),
        options={
            "dropout": spec.lora_dropout,
            "fan_in_fan_out": layer.type == "gpt2_conv1d",
            "rank_mask": mask,
        },
    )


def check_rank_pattern(
    spec: AdaLoraSpec, layers: Sequence[LayerPlan], info: ModelInfo
) -> tuple[ParamSpec, ...]:
    """Every ``rank_pattern`` key must name a targeted layer (AdaLoRA has no shared tensors)."""
    targets = {lp.module for lp in layers}
    stray = [key for key in (spec.rank_pattern or {}) if pattern_module(key) not in targets]
    if stray:
        raise TargetError(
            f"rank_pattern names layers the adapter does not target: {stray[:5]} "
            f"(targeted: {sorted(targets)[:5]}{', ...' if len(targets) > 5 else ''})"
        )
    return ()


def _kept(lp: LayerPlan) -> np.ndarray | None:
    mask = lp.options.get("rank_mask")
    return None if mask is None or all(mask) else np.asarray(mask, dtype=bool)


def prune_for_file(plan: Plan, arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], JsonObject]:
    """Keep only the masked-in triplets (rows of A and E, columns of B) and write the masks as
    ``rank_pattern`` keyed ``<module>.lora_E``, as HF PEFT saves them."""
    assert isinstance(plan.spec, AdaLoraSpec)
    if plan.spec.rank_pattern is None:
        return arrays, {}
    out = dict(arrays)
    pattern: dict[str, list[bool]] = {}
    for lp in plan.layers:
        mask = lp.options.get("rank_mask")
        if mask is None:
            continue
        pattern[lp.module + E_SUFFIX] = list(mask)
        kept = _kept(lp)
        if kept is not None:
            out[lp.key("lora_A")] = np.asarray(arrays[lp.key("lora_A")])[kept]
            out[lp.key("lora_E")] = np.asarray(arrays[lp.key("lora_E")])[kept]
            out[lp.key("lora_B")] = np.asarray(arrays[lp.key("lora_B")])[:, kept]
    return out, {"rank_pattern": pattern}


def expand_from_file(plan: Plan, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Put pruned tensors back at init_r, zero where the mask is False (full-size ones are masked too)."""
    out = dict(arrays)
    for lp in plan.layers:
        kept = _kept(lp)
        if kept is None:
            continue
        n_kept = int(kept.sum())
        for name, axis in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
            key = lp.key(name)
            if key not in arrays:
                continue  # check_arrays reports the missing tensor
            value = np.asarray(arrays[key])
            full_shape = lp.param(name).shape
            others = [n for i, n in enumerate(value.shape) if i != axis]
            if (
                value.ndim != len(full_shape)
                or value.shape[axis] not in (n_kept, lp.r)
                or others != [n for i, n in enumerate(full_shape) if i != axis]
            ):
                pruned = list(full_shape)
                pruned[axis] = n_kept
                raise AdapterFileError(
                    f"tensor {key} has shape {list(value.shape)}; rank_pattern keeps {n_kept} of {lp.r} "
                    f"triplets, so expected {pruned} (or the unpruned {list(full_shape)})"
                )
            full = np.zeros(full_shape, dtype=value.dtype)
            index = (kept,) if axis == 0 else (slice(None), kept)
            full[index] = value if value.shape[axis] == n_kept else value[index]
            out[key] = full
    return out


def kept_masks(plan: Plan) -> Mapping[str, np.ndarray]:
    """Module -> boolean kept-triplet mask of length init_r (all True where the plan has no mask)."""
    return {
        lp.module: np.ones(lp.r, bool)
        if lp.options.get("rank_mask") is None
        else np.asarray(lp.options["rank_mask"])
        for lp in plan.layers
    }


LAYOUT = KindLayout(
    kind="adalora",
    build_layer=build_adalora_layer,
    build_shared=check_rank_pattern,
    to_file=prune_for_file,
    from_file=expand_from_file,
)

"""``add_weighted_adapter``: a new adapter combined from attached LoRA or IA3 adapters, as HF PEFT 0.21 builds it.

LoRA, per layer with ΔW_i = s_i B_i A_i (A, B flattened to matrices: conv kernels to [r, in·k], embeddings in
PEFT's B A orientation): ``cat`` stacks A' = [w_i s_i A_i], B' = [B_i] (rank Σ r_i, exactly Σ w_i ΔW_i);
the ``*_svd`` types (``svd``: plain Σ) merge the ΔW_i by their rule and keep the top singular pairs (B' = U S,
A' = Vᵀ); ``linear`` / ``ties`` / ``dare_linear`` / ``dare_ties`` / ``magnitude_prune`` merge the A_i with weights
sign·√|w_i s_i| and the B_i with √|w_i s_i| separately (PEFT's approximation of Σ w_i ΔW_i). The new adapter has
r = lora_alpha = its rank and targets the union of the targets. IA3: ℓ' = Σ w_i ℓ_i (0 where an adapter does not
adapt the layer).

Where PEFT is wrong (issue #3761) peftdecl is right or refuses: the factors carry the whole scale, so the new adapter
has use_rslora = False (PEFT keeps it and over-scales by √r'); DoRA and lora_bias adapters are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from peftdecl.combine_math import (
    SIGN_METHODS,
    KeepMask,
    Svd,
    combine,
    low_rank_svd_factors,
    numpy_svd,
    truncated_svd_factors,
)
from peftdecl.errors import PeftdeclError
from peftdecl.plan import LayerPlan, ModelInfo, Plan, compile_plan
from peftdecl.spec import SpecBase

if TYPE_CHECKING:
    from peftdecl.backend import Backend, Engine

SVD_TYPES = ("svd", "ties_svd", "magnitude_prune_svd", "dare_linear_svd", "dare_ties_svd")
FACTOR_TYPES = ("linear", "ties", "magnitude_prune", "dare_linear", "dare_ties")
COMBINATION_TYPES = ("cat", *SVD_TYPES, *FACTOR_TYPES)
DENSITY_TYPES = tuple(t for t in COMBINATION_TYPES if t not in ("cat", "svd", "linear"))
LORA_LAYER_TYPES = ("linear", "gpt2_conv1d", "embedding", "conv1d", "conv2d", "conv3d")


class Combinable(Protocol):
    """The parts of ``AdaptedModel`` a combination reads and writes."""

    @property
    def adapters(self) -> dict[str, Plan]: ...
    @property
    def info(self) -> ModelInfo: ...
    @property
    def engine(self) -> Engine: ...
    @property
    def backend(self) -> Backend: ...
    def add_adapter(
        self, name: str | None = None, spec: object = None, *, arrays: Mapping[str, np.ndarray] | None = None
    ) -> Plan: ...
    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None: ...


def add_weighted_adapter(
    model: Combinable,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    *,
    seed: int = 0,
) -> None:
    """Attach ``adapter_name``, the ``combination_type`` combination of ``adapters`` with ``weights`` (frozen,
    not activated, as PEFT). Any refusal is a PeftdeclError naming the argument; the model is then unchanged.
    ``svd_driver`` (a CUDA solver choice) does not change the result and is accepted for PEFT's signature.
    DARE's masks come from torch's global generator on the torch backend (PEFT's masks given the same torch seed
    and draw order), elsewhere from a NumPy generator seeded with ``seed``."""
    plans = _checked_plans(model, adapters, weights, adapter_name)
    kind = plans[0].kind
    if kind == "ia3":
        spec = _union_spec(plans, feedforward=True)
        arrays = _ia3_arrays(model, adapters, weights)
    else:
        _check_lora(plans, adapters)
        combination_type = "linear" if len(adapters) == 1 else combination_type  # as PEFT
        _check_options(combination_type, svd_clamp, density, majority_sign_method)
        ranks = [max([p.spec.r, *(p.spec.rank_pattern or {}).values()]) for p in plans]  # type: ignore[attr-defined]
        rank = _new_rank(combination_type, ranks, svd_rank)
        spec = _union_spec(plans, feedforward=False).replace(
            r=rank, lora_alpha=rank, use_rslora=False, alpha_pattern={}, rank_pattern={}
        )
        factors = [model.engine.export(name) for name in adapters]
        masks = _keep_masks(model, seed, adapters)
        svd: Svd = getattr(model.backend, "combination_svd", None) or numpy_svd  # torch: PEFT's float32 SVD
        arrays = {}
        targets = set(_union_targets(plans))
        layer_plans = [{lp.module: lp for lp in plan.layers} for plan in plans]
        for module in (m for m in model.info.layers if m in targets):  # model order: PEFT's DARE draw order
            present = [
                (lps[module], f, w)
                for lps, f, w in zip(layer_plans, factors, weights, strict=True)
                if module in lps
            ]
            arrays.update(
                _lora_layer(
                    module,
                    present,
                    rank,
                    combination_type,
                    density,
                    majority_sign_method,
                    masks(module),
                    svd_clamp,
                    svd_full_matrices,
                    svd,
                )
            )
    _check_targets(model, spec, plans, adapter_name)
    model.add_adapter(adapter_name, spec, arrays=arrays)
    model.set_requires_grad(adapter_name, False)


def _checked_plans(
    model: Combinable, adapters: Sequence[str], weights: Sequence[float], adapter_name: str
) -> list[Plan]:
    attached = model.adapters
    if isinstance(adapters, str) or not adapters:
        raise PeftdeclError(
            f"adapters: expected a non-empty list of attached adapter names; got {adapters!r}"
        )
    missing = [name for name in adapters if name not in attached]
    if missing:
        raise PeftdeclError(f"adapters: no adapter named {missing}; attached: {sorted(attached)}")
    if len(weights) != len(adapters):
        raise PeftdeclError(f"weights: expected one weight per adapter ({len(adapters)}); got {len(weights)}")
    if adapter_name in attached:
        raise PeftdeclError(f"adapter_name: an adapter named {adapter_name!r} is already attached")
    plans = [attached[name] for name in adapters]
    kinds = sorted({plan.kind for plan in plans})
    if len(kinds) > 1:
        raise PeftdeclError(f"adapters: cannot combine adapters of different kinds {kinds}")
    if kinds[0] not in ("lora", "ia3"):
        raise PeftdeclError(
            f"adapters: add_weighted_adapter combines plain LoRA and IA3 adapters; these are {kinds[0]!r}"
            + (" (DoRA: a combined magnitude vector is not defined)" if kinds[0] == "dora" else "")
        )
    for name, plan in zip(adapters, plans, strict=True):
        if plan.modules_to_save:
            raise PeftdeclError(f"adapters: {name!r} has modules_to_save, which cannot be combined")
    return plans


def _check_lora(plans: Sequence[Plan], adapters: Sequence[str]) -> None:
    for name, plan in zip(adapters, plans, strict=True):
        spec = plan.spec
        if getattr(spec, "lora_bias", False):
            raise PeftdeclError(
                f"adapters: {name!r} has lora_bias; combining its bias is not supported (PEFT drops it silently)"
            )
        if getattr(spec, "target_parameters", None) or getattr(spec, "trainable_token_indices", None):
            raise PeftdeclError(
                f"adapters: {name!r} targets parameters or token rows, which cannot be combined"
            )
        for layer in plan.layers:
            if layer.layer.type not in LORA_LAYER_TYPES or layer.layer.groups != 1:
                raise PeftdeclError(
                    f"adapters: {name!r} adapts {layer.module} ({layer.layer.type}, groups "
                    f"{layer.layer.groups}), which add_weighted_adapter cannot combine"
                )


def _check_options(
    combination_type: str, svd_clamp: float | None, density: float | None, majority_sign_method: str
) -> None:
    if combination_type not in COMBINATION_TYPES:
        raise PeftdeclError(
            f"combination_type: expected one of {list(COMBINATION_TYPES)}; got {combination_type!r}"
        )
    if combination_type in DENSITY_TYPES and (density is None or density < 0):
        raise PeftdeclError(f"density: {combination_type!r} needs a density in [0, 1]; got {density!r}")
    if majority_sign_method not in SIGN_METHODS:
        raise PeftdeclError(
            f"majority_sign_method: expected one of {list(SIGN_METHODS)}; got {majority_sign_method!r}"
        )
    if svd_clamp is not None and not 0 <= svd_clamp <= 1:
        raise PeftdeclError(f"svd_clamp: expected a quantile in [0, 1]; got {svd_clamp!r}")


def _new_rank(combination_type: str, ranks: Sequence[int], svd_rank: int | None) -> int:
    """PEFT's rank of the new adapter: the common rank, Σ r_i for ``cat``, ``svd_rank`` or max r_i for SVD."""
    if combination_type in FACTOR_TYPES:
        if len(set(ranks)) != 1:
            raise PeftdeclError(
                f"adapters: combination_type {combination_type!r} needs adapters of one rank; got ranks {list(ranks)}"
            )
        return ranks[0]
    if combination_type == "cat":
        return sum(ranks)
    if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank < 1):
        raise PeftdeclError(f"svd_rank: expected a positive integer; got {svd_rank!r}")
    return svd_rank or max(ranks)


def _keep_masks(model: Combinable, seed: int, adapters: Sequence[str]) -> Callable[[str], KeepMask]:
    """DARE's mask source per layer: on torch, torch's global generator on the layer's adapter device and dtype
    (as PEFT), else one NumPy generator seeded with ``seed``."""
    backend_masks = getattr(model.backend, "dare_keep_masks", None)
    if backend_masks is not None:  # torch: PEFT's draw from torch's global generator
        masks: Callable[[str], KeepMask] = backend_masks(model.engine, adapters)
        return masks
    rng = np.random.default_rng(seed)
    mask: KeepMask = lambda shape, density: (rng.random(shape) < density).astype(np.float64)  # noqa: E731
    return lambda module: mask


def _union_targets(plans: Sequence[Plan]) -> list[str]:
    return list(dict.fromkeys(module for plan in plans for module in plan.targets))


def _union_spec(plans: Sequence[Plan], feedforward: bool) -> SpecBase:
    """The first adapter's spec targeting every adapter's modules (a list union, or PEFT's joined regex)."""
    fields = ("target_modules", "feedforward_modules") if feedforward else ("target_modules",)
    changes: dict[str, object] = {}
    for field in fields:
        values = [getattr(plan.spec, field) for plan in plans]
        if all(isinstance(v, str) for v in values):
            changes[field] = "|".join(f"({v})" for v in values)
        elif not any(isinstance(v, str) for v in values) and None not in values:
            changes[field] = tuple(dict.fromkeys(m for v in values for m in v))
        elif len(set(map(str, values))) > 1:
            raise PeftdeclError(
                f"adapters: their {field} mix a regex string with lists; PEFT refuses this too"
            )
    return plans[0].spec.replace(**changes)


def _check_targets(model: Combinable, spec: SpecBase, plans: Sequence[Plan], adapter_name: str) -> None:
    """The combined spec must select exactly the union of the adapters' layers (exclusions or layer filters of
    the first adapter could select others)."""
    selected = set(compile_plan(spec, model.info, adapter_name).targets)
    union = set(_union_targets(plans))
    if selected != union:
        raise PeftdeclError(
            f"adapters: their combined targets select {sorted(selected ^ union)} differently from the adapters"
        )


def _ia3_arrays(
    model: Combinable, adapters: Sequence[str], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for name, weight in zip(adapters, weights, strict=True):
        for key, value in model.engine.export(name).items():
            term = weight * np.asarray(value, dtype=np.float64)
            if key in arrays and arrays[key].shape != term.shape:
                raise PeftdeclError(f"adapters: {key} is a feedforward layer in some adapters only")
            arrays[key] = arrays[key] + term if key in arrays else term
    return arrays


def _matrices(lp: LayerPlan, p: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(A [r, in·k], B [out, r]) with ΔW = s B A in PEFT's merge orientation."""
    if lp.layer.type == "embedding":
        a, b = p[lp.key("lora_embedding_A")], p[lp.key("lora_embedding_B")]
    else:
        a, b = p[lp.key("lora_A.weight")], p[lp.key("lora_B.weight")]
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)


def _stored(lp: LayerPlan, rank: int, a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """The layer's arrays for rank ``rank`` (zero-padded, as PEFT leaves unused rows of a bigger rank)."""
    full_a, full_b = a, b
    if a.shape[0] < rank:  # cat at a layer that some adapters do not target
        full_a, full_b = np.zeros((rank, a.shape[1])), np.zeros((b.shape[0], rank))
        full_a[: a.shape[0]], full_b[:, : b.shape[1]] = a, b
    if lp.layer.type == "embedding":
        return {lp.key("lora_embedding_A"): full_a, lp.key("lora_embedding_B"): full_b}
    ones = (1,) * len(lp.layer.kernel_size)
    return {
        lp.key("lora_A.weight"): full_a.reshape(rank, lp.layer.in_features, *lp.layer.kernel_size),
        lp.key("lora_B.weight"): full_b.reshape(lp.layer.out_features, rank, *ones),
    }


def _lora_layer(
    module: str,
    present: Sequence[tuple[LayerPlan, Mapping[str, np.ndarray], float]],
    rank: int,
    combination_type: str,
    density: float | None,
    majority_sign_method: str,
    keep_mask: KeepMask,
    svd_clamp: float | None,
    full_matrices: bool,
    svd: Svd,
) -> dict[str, np.ndarray]:
    lp = present[0][0]
    mats = [(_matrices(layer, p), layer.scaling, w) for layer, p, w in present]
    if combination_type in FACTOR_TYPES:
        a, b = _merged_factors(module, mats, rank, combination_type, density, majority_sign_method, keep_mask)
        return _stored(lp, rank, a, b)
    # B' = [B_i], A' = [w_i s_i A_i]: B' A' = Σ w_i ΔW_i exactly, of rank ≤ Σ r_i
    a_cat = np.concatenate([w * s * a for (a, _), s, w in mats])
    b_cat = np.concatenate([b for (_, b), _, _ in mats], axis=1)
    if combination_type == "cat":
        return _stored(lp, rank, a_cat, b_cat)
    if rank > min(b_cat.shape[0], a_cat.shape[1]):
        raise PeftdeclError(
            f"svd_rank: {rank} exceeds what {module} allows (its ΔW is {b_cat.shape[0]}×{a_cat.shape[1]})"
        )
    if combination_type == "svd" and svd_clamp is None and rank <= a_cat.shape[0]:
        # the SVD of the small core instead of ΔW's (same B A); the clamp's quantile depends on the pairs' signs
        b, a = low_rank_svd_factors(b_cat, a_cat, rank)
        return _stored(lp, rank, a, b)
    # PEFT's ΔW of an embedding or a fan_in_fan_out layer is [in, out]: DARE's masks are drawn in that layout
    flip = lp.layer.type == "embedding" or bool(lp.options.get("fan_in_fan_out"))
    deltas = [(s * (b @ a)).T if flip else s * (b @ a) for (a, b), s, _ in mats]
    rule = combination_type.removesuffix("_svd")
    delta = combine(rule, deltas, [w for *_, w in mats], density, majority_sign_method, keep_mask)
    b, a = truncated_svd_factors(delta.T if flip else delta, rank, svd_clamp, full_matrices, svd)
    return _stored(lp, rank, a, b)


def _merged_factors(
    module: str,
    mats: Sequence[tuple[tuple[np.ndarray, np.ndarray], float, float]],
    rank: int,
    combination_type: str,
    density: float | None,
    majority_sign_method: str,
    keep_mask: KeepMask,
) -> tuple[np.ndarray, np.ndarray]:
    """(A', B'): the rule applied to the A_i with weights sign·√|w_i s_i| and to the B_i with √|w_i s_i|."""
    if any(a.shape[0] != rank for (a, _), _, _ in mats):
        raise PeftdeclError(f"adapters: combination_type {combination_type!r} needs one rank at {module}")
    scaled = [w * s for _, s, w in mats]
    weights_a = [float(np.sign(x) or 1.0) * np.sqrt(abs(x)) for x in scaled]
    weights_b = [np.sqrt(abs(x)) for x in scaled]
    # PEFT merges the factors as stored (conv kernels unflattened); the rules are elementwise or over all entries
    a_list, b_list = [a for (a, _), _, _ in mats], [b for (_, b), _, _ in mats]
    a = combine(combination_type, a_list, weights_a, density, majority_sign_method, keep_mask)
    b = combine(combination_type, b_list, weights_b, density, majority_sign_method, keep_mask)
    return a, b
